"""MSDNet: faithful to the release's five configurations, timm registry, staged run, bad input."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_l2w
from tests.helpers import DATA
from timm_l2w.flops import exit_flops
from timm_l2w.models.base import select_samples
from timm_l2w.models.msdnet import MSDNet, msdnet_kwargs_from_release_args

MANIFEST = json.loads((DATA / "msdnet_reference_manifest.json").read_text())


def _check_against_manifest(entry: dict, model: MSDNet) -> None:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = entry["state_dict"]
    assert [k for k in ref if k not in shapes] == []
    assert [k for k in shapes if k not in ref] == []
    assert {k: v for k, v in shapes.items() if v != ref[k]} == {}
    assert list(shapes) == list(ref)  # same order too
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    size = entry["image_size"]
    flops = exit_flops(model, (3, size, size))
    for ours, theirs in zip(flops, entry["flops_per_exit"], strict=True):
        assert abs(ours / theirs - 1) < 0.01


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_release_configurations_match_manifest(name):
    entry = MANIFEST[name]
    with torch.device("meta"):  # FLOPs are counted from shapes, so no memory or compute is needed
        model = MSDNet(**msdnet_kwargs_from_release_args(entry["args"]))
    _check_against_manifest(entry, model)


@pytest.mark.parametrize("model_name, entry_name, num_classes", [
    ("msdnet_l2w_cifar", "cifar100_msdnet_5exit", None),
    ("msdnet_l2w_cifar", "cifar10_msdnet_5exit", 10),
    ("msdnet_l2w", "imagenet_msdnet_step4", None),
    ("msdnet_l2w_step6", "imagenet_msdnet_step6", None),
    ("msdnet_l2w_step7", "imagenet_msdnet_step7", None),
])
def test_registered_models_match_manifest(model_name, entry_name, num_classes):
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    device = "cpu" if "cifar" in model_name else "meta"  # CIFAR: count on real tensors too
    with torch.device(device):
        model = timm.create_model(model_name, **kwargs)
    size = MANIFEST[entry_name]["image_size"]
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    _check_against_manifest(MANIFEST[entry_name], model)


def test_imagenet_stem_runs_down_to_its_minimum_size():
    model = MSDNet(n_blocks=2, step=1, base=1, n_channels=4, growth_rate=2, stem="imagenet", num_classes=3).eval()
    assert model.min_input_size == 129  # 7x7/s2 conv + max pool (4), three scale halvings (8), two head convs (4)
    with torch.no_grad():
        assert [o.shape for o in model.forward_exits(torch.randn(2, 3, 129, 129))] == [(2, 3), (2, 3)]
    with pytest.raises(ValueError, match="at least 129"):
        model(torch.randn(1, 3, 128, 200))


def test_tiny_cifar_is_small_and_five_exits():
    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=10)
    assert model.num_exits == 5 and model.num_classes == 10 and model.in_chans == 3
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 0.25 * MANIFEST["cifar100_msdnet_5exit"]["num_params"]
    flops = exit_flops(model)  # default input size from the pretrained cfg (32x32)
    assert len(flops) == 5 and all(a < b for a, b in zip(flops, flops[1:]))
    assert flops[-1] < 0.5 * MANIFEST["cifar100_msdnet_5exit"]["flops_per_exit"][-1]


@pytest.mark.parametrize("training", [False, True])
def test_stages_in_order_reproduce_forward(training):
    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=7).train(training)
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    outputs = model.forward_exits(x)
    assert len(outputs) == 5 and all(o.shape == (3, 7) for o in outputs)
    state, staged = x, []
    for k in range(model.num_exits):
        state, logits = model.forward_stage(k, state)
        staged.append(logits)
    assert isinstance(state, list) and len(state) == 1  # prune='max' ends on the coarsest scale only
    for a, b in zip(outputs, staged, strict=True):
        assert torch.equal(a, b)


def test_state_can_drop_samples_between_stages():
    model = timm.create_model("msdnet_l2w_cifar_tiny", num_classes=4).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_exits(x)
        state, _ = model.forward_stage(0, x)
        keep = torch.tensor([True, False, True, False])
        state = select_samples(state, keep)
        for k in range(1, model.num_exits):
            state, logits = model.forward_stage(k, state)
    torch.testing.assert_close(logits, full[-1][keep], rtol=1e-4, atol=1e-5)


def test_in_chans_num_classes_and_larger_inputs():
    model = timm.create_model("msdnet_l2w_cifar_tiny", in_chans=1, num_classes=3).eval()
    assert model.blocks[0][0].layers[0].net[0].in_channels == 1
    with torch.no_grad():
        assert all(o.shape == (2, 3) for o in model.forward_exits(torch.randn(2, 1, 48, 40)))
        assert all(o.shape == (2, 3) for o in model.forward_exits(torch.randn(2, 1, 17, 17)))  # the minimum size


def test_reset_and_get_classifier():
    model = timm.create_model("msdnet_l2w_cifar_tiny")
    assert model.num_classes == 100
    heads = model.get_classifiers()
    assert len(heads) == 5 and all(h.out_features == 100 for h in heads)
    assert model.get_classifier() is heads[-1]  # timm's scripts (--head-init-scale) get the last exit's
    trunk = {k: v.clone() for k, v in model.state_dict().items() if ".linear." not in k}
    model.reset_classifier(6)
    assert model.num_classes == 6 and all(h.out_features == 6 for h in model.get_classifiers())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trunk.items())
    with pytest.raises(ValueError, match="unknown global_pool 'median'"):
        model.reset_classifier(5, global_pool="median")
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(5, global_pool="")
    model.reset_classifier(0)  # timm convention: exits return pooled features
    feats = model.eval().forward_exits(torch.randn(2, 3, 32, 32))
    assert feats[-1].shape == (2, model.num_features)
    model.reset_classifier(4, global_pool="catavgmax")  # timm's pool types: avg and max concatenated
    assert model.head_hidden_size == 2 * model.num_features
    assert all(o.shape == (2, 4) for o in model.forward_exits(torch.randn(2, 3, 32, 32)))


def test_pretrained_file_and_num_classes_change_reinitialise_only_heads(tmp_path):
    source = timm.create_model("msdnet_l2w_cifar_tiny").eval()
    for p in source.parameters():  # make the file's weights distinguishable from a fresh init
        p.data.normal_()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    same = timm.create_model("msdnet_l2w_cifar_tiny", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(source(x), same(x)):
            assert torch.equal(a, b)

    other = timm.create_model("msdnet_l2w_cifar_tiny", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    src, new = source.state_dict(), other.state_dict()
    heads = set(other.pretrained_cfg["classifier"])
    assert heads == {f"classifier.{k}.linear" for k in range(5)}
    for key, value in new.items():
        if key.rsplit(".", 1)[0] in heads:
            assert value.shape[0] == 10 and not torch.equal(value, src[key][:10])
        else:
            assert torch.equal(value, src[key]), key

    gray = timm.create_model("msdnet_l2w_cifar_tiny", pretrained=True, in_chans=1,
                             pretrained_cfg_overlay=dict(file=str(path)))
    stem = "blocks.0.0.layers.0.net.0.weight"
    assert gray.pretrained_cfg["first_conv"] + ".weight" == stem  # timm adapts the stem conv to 1 channel
    torch.testing.assert_close(gray.state_dict()[stem], src[stem].sum(dim=1, keepdim=True))

    via_checkpoint = timm.create_model("msdnet_l2w_cifar_tiny", checkpoint_path=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(via_checkpoint(x), source(x))  # eval mode: the last exit


def test_bad_input_errors_name_the_fix():
    model = timm.create_model("msdnet_l2w_cifar_tiny")
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 17"):
        model(torch.randn(1, 3, 16, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="step_mode"):
        timm.create_model("msdnet_l2w_cifar_tiny", step_mode="linear")
    with pytest.raises(ValueError, match="prune"):
        timm.create_model("msdnet_l2w_cifar_tiny", prune="min")
    with pytest.raises(ValueError, match="stem"):
        timm.create_model("msdnet_l2w_cifar_tiny", stem="vit")
    with pytest.raises(ValueError, match="one entry per scale"):
        timm.create_model("msdnet_l2w_cifar_tiny", gr_factor=(1, 2))
    with pytest.raises(TypeError, match="unexpected arguments"):
        timm.create_model("msdnet_l2w_cifar_tiny", n_blockz=3)


def test_registered_in_timm_on_import():
    names = set(timm.list_models("msdnet_l2w*"))
    assert {"msdnet_l2w", "msdnet_l2w_step6", "msdnet_l2w_step7", "msdnet_l2w_cifar",
            "msdnet_l2w_cifar_tiny"} <= names
    assert timm_l2w.models.MSDNet is MSDNet

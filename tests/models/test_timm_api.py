"""timm's model API on every family: hub files, features_only, torch.fx, torch.compile / torch.export,
reset_classifier, forward_features / forward_head, the ViT wrapper's image sizes (issue 11)."""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names, get_pretrained_cfg, save_for_hf

import timm_l2w  # noqa: F401  (registers the models)

# Every model timm_l2w registers, built small where its arguments allow (same architecture family,
# fewer channels / blocks), with the input side used to run it.
SMALL = {
    "msdnet_l2w": (dict(n_channels=4, growth_rate=2, head_channels=8), 224),
    "msdnet_l2w_step6": (dict(n_channels=4, growth_rate=2, head_channels=8), 224),
    "msdnet_l2w_step7": (dict(n_channels=4, growth_rate=2, head_channels=8), 224),
    "msdnet_l2w_cifar": (dict(n_channels=4, growth_rate=2, num_classes=10), 32),
    "msdnet_l2w_cifar_tiny": (dict(num_classes=10), 32),
    "ranet_l2w": (dict(num_channels=4, growth_rate=2, step=1, head_width=8), 160),
    "ranet_l2w_cifar": (dict(num_channels=4, growth_rate=2, head_width=8), 32),
    "resnet18_l2w": (dict(num_classes=10), 64),
    "convnext_atto_l2w": (dict(dims=(8, 16, 32, 64), num_classes=10), 64),
    "vit_tiny_l2w": (dict(img_size=32, depth=4, embed_dim=32, num_heads=2, exit_indices=(0, 1, 2, 3)), 32),
    "multi_exit_l2w": (dict(backbone="test_efficientnet", exit_indices=(1, 3, 4), num_classes=10), 64),
}
# one small model per family: MSDNet, RANet, the wrapper (a ViT: tokens, class token, patch grid)
FAMILIES = ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar", "vit_tiny_l2w"]


def _registered() -> set:
    return {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("timm_l2w.")}


def _make(name: str, **overrides):
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    return timm.create_model(name, **{**kwargs, **overrides}), torch.randn(2, 3, size, size)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt of timm to fetch weights (hub, url) fails the test; returns the attempts made."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise ConnectionError("no downloads in this test")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(f"timm.models._builder.{fn}", refuse)
    return attempts


def test_every_registered_model_has_a_default_cfg_and_a_case_here():
    assert _registered() == set(SMALL)  # a new model must be added to the round trip below
    for name in SMALL:
        cfg = get_pretrained_cfg(name).to_dict()
        for key in ("input_size", "mean", "std", "first_conv", "classifier", "num_classes", "pool_size"):
            assert key in cfg, (name, key)
        model = timm.create_model(name, **SMALL[name][0])
        assert model.default_cfg is model.pretrained_cfg and model.pretrained_cfg["architecture"] == name
        names = set(model.state_dict())
        assert {f"{c}.weight" for c in model.pretrained_cfg["classifier"]} <= names  # every exit's classifier
        assert len(model.pretrained_cfg["classifier"]) == model.num_exits
        assert f"{model.pretrained_cfg['first_conv']}.weight" in names


@pytest.mark.parametrize("name", sorted(SMALL))
def test_hub_files_round_trip_offline(name, tmp_path, no_downloads):
    model, x = _make(name)
    for p in model.parameters():  # weights a fresh init cannot reproduce
        p.data.normal_(0, 0.1)
    save_for_hf(model.eval(), tmp_path, safe_serialization=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == name
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert no_downloads == []  # the wrapper did not fetch its backbone's weights
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(x), loaded.forward_exits(x)))


def test_wrapper_pretrained_means_backbone_weights_only_without_a_checkpoint(tmp_path, no_downloads):
    with pytest.raises(ConnectionError):
        timm.create_model("resnet18_l2w", pretrained=True)  # no checkpoint of its own: timm's ResNet-18
    assert len(no_downloads) == 1
    model, _ = _make("convnext_atto_l2w")
    save_for_hf(model, tmp_path, safe_serialization=True)
    tuned = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=5)  # fine-tuning
    assert len(no_downloads) == 1
    src, new = model.state_dict(), tuned.state_dict()
    for key, value in new.items():
        if ".fc." in key and key.startswith("heads."):  # every exit's classifier is new
            assert value.shape[0] == 5
        else:
            assert torch.equal(value, src[key]), key


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_features_head_and_reset_classifier(name):
    model, x = _make(name)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model.forward_head(feats), model(x))  # eval forward = the last exit
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[1 if feats.ndim == 4 else -1] == model.num_features
        assert pre.shape == (2, model.head_hidden_size)
        assert len(model.get_classifiers()) == model.num_exits
        # timm's get_classifier(): the last exit's linear layer, the one eval mode's forward ends with
        assert model.get_classifier() is model.get_classifiers()[-1]
        torch.testing.assert_close(model.get_classifier()(pre), model(x), rtol=0, atol=0)
        model.reset_classifier(0)  # timm: exits return pooled features
        assert model.num_classes == 0 and torch.equal(model(x), pre)
        assert all(o.shape[0] == 2 and o.ndim == 2 for o in model.forward_exits(x))
        if feats.ndim == 4:  # no pooling either: the unpooled maps
            model.reset_classifier(0, "")
            assert torch.equal(model(x), feats)
        with pytest.raises(ValueError, match="num_classes=0"):
            model.reset_classifier(3, "")
        model.reset_classifier(3, "avg")
        assert model.num_classes == 3 and all(o.shape == (2, 3) for o in model.forward_exits(x))
    model.train()
    assert all(o.shape == (2, 3) for o in model(x))  # train mode: every exit


@pytest.mark.parametrize("name", FAMILIES + ["msdnet_l2w"])
def test_features_only(name):
    model, x = _make(name)
    features = timm.create_model(name, features_only=True, **SMALL[name][0]).eval()
    info = features.feature_info
    assert len(info.channels()) >= 3 and info.reduction() == sorted(info.reduction())
    assert not any(k.startswith(("classifier.", "heads.")) for k in features.state_dict())  # exit heads pruned
    features.model.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        outs = features(x)
        _, reference = model.eval().forward_intermediates(x)
    assert [o.shape[1] for o in outs] == info.channels()
    side = x.shape[-1]
    assert [o.shape[-1] for o in outs] == [-(-side // r) for r in info.reduction()]
    assert all(torch.equal(a, b) for a, b in zip(outs, reference[-len(outs):]))
    with pytest.raises(RuntimeError, match="pruned"):
        features.model(x)


def test_msdnet_features_need_no_exit_head_size():
    features = timm.create_model("msdnet_l2w", features_only=True, **SMALL["msdnet_l2w"][0])
    outs = features(torch.randn(1, 3, 96, 96))  # below the 129 the exit heads need
    assert [o.shape[-1] for o in outs] == [24, 12, 6, 3]


@pytest.mark.parametrize("name", FAMILIES)
def test_fx_feature_extraction(name):
    model, x = _make(name)
    model.eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        assert torch.equal(next(iter(extractor(x).values())), model(x))


def test_fx_graph_scripts_with_torchscript():
    """timm's test_model_forward_fx_torchscript: the FX graph's input annotation must be a real type."""
    model, x = _make("msdnet_l2w_cifar_tiny")
    model.eval()
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(extractor)
    with torch.no_grad():
        assert torch.allclose(next(iter(scripted(x).values())), model(x), atol=1e-6)


def test_grad_checkpointing_same_outputs_and_gradients():
    model, x = _make("msdnet_l2w_cifar_tiny")
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(0)
        outs = model.train()(x)
        torch.cat(outs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def _compile_and_check(name: str, backend: str, **compile_kwargs):
    model, x = _make(name, **({"n_blocks": 2} if name.startswith("msdnet") else {}))
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    outs = compiled(x)  # train mode: the tuple of exits
    assert isinstance(outs, tuple) and len(outs) == model.num_exits
    torch.cat(outs).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # eval mode: the last exit


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "vit_tiny_l2w"])
def test_torch_compile_train_and_eval_one_graph(name):
    torch._dynamo.reset()
    _compile_and_check(name, "eager", fullgraph=True)  # dynamo captures forward without graph breaks


@pytest.mark.slow
def test_torch_compile_inductor_train_and_eval():  # minutes on 2 CPU cores: C++ code generation
    torch._dynamo.reset()
    _compile_and_check("msdnet_l2w_cifar_tiny", "inductor")


@pytest.mark.parametrize("name,fewer_exits", [
    ("msdnet_l2w_cifar_tiny", dict(n_blocks=2)), ("ranet_l2w_cifar", dict(num_blocks=1, block_step=1)),
    ("vit_tiny_l2w", {}),
])
def test_torch_export_eval_model(name, fewer_exits):
    model, x = _make(name, **fewer_exits)  # fewer exits: a shorter graph to export, the same code paths
    model.eval()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_vit_wrapper_img_size_and_dynamic_img_size():
    model, _ = _make("vit_tiny_l2w", img_size=48)
    assert model(torch.randn(1, 3, 48, 48))[-1].shape == (1, 1000)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 64, 64))
    dynamic, _ = _make("vit_tiny_l2w", dynamic_img_size=True)
    dynamic.eval()
    for h, w in ((32, 32), (64, 64), (48, 80)):
        assert dynamic(torch.randn(1, 3, h, w)).shape == (1, 1000)


def test_exit_flops_default_size_is_the_models_current_input():
    vit, _ = _make("vit_tiny_l2w", img_size=48)  # timm keeps the cfg's 224 as the source size
    assert vit.pretrained_cfg["input_size"] == (3, 224, 224)
    assert timm_l2w.exit_flops(vit).input_size == (3, 48, 48)
    gray = timm.create_model("msdnet_l2w_cifar_tiny", in_chans=1)
    assert timm_l2w.exit_flops(gray).input_size == (1, 32, 32)

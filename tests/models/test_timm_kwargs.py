"""timm's standard ``create_model`` arguments on every registered multi-exit model.

timm's ``train.py`` always passes ``drop_rate`` (``--drop``, 0.0 by default), ``drop_path_rate``,
``drop_block_rate``, ``global_pool``, ``bn_momentum`` and ``bn_eps`` (``None`` by default: ``create_model``
drops ``None`` values); ``benchmark.py`` passes the first four. Every registered model builds with those
defaults exactly as without them, and each non-neutral value either takes effect or is refused with a
message naming what the model takes.
"""
from __future__ import annotations

from typing import Any, Dict

import pytest
import timm
import torch
from torch import nn

import timm_l2w  # noqa: F401 - registers the models

# train.py's create_model call with its argparse defaults (--drop 0.0, --drop-path / --drop-block / --gp /
# --bn-momentum / --bn-eps None, --torchscript off, --initial-checkpoint '')
TRAIN_DEFAULTS: Dict[str, Any] = dict(
    pretrained=False, in_chans=3, drop_rate=0.0, drop_path_rate=None, drop_block_rate=None, global_pool=None,
    bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path="",
)

# small, quick builds; the input each forward uses
SMALL: Dict[str, Dict[str, Any]] = {
    "vit_tiny_l2w": dict(img_size=64),
}
INPUT = {"msdnet_l2w": 129, "msdnet_l2w_step6": 129, "msdnet_l2w_step7": 129, "ranet_l2w": 160,
         "msdnet_l2w_cifar": 32, "msdnet_l2w_cifar_tiny": 32, "ranet_l2w_cifar": 32}
FAMILIES = {"msdnet": "MSDNet", "ranet": "RANet"}
WRAPPED = ("multi_exit_l2w", "resnet18_l2w", "convnext_atto_l2w", "vit_tiny_l2w")
# the package's registered models (tests register helpers' tiny models in timm's registry too)
ALL = [name for name in timm.list_models("*l2w*")
       if timm.models.model_entrypoint(name).__module__.startswith("timm_l2w.")]


def _build(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=7, **{**SMALL.get(name, {}), **kwargs})


def _x(name: str) -> torch.Tensor:
    side = INPUT.get(name, 64)
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def _family(name: str) -> str:
    return FAMILIES.get(name.split("_")[0], "wrapped")


def test_every_registered_model_is_covered():
    assert set(ALL) == set(INPUT) | set(WRAPPED)


@pytest.mark.parametrize("name", ALL)
def test_train_py_defaults_leave_the_model_bit_for_bit(name):
    plain = _build(name)
    from_train_py = _build(name, **TRAIN_DEFAULTS)
    assert str(from_train_py) == str(plain)  # same modules, BatchNorm eps / momentum, no dropout module
    ref, got = plain.state_dict(), from_train_py.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    x = _x(name)
    for mode in (False, True):  # train mode too: drop_rate 0.0 adds no dropout
        plain.train(mode), from_train_py.train(mode)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(from_train_py.forward_exits(x), plain.forward_exits(x)))


def _exits_vary(model: nn.Module, x: torch.Tensor) -> list:
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    return [not torch.equal(p, q) for p, q in zip(a, b)]


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar", "resnet18_l2w", "convnext_atto_l2w",
                                  "vit_tiny_l2w", "multi_exit_l2w"])
def test_drop_rate_is_dropout_before_every_exit_classifier(name):
    x = _x(name)
    model, plain = _build(name, drop_rate=0.5).eval(), _build(name).eval()
    with torch.no_grad():  # identity in eval mode: the same weights give the same outputs
        assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(x), plain.forward_exits(x)))
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (2, model.head_hidden_size)
    assert all(_exits_vary(model, x))  # active in train mode on every exit
    if _family(name) == "wrapped":
        # passed to the backbone as timm does (its own head: the last exit)
        backbone = model.backbone
        assert getattr(backbone, "drop_rate", None) == 0.5 or backbone.head_drop.p == 0.5


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar"])
def test_bn_momentum_and_eps_set_every_batchnorm(name):
    model = _build(name, bn_momentum=0.01, bn_eps=1e-3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
    plain = _build(name)
    ref = plain.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # the same weights
    model.train()(_x(name))  # the running stats move at the new momentum
    for m in bns:
        assert m.num_batches_tracked.item() == 1


def test_wrapped_backbone_that_takes_bn_args_gets_them_and_so_do_the_conv_heads():
    model = _build("multi_exit_l2w", backbone="mobilenetv3_small_100", head="conv", bn_momentum=0.01, bn_eps=1e-3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(n.startswith("heads.") for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)


@pytest.mark.parametrize("name", ["resnet18_l2w", "convnext_atto_l2w", "vit_tiny_l2w"])
def test_wrapped_backbones_take_drop_path_and_global_pool_as_timm_does(name):
    model = _build(name, drop_path_rate=0.1)
    assert max(getattr(m, "drop_prob", 0.0) for m in model.backbone.modules()) > 0  # timm's DropPath in the trunk
    pool = "max" if name != "vit_tiny_l2w" else "avg"
    model = _build(name, global_pool=pool)
    assert model.global_pool == pool
    with torch.no_grad():
        out = model.eval().forward_exits(_x(name))
    assert [o.shape for o in out] == [(2, 7)] * model.num_exits


@pytest.mark.parametrize("name", ALL)
def test_neutral_rates_are_accepted_everywhere(name):
    # 0.0 is neutral even where the backbone has no such argument (timm's ConvNeXt / ViT refuse drop_block_rate)
    model = _build(name, drop_path_rate=0.0, drop_block_rate=0.0)
    assert str(model) == str(_build(name))


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar"])
def test_own_families_take_global_pool(name):
    model = _build(name, global_pool="max")
    assert model.global_pool == "max"
    with torch.no_grad():
        assert all(o.shape == (2, 7) for o in model.eval().forward_exits(_x(name)))
    with pytest.raises(ValueError, match="unknown global_pool 'bogus'.*'avg'.*'max'"):
        _build(name, global_pool="bogus")


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar", "msdnet_l2w", "ranet_l2w"])
@pytest.mark.parametrize("key,what", [("drop_path_rate", "drop path"), ("drop_block_rate", "DropBlock")])
def test_own_families_refuse_drop_path_and_drop_block_naming_their_options(name, key, what):
    family = _family(name)
    with pytest.raises(ValueError, match=rf"{family} has no {what}.*: {key}=0.1 .*drop_rate.*global_pool.*"
                                         r"bn_momentum.*bn_eps"):
        _build(name, **{key: 0.1})


@pytest.mark.parametrize("name", ["msdnet_l2w_cifar_tiny", "ranet_l2w_cifar"])
def test_own_families_name_their_options_for_unknown_arguments(name):
    family = _family(name)
    with pytest.raises(TypeError, match=rf"{family} got unexpected arguments \['drop_connect_rate'\]: its options "
                                        r"are ") as err:
        _build(name, drop_connect_rate=0.2)
    options = str(err.value).split("its options are ")[1].split(", ")
    assert {"num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate", "drop_block_rate", "bn_momentum",
            "bn_eps"} <= set(options)


@pytest.mark.parametrize("name,takes", [
    ("resnet18_l2w", "drop_rate, drop_path_rate, drop_block_rate, global_pool"),
    ("convnext_atto_l2w", "drop_rate, drop_path_rate, global_pool"),
    ("vit_tiny_l2w", "drop_rate, drop_path_rate, global_pool"),
    ("multi_exit_l2w", "drop_rate, drop_path_rate, drop_block_rate, global_pool"),
])
def test_wrapped_backbones_refuse_what_timm_refuses_naming_what_they_take(name, takes):
    for key, value in (("bn_momentum", 0.01), ("bn_eps", 1e-3)):
        with pytest.raises(TypeError, match=rf"does not take {key}={value}: of timm's standard create_model "
                                            rf"arguments it takes {takes}; the multi-exit model's own options"):
            _build(name, **{key: value})
    if "drop_block_rate" not in takes:
        with pytest.raises(TypeError, match=rf"does not take drop_block_rate=0.1: .* it takes {takes}"):
            _build(name, drop_block_rate=0.1)
    else:  # timm's ResNet takes it, but its DropBlock cannot be traced into stages
        with pytest.raises(TypeError, match="drop_block_rate=0.1 cannot be split into exits: torch.fx cannot trace "
                                            "timm's DropBlock .* pass drop_block_rate=0"):
            _build(name, drop_block_rate=0.1)


def test_own_families_check_the_values():
    with pytest.raises(ValueError, match="drop_rate must be in"):
        _build("msdnet_l2w_cifar_tiny", drop_rate=1.0)
    with pytest.raises(ValueError, match="bn_eps must be > 0"):
        _build("ranet_l2w_cifar", bn_eps=0.0)
    with pytest.raises(ValueError, match="bn_momentum must be in"):
        _build("ranet_l2w_cifar", bn_momentum=2.0)

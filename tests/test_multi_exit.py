"""MultiExitWrapper: timm backbones as staged multi-exit models."""
import pytest
import timm
import torch
from torch import nn

import timm_l2w
from timm_l2w.flops import _counter_for
from timm_l2w.models.multi_exit import MultiExitWrapper

from test_ranet import assert_staged_matches_forward

# (registered name, kwargs, input size): tiny inputs keep the tests fast
FAMILIES = [
    ("resnet18_l2w", {}, 32),
    ("convnext_atto_l2w", {}, 32),
    ("vit_tiny_l2w", {"img_size": 32}, 32),
]


def _count(modules, run) -> float:
    """FLOPs (paper convention, same counters as exit_flops) of ``modules`` during ``run()``."""
    total = [0.0]

    def hook(m, i, o):
        total[0] += float(_counter_for(m)(m, i, o))

    handles = [m.register_forward_hook(hook) for m in modules if _counter_for(m) is not None]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


@pytest.mark.parametrize("name,kwargs,size", FAMILIES)
@pytest.mark.parametrize("head", ["linear", "conv"])
def test_registered_exits_staged_equals_forward(name, kwargs, size, head):
    model = timm.create_model(name, num_classes=7, head=head, **kwargs)
    assert model.num_exits == 4 and model.num_classes == 7
    assert_staged_matches_forward(model, torch.randn(3, 3, size, size), keep=torch.tensor([True, False, True]))


@pytest.mark.parametrize("name,kwargs,size", FAMILIES)
def test_flops_increasing_and_last_is_backbone_plus_heads(name, kwargs, size):
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    flops = timm_l2w.exit_flops(model, (3, size, size))
    assert all(b > a for a, b in zip(flops, flops[1:]))
    x = torch.zeros(1, 3, size, size)
    backbone = _count(model.backbone.modules(), lambda: model.backbone(x))  # plain timm forward, num_classes=0
    heads = _count(model.heads.modules(), lambda: model(x))
    assert heads > 0
    assert flops[-1] == pytest.approx(backbone + heads, rel=1e-9)


def test_attention_flops_counted():
    model = timm.create_model("vit_tiny_l2w", img_size=32, num_classes=5)
    attn = model.backbone.blocks[0].attn
    x = torch.zeros(1, 5, 192)  # 4 patches + class token
    assert _count(attn.modules(), lambda: attn(x)) == 2 * 5 * 5 * 192 + 5 * (192 * 576 + 576) + 5 * (192 * 192 + 192)


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("convnext_atto", {}), ("vit_tiny_patch16_224", {"img_size": 32})])
def test_plain_timm_state_dict_loads_into_trunk(name, kwargs):
    plain = timm.create_model(name, num_classes=0, **kwargs)
    wrapper = MultiExitWrapper(name, num_classes=3, **kwargs)
    wrapper.backbone.load_state_dict(plain.state_dict())  # unchanged, strict
    for a, b in zip(plain.state_dict().values(), wrapper.backbone.state_dict().values()):
        assert torch.equal(a, b)
    size = 32
    x = torch.randn(2, 3, size, size)
    plain.eval(), wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapper.trunk_features(x), plain.forward_features(x))
    # a full classifier state_dict (num_classes=1000) loads too, its classifier dropped
    full = timm.create_model(name, **kwargs)
    wrapper.load_backbone_state_dict(full.state_dict())


def test_any_timm_name_and_custom_exits():
    model = timm_l2w.multi_exit_model("resnet10t", exit_indices=(2, 4), num_classes=4, in_chans=1)
    assert model.num_exits == 2 and model.in_chans == 1
    outs = model(torch.randn(2, 1, 32, 32))
    assert [o.shape for o in outs] == [(2, 4), (2, 4)]
    model.reset_classifier(6)
    assert model(torch.randn(2, 1, 32, 32))[0].shape == (2, 6)


def test_wrapper_trains():
    model = timm.create_model("convnext_atto_l2w", num_classes=3)
    loss = sum(nn.functional.cross_entropy(o, torch.tensor([0, 2])) for o in model(torch.randn(2, 3, 32, 32)))
    loss.backward()
    assert all(h.weight.grad is not None for h in model.modules() if isinstance(h, nn.Linear))


def test_bad_inputs():
    with pytest.raises(ValueError, match="out of range.*0..4"):
        MultiExitWrapper("resnet18", exit_indices=(1, 5))
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiExitWrapper("resnet18", exit_indices=(3, 2))
    with pytest.raises(ValueError, match="head must be"):
        MultiExitWrapper("resnet18", head="mlp")
    with pytest.raises(TypeError, match="no timm feature API"):
        MultiExitWrapper(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(TypeError, match="no staged feature API"):
        MultiExitWrapper("efficientnet_b0")
    vit = timm.create_model("vit_tiny_l2w", img_size=32, num_classes=3)
    with pytest.raises(ValueError, match="img_size=64"):
        vit(torch.randn(1, 3, 64, 64))

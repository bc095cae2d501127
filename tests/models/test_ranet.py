"""RANet: registry, staged forward, FLOPs per exit, bad input."""
import pytest
import timm
import torch

import timm_l2w
from tests.helpers import assert_staged_matches_forward
from tests.helpers import small_ranet as _small
from timm_l2w.models.ranet import RANet


def test_cifar_registered_exits_and_staged_equals_forward():
    model = timm.create_model("ranet_l2w_cifar", num_classes=10)
    assert model.num_exits == 6 and model.num_classes == 10
    assert_staged_matches_forward(model, torch.randn(2, 3, 32, 32))
    # exits lowest-resolution flow first: two per flow
    assert [f for f, _ in model.exit_plan] == [0, 0, 1, 1, 2, 2]


def test_staged_with_sample_dropping_matches_forward():
    assert_staged_matches_forward(_small(), torch.randn(4, 3, 32, 32), keep=torch.tensor([True, False, True, True]))


def test_imagenet_config_builds_and_flops_increase():
    model = timm.create_model("ranet_l2w")
    assert model.num_exits == 8 and model.scale_list == [1, 2, 3, 4]
    flops = timm_l2w.exit_flops(model)  # 3x224x224 from the pretrained cfg
    assert all(b > a for a, b in zip(flops, flops[1:]))
    assert 1e8 < flops[0] and flops[-1] < 5e9


def test_cifar_flops_increase_and_heads_counted():
    model = timm.create_model("ranet_l2w_cifar")
    flops = timm_l2w.exit_flops(model)
    assert all(b > a for a, b in zip(flops, flops[1:]))
    # the first exit's head alone: two 3x3 stride-2 convs (8x8 -> 4x4 -> 2x2), ReLUs, 2x2 pool, linear
    c = model.head_in_chs[0]
    head = 4 * 4 * 128 * c * 9 + 4 * 4 * 128 + 2 * 2 * 128 * 128 * 9 + 2 * 2 * 128 + 128 * 4 + 128 * 100 + 100
    assert flops[0] > head


def test_shared_start_level_scale_list():
    model = _small(scale_list=(1, 2, 3, 3), gr_factor=(2, 1, 1, 1), bn_factor=(2, 1, 1, 1))
    assert model.num_exits == 2 + 2 + 2 + 2
    assert_staged_matches_forward(model, torch.randn(3, 3, 20, 20), keep=torch.tensor([True, False, True]))


def test_reset_classifier_and_backward():
    model = _small()
    model.reset_classifier(3)
    outs = model(torch.randn(2, 3, 32, 32))  # train mode: every exit
    assert len(outs) == model.num_exits and all(o.shape == (2, 3) for o in outs)
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale_list must start at 1"):
        RANet(scale_list=(2, 3))
    with pytest.raises(ValueError, match="gr_factor must list 3"):
        RANet(gr_factor=(4, 2))
    with pytest.raises(ValueError, match="need 5..12"):
        _small()(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="need 5..12"):
        _small()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="in_chans=1"):
        _small()(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="block_step must be >= 1"):
        RANet(block_step=0)
    with pytest.raises(ValueError, match="stage index 6 out of range"):
        _small().forward_stage(6, torch.randn(1, 3, 32, 32))

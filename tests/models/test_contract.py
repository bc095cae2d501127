import pytest
import torch
from torch import nn

import timm_l2w
from tests.helpers import TinyMultiExit
from timm_l2w.models.base import select_samples, unwrap_model


def test_forward_exits_returns_tuple_and_stages_match(tiny_model):
    x = torch.randn(5, 1, 8, 8)
    tiny_model.eval()
    outs = tiny_model.forward_exits(x)
    assert isinstance(outs, tuple) and len(outs) == tiny_model.num_exits
    state = x
    for k in range(tiny_model.num_exits):
        state, logits = tiny_model.forward_stage(k, state)
        assert torch.equal(logits, outs[k])


def test_exit_flops_counts_paper_convention():
    model = TinyMultiExit(num_exits=2, num_classes=3, in_chans=1, width=2)
    flops = timm_l2w.exit_flops(model, (1, 4, 4))
    # stage 1: conv 1->2 (3x3, 16 positions) + relu (2*16) + adaptive pool (2*16) + linear 2->3 (+bias)
    stage1 = 16 * 2 * 1 * 9 + 32 + 32 + (2 * 3 + 3)
    stage2 = 16 * 4 * 2 * 9 + 64 + 64 + (4 * 3 + 3)
    assert flops == [stage1, stage1 + stage2]


def test_exit_flops_rejects_non_contract_model():
    with pytest.raises(TypeError, match="multi-exit contract"):
        timm_l2w.exit_flops(nn.Linear(2, 2), (1, 2, 2))


def test_wrong_channels_clear_error(tiny_model):
    with pytest.raises(ValueError, match="in_chans=3"):
        tiny_model(torch.randn(2, 3, 8, 8))


def test_select_samples_nested_state():
    state = [torch.arange(4), (torch.arange(8).view(4, 2), {"a": torch.arange(4) * 2})]
    kept = select_samples(state, torch.tensor([True, False, True, False]))
    assert kept[0].tolist() == [0, 2]
    assert kept[1][0].tolist() == [[0, 1], [4, 5]]
    assert kept[1][1]["a"].tolist() == [0, 4]


def test_unwrap_model_dataparallel(tiny_model):
    assert unwrap_model(nn.DataParallel(tiny_model)) is tiny_model


def test_check_multi_exit_output():
    with pytest.raises(TypeError, match="forward_exits"):
        timm_l2w.models.base.check_multi_exit_output(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected 3"):
        timm_l2w.models.base.check_multi_exit_output([torch.zeros(2, 3)], num_exits=3)

"""FLOPs are counted at an image size: a count made at another size is refused, not silently wrong
(evaluation's FLOPs and the early-exit budget)."""
from __future__ import annotations

import pytest
import timm
import torch

import timm_l2w


def _outputs(model, size: int, n: int = 8):
    torch.manual_seed(0)
    loader = [(torch.randn(n, 3, size, size), torch.randint(0, 10, (n,)))]
    return timm_l2w.collect_exit_outputs(model, loader)


def test_flops_counted_at_another_image_size_are_refused_not_silently_wrong():
    model = timm.create_model("resnet18_l2w", num_classes=10)  # configured for 224x224, run at 32x32
    heldout, test = _outputs(model, 32), _outputs(model, 32)
    assert test.input_size == (3, 32, 32)
    with pytest.raises(ValueError, match=r"exit_flops\(model, input_size=\(3, 32, 32\)\)"):
        timm_l2w.budgeted_evaluation(heldout, test, timm_l2w.exit_flops(model))
    with pytest.raises(ValueError, match="224x224 images but the outputs come from 3x32x32"):
        timm_l2w.anytime_metrics(test, timm_l2w.exit_flops(model))
    flops = timm_l2w.exit_flops(model, test.input_size)
    assert [round(f / 1e6, 1) for f in flops] == [11.9, 20.3, 28.7, 37.1]  # not 584 / 996 / 1407 / 1818
    result = timm_l2w.budgeted_evaluation(heldout, test, flops)
    assert float(result.expected_flops.max()) <= flops[-1] + 1e-6


def test_early_exit_budget_refuses_flops_counted_at_another_size():
    model = timm.create_model("resnet18_l2w", num_classes=10)
    calibration = _outputs(model, 32)
    with pytest.raises(ValueError, match=r"exit_flops\(model, input_size=\(3, 32, 32\)\)"):
        timm_l2w.EarlyExitPredictor.from_flops_budget(model, calibration, timm_l2w.exit_flops(model), 30e6)
    predictor = timm_l2w.EarlyExitPredictor.from_flops_budget(
        model, calibration, timm_l2w.exit_flops(model, calibration.input_size), 30e6)
    assert predictor is not None

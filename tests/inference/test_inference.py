"""Real early-exit inference equals the simulated budgeted decision and skips the work of exited samples."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from tests.helpers import CountingModel, TinyMultiExit
from timm_l2w.evaluation import ExitOutputs, budgeted_evaluation
from timm_l2w.exits import calibrate_thresholds, exit_by_threshold, exit_distribution
from timm_l2w.inference import EarlyExitPredictor


def full_forward_outputs(model, x, y=None) -> ExitOutputs:
    model.eval()
    with torch.no_grad():
        logits = model.forward_exits(x)
    return ExitOutputs.from_logits(logits, torch.zeros(len(x), dtype=torch.long) if y is None else y)


def assert_matches_simulation(model, calib_x, test_x, qs):
    calib = full_forward_outputs(model, calib_x)
    full = full_forward_outputs(model, test_x)
    seen_exits = set()
    for q in qs:
        T = calibrate_thresholds(calib.confidences, exit_distribution(q, calib.num_exits))
        simulated = exit_by_threshold(full.confidences, T)
        got = EarlyExitPredictor(model, T).predict(test_x)
        assert torch.equal(got.exit_index, simulated), f"q={q}"
        rows = torch.arange(len(test_x))
        assert torch.equal(got.predictions, full.predictions[rows, simulated])
        assert torch.allclose(got.confidences, full.confidences[rows, simulated], atol=1e-6)
        seen_exits |= set(simulated.tolist())
    assert len(seen_exits) > 1, "budgets should send samples to several exits"


def test_matches_simulation_tiny():
    model = TinyMultiExit(num_exits=4, num_classes=5, in_chans=3, width=6)
    assert_matches_simulation(model, torch.randn(40, 3, 12, 12), torch.randn(33, 3, 12, 12), [0.3, 0.75, 1.0, 1.6])


def test_matches_simulation_msdnet_cifar():
    model = timm.create_model("msdnet_l2w_cifar", num_classes=10)
    assert_matches_simulation(model, torch.randn(24, 3, 32, 32), torch.randn(16, 3, 32, 32), [0.3, 0.75, 1.5])


def test_all_exit_first_never_runs_stage_two():
    model = CountingModel(num_exits=3)
    got = EarlyExitPredictor(model, [0.0, math.inf, -math.inf]).predict(torch.randn(7, 1, 8, 8))
    assert model.calls == [(0, 7)]
    assert got.exit_index.tolist() == [0] * 7


def test_later_stages_only_see_remaining_samples():
    model = CountingModel(num_exits=3)
    x = torch.randn(30, 1, 8, 8)
    full = full_forward_outputs(model, x)
    T = calibrate_thresholds(full.confidences, [0.3, 0.4, 0.3])
    model.calls.clear()
    got = EarlyExitPredictor(model, T).predict(x)
    counts = torch.bincount(got.exit_index, minlength=3).tolist()
    assert model.calls == [(0, 30), (1, 30 - counts[0]), (2, counts[2])]
    assert counts[0] > 0 and counts[1] > 0


def test_chunked_equals_whole_batch(tiny_model):
    x = torch.randn(21, 1, 8, 8)
    T = calibrate_thresholds(full_forward_outputs(tiny_model, x).confidences, [0.3, 0.3, 0.4])
    predictor = EarlyExitPredictor(tiny_model, T)
    whole, chunked = predictor.predict(x), predictor.predict(x, batch_size=4)
    assert torch.equal(whole.exit_index, chunked.exit_index) and torch.equal(whole.predictions, chunked.predictions)
    for bad in (0, float("nan"), 2.5, True):  # a clear error naming the argument, not a failure inside split
        with pytest.raises(ValueError, match="batch_size"):
            predictor.predict(x, batch_size=bad)


def test_from_flops_budget(tiny_model):
    calib = full_forward_outputs(tiny_model, torch.randn(60, 1, 8, 8), torch.randint(0, 4, (60,)))
    flops = [1.0, 2.0, 3.0]
    predictor = EarlyExitPredictor.from_flops_budget(tiny_model, calib, flops, budget=1.8)
    res = budgeted_evaluation(calib, calib, flops)
    chosen = [b for b in range(len(res)) if torch.equal(res.thresholds[b], predictor.thresholds)]
    assert chosen and all(res.heldout_expected_flops[b] <= 1.8 for b in chosen)
    fitting = res.heldout_top1[res.heldout_expected_flops <= 1.8]
    assert res.heldout_top1[chosen[0]] == fitting.max()
    with pytest.raises(ValueError, match="raise the budget"):
        EarlyExitPredictor.from_flops_budget(tiny_model, calib, flops, budget=0.5)
    by_q = EarlyExitPredictor.from_distribution(tiny_model, calib, 0.75)
    assert torch.equal(by_q.thresholds, calibrate_thresholds(calib.confidences, exit_distribution(0.75, 3)))


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="one threshold per exit"):
        EarlyExitPredictor(tiny_model, [0.5, 0.5])
    with pytest.raises(TypeError, match="multi-exit contract"):
        EarlyExitPredictor(torch.nn.Linear(3, 3), [0.5])
    predictor = EarlyExitPredictor(tiny_model, [0.5, 0.5, -math.inf])
    with pytest.raises(ValueError, match="channel"):
        predictor.predict(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="empty batch"):
        predictor.predict(torch.randn(0, 1, 8, 8))

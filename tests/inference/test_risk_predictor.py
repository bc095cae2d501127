"""``EarlyExitPredictor.from_risk``: the risk-controlled choice as a predictor whose real early exits are the ones
the risk was computed for, saved with its guarantee (docs/risk.md)."""
from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import TinyMultiExit
from timm_l2w.evaluation import ExitOutputs
from timm_l2w.evaluation.risk import risk_controlled_choice, risk_losses
from timm_l2w.exits import exit_by_threshold
from timm_l2w.inference import EarlyExitPredictor

FLOPS = [1.0, 2.0, 3.0, 4.0]


def model_images_outputs(targets_seed: int = 0):
    torch.manual_seed(0)
    model = TinyMultiExit(num_exits=4, num_classes=5, in_chans=3, width=6).eval()
    x = torch.randn(400, 3, 12, 12)
    with torch.no_grad():
        logits = model.forward_exits(x)
    targets = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(targets_seed))
    return model, x, ExitOutputs.from_logits(logits, targets)


def test_from_risk_is_the_chosen_candidate_and_its_real_exits_match_the_bounded_ones(tmp_path):
    model, x, outputs = model_images_outputs()
    predictor = EarlyExitPredictor.from_risk(model, outputs, FLOPS, max_risk=0.6)
    choice = risk_controlled_choice(outputs, FLOPS, 0.6)
    assert choice.chosen > 0  # a cheaper candidate than the first passes
    assert torch.equal(predictor.thresholds, choice.thresholds[choice.chosen])
    assert predictor.budget == choice.budget() and predictor.budget["risk_upper_bound"] <= 0.6
    got = predictor.predict(x)
    assert got.exit_fractions(4).tolist() == pytest.approx(predictor.calibration_fractions)
    simulated = risk_losses(outputs, exit_by_threshold(outputs.confidences, predictor.thresholds), "disagreement")
    assert torch.equal((got.predictions != outputs.predictions[:, -1]).double(), simulated)  # the loss it bounded
    loaded = EarlyExitPredictor.load(predictor.save(tmp_path / "policy.json"), model)
    assert loaded.budget == predictor.budget and torch.equal(loaded.thresholds, predictor.thresholds)
    # disagreement needs no labels: other targets, the same choice
    _, _, relabelled = model_images_outputs(targets_seed=1)
    assert torch.equal(EarlyExitPredictor.from_risk(model, relabelled, FLOPS, 0.6).thresholds, predictor.thresholds)


def test_from_risk_with_patience_and_the_top1_drop():
    model, x, outputs = model_images_outputs()
    predictor = EarlyExitPredictor.from_risk(model, outputs, FLOPS, 0.3, confidence=0.8, risk="top1-drop",
                                             rule="patience")
    assert predictor.rule == "patience" and predictor.thresholds is None and 1 <= predictor.patience <= 4
    assert predictor.budget["risk"] == "top1-drop" and predictor.budget["n"] == 400
    drop = (~(predictor.predict(x).predictions == outputs.targets)).double().mean() \
        - (~outputs.correct[:, -1]).double().mean()
    assert float(drop) == pytest.approx(predictor.budget["heldout_risk"])  # every held-out image bounded the risk


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_risk=0.0), "max_risk must be in (0, 1)"),
    (dict(max_risk=0.1, confidence=1.2), "confidence must be in (0, 1)"),
    (dict(max_risk=0.1, risk="accuracy"), "unknown risk 'accuracy': use one of 'disagreement', 'top1-drop'"),
    (dict(max_risk=1e-4), "no exit policy keeps the disagreement risk within 0.0001"),
])
def test_from_risk_refuses_bad_requests(kwargs, message):
    model, _, outputs = model_images_outputs()
    with pytest.raises(ValueError, match=re.escape(message)):
        EarlyExitPredictor.from_risk(model, outputs, FLOPS, **kwargs)

"""``timm-l2w eval --max-risk EPS --confidence 1-DELTA --risk ...``: the policy carries its risk guarantee, exactly one
budget is taken, and an EPS no candidate can certify is a one-line error naming what to change (docs/risk.md)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import register_tiny
from timm_l2w.cli.eval import main as eval_main

TINY = register_tiny()
BASE = ["--model", TINY, "--dataset", "digits", "--no-progress", "--cpu"]


def test_max_risk_writes_a_policy_with_its_guarantee(tmp_path, capsys):
    out = tmp_path / "ev"
    assert eval_main(BASE + ["--max-risk", "0.5", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    policy = json.loads((out / f"{TINY}_confidence_disagreement_0.5_conf0.9_policy.json").read_text())
    budget = policy["budget"]
    assert set(budget) == {"risk", "max_risk", "confidence", "risk_upper_bound", "heldout_risk", "n"}
    assert (budget["risk"], budget["max_risk"], budget["confidence"]) == ("disagreement", 0.5, 0.9)
    assert budget["heldout_risk"] <= budget["risk_upper_bound"] <= 0.5
    assert budget["n"] == 150  # digits' 300 held-out images: half fit the thresholds, half bound the risk
    assert policy["rule"] == "confidence" and policy["expected_flops"] < policy["flops"][-1]
    bound = f"{budget['risk_upper_bound']:.4g}"
    assert f"risk guarantee: disagreement <= 0.5 with probability >= 0.9 (upper bound {bound}" in printed


def test_max_risk_with_the_patience_rule_and_the_top1_drop(tmp_path):
    out = tmp_path / "ev"
    torch.manual_seed(0)
    assert eval_main(BASE + ["--max-risk", "0.2", "--confidence", "0.95", "--risk", "top1-drop",
                             "--exit-rule", "patience", "--output", str(out)]) == 0
    policy = json.loads((out / f"{TINY}_patience_top1-drop_0.2_conf0.95_policy.json").read_text())
    assert policy["rule"] == "patience" and policy["thresholds"] is None and 1 <= policy["patience"] <= 3
    assert policy["budget"]["risk"] == "top1-drop" and policy["budget"]["confidence"] == 0.95
    assert policy["budget"]["n"] == 300  # patience values are fixed in advance: every held-out image bounds the risk
    assert policy["budget"]["risk_upper_bound"] <= 0.2


@pytest.mark.parametrize("flags, message", [
    (["--q", "0.5", "--max-risk", "0.1"], "pass exactly one of --q"),
    (["--flops-budget", "1M", "--max-risk", "0.1"], "pass exactly one of --q"),
    (["--confidence", "0.95"], "--confidence and --risk go with --max-risk EPS"),
    (["--q", "0.5", "--risk", "top1-drop"], "--confidence and --risk go with --max-risk EPS"),
    (["--max-risk", "1.5"], "max_risk must be in (0, 1), got 1.5 (a fraction of the images: 0.05 is 5%)"),
    (["--max-risk", "0.1", "--confidence", "1"], "confidence must be in (0, 1), got 1"),
])
def test_risk_flags_are_checked_before_any_work(flags, message, capsys):
    assert eval_main(["--model", TINY, "--output", "unused", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_risk_no_candidate_can_certify_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "ev"
    assert eval_main(BASE + ["--max-risk", "0.001", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-l2w eval: error: no exit policy keeps the disagreement risk within 0.001 at "
                          "confidence 0.9: the most conservative candidate's upper bound is ")
    assert "raise --max-risk / max_risk to at least" in err and "Traceback" not in err
    assert not list(out.glob("*_policy.json"))

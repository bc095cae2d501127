"""``timm-l2w eval --flops-budget`` takes ``3000000``, ``3e6`` and ``3M`` alike and its help says so (and that eval
prints MFLOPs)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from timm_l2w.cli.common import flops_amount
from timm_l2w.cli.eval import main as eval_main


@pytest.mark.parametrize("text", ["3000000", "3e6", "3E6", "3M", "3m", "3 M", "3MFLOPs", "3 mflops", "3000k",
                                  "0.003G", "3e6 FLOPs"])
def test_a_flops_count_takes_plain_scientific_and_suffixed_forms(text):
    assert flops_amount(text) == pytest.approx(3e6, rel=1e-12)


@pytest.mark.parametrize("text", ["", "M", "3X", "3MM", "-3M", "0", "abc", "nan", "inf", "1e400", "3e"])
def test_a_bad_flops_count_says_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a positive FLOPs count: write 3000000, 3e6 or 3M"):
        flops_amount(text)


def test_eval_help_names_the_unit_and_its_forms(capsys):
    with pytest.raises(SystemExit) as done:
        eval_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "3000000, 3e6 and 3M are the same budget" in text and "in MFLOPs" in text


def test_eval_rejects_a_bad_budget_before_any_work(capsys):
    with pytest.raises(SystemExit) as done:
        eval_main(["--model", "msdnet_l2w_cifar_tiny", "--flops-budget", "3X", "--output", "unused"])
    assert done.value.code == 2
    assert "argument --flops-budget: '3X' is not a positive FLOPs count" in capsys.readouterr().err


def test_eval_writes_the_same_policy_for_2_5M_and_2500000(tmp_path, capsys):
    policies = []
    for i, budget in enumerate(["2.5M", "2500000"]):
        out = tmp_path / str(i)
        torch.manual_seed(0)  # the same random weights for both runs
        assert eval_main(["--model", "msdnet_l2w_cifar_tiny", "--model-kwargs", "n_blocks=2", "--dataset", "digits",
                          "--flops-budget", budget, "--output", str(out), "--no-progress", "--cpu"]) == 0
        policies.append(json.loads((out / "msdnet_l2w_cifar_tiny_confidence_flops2.5M_policy.json").read_text()))
    assert "MFLOPs" in capsys.readouterr().out  # the unit a user reads the budget off
    assert policies[0]["budget"] == policies[1]["budget"] == {"flops": 2.5e6}
    assert policies[0]["thresholds"] == policies[1]["thresholds"]
    assert policies[0]["expected_flops"] <= 2.5e6

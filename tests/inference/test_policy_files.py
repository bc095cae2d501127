"""``timm-l2w eval`` policy files do not collide: the rule and the budget are in the name
(``<name>_<rule>_<budget>_policy.json``), an existing file is refused (before the work) unless ``--overwrite``,
and the policy records the digest of the checkpoint's weights."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import register_tiny, tiny_net
from timm_l2w.checkpoint import save_safetensors
from timm_l2w.cli.eval import main as eval_main
from timm_l2w.files import weights_digest
from timm_l2w.inference.policy import policy_file_name


@pytest.mark.parametrize("rule, budget, name", [
    ("confidence", {"q": 0.5}, "net_confidence_q0.5_policy.json"),
    ("entropy", {"q": 2.0}, "net_entropy_q2_policy.json"),
    ("patience", {"flops": 3e6}, "net_patience_flops3M_policy.json"),
    ("confidence", {"flops": 2.5e9}, "net_confidence_flops2.5G_policy.json"),
    ("confidence", {"flops": 1500.0}, "net_confidence_flops1.5k_policy.json"),
    ("confidence", {"flops": 800.0}, "net_confidence_flops800_policy.json"),
    ("confidence", {"latency_ms": 4.5, "batch_size": 1}, "net_confidence_latency4.5ms_batch1_policy.json"),
])
def test_the_policy_file_name_holds_rule_and_budget(rule, budget, name):
    assert policy_file_name("net", rule, budget) == name


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(3)
    model = tiny_net(num_classes=10)
    return save_safetensors(model, tmp_path / "run" / "model.safetensors"), weights_digest(model)


def _eval(checkpoint, out, *flags):
    return eval_main([str(checkpoint), "--model", register_tiny(), "--dataset", "digits", "--output", str(out),
                      "--name", "tiny", "--no-progress", "--cpu", *flags])


def test_two_evals_keep_two_policies_and_a_third_needs_overwrite(checkpoint, tmp_path, capsys):
    path, digest = checkpoint
    out = tmp_path / "eval"
    assert _eval(path, out, "--q", "0.5") == 0
    assert _eval(path, out, "--flops-budget", "3M") == 0
    q_file, flops_file = out / "tiny_confidence_q0.5_policy.json", out / "tiny_confidence_flops3M_policy.json"
    q_policy, flops_policy = json.loads(q_file.read_text()), json.loads(flops_file.read_text())
    assert q_policy["budget"] == {"q": 0.5} and flops_policy["budget"] == {"flops": 3e6}
    assert q_policy["weights_sha256"] == flops_policy["weights_sha256"] == digest  # the checkpoint's weights
    assert sorted(p.name for p in out.glob("*_policy.json")) == sorted([q_file.name, flops_file.name])
    capsys.readouterr()

    before = q_file.stat().st_mtime_ns
    assert _eval(path, out, "--q", "0.5") == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"timm-l2w eval: error: {q_file} exists (the policy of an earlier eval): pass "
                                    "--overwrite to replace it, or --output / --name for another file")
    assert "exit 1:" not in captured.out  # refused before evaluating
    assert q_file.stat().st_mtime_ns == before

    q_policy["thresholds"] = [0.0, 0.0, "inf"]
    q_file.write_text(json.dumps(q_policy))
    assert _eval(path, out, "--q", "0.5", "--overwrite") == 0
    assert json.loads(q_file.read_text())["thresholds"] != [0.0, 0.0, "inf"]  # written again
    assert f"wrote policy: {q_file}" in capsys.readouterr().out

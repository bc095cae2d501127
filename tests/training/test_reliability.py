"""Reliability of `timm-l2w train` (issue 7): SIGKILL at named points and exact resume, graceful
SIGTERM/SIGINT, non-finite meta/training values skipped without touching any state, bitwise determinism.

Faults are placed deterministically with the ``TIMM_L2W_FAULT=POINT:STEP:SIGNAL`` test hook of
``timm_l2w.training`` (the process signals itself at that point), so no test depends on timing.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm_l2w.meta.step as meta_mod
from tests.helpers import register_tiny, root_on_pythonpath, saved_weights
from timm_l2w.cli.train import main
from timm_l2w.meta import L2W
from timm_l2w.training.checkpoints import find_checkpoint

TINY = register_tiny()
# 300 training images, batch 32: 9 steps per epoch; 14 steps = 1 epoch and 5 steps
ARGS = ["--model", TINY, "--no-progress", "--batch-size", "32", "--lr", "0.05", "--held-out", "1197",
        "--no-eval", "--max-steps", "14", "--checkpoint-every", "3", "--warmup-steps", "3"]
RUNNER = ("import sys; from tests.helpers import register_tiny; register_tiny(); "
          "from timm_l2w.cli.train import main; sys.exit(main(sys.argv[1:]))")


def _cli(args, fault=None, timeout=300):
    """A real `timm-l2w train` process (tiny model registered first), one thread."""
    env = root_on_pythonpath(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    env.pop("TIMM_L2W_FAULT", None)
    if fault:
        env["TIMM_L2W_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", RUNNER] + list(args), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _weights(out: Path) -> dict:
    return saved_weights(out, require_predictor=True)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b) and any(k.startswith("wp.") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ in {diff[:5]}"


def _complete_steps(out: Path) -> list:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run (in this process; same single-thread CPU maths as the CLI)."""
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    assert main(ARGS + ["--output", str(out)]) == 0
    return out


def test_sigkill_at_each_point_then_resume_gives_bitwise_identical_weights(straight, tmp_path):
    out = tmp_path / "killed"
    args = ARGS + ["--output", str(out)]
    ckpts = out / "checkpoints"

    # 1. killed in the middle of step 6 (between forward and optimizer step): checkpoint 3 is the latest
    proc = _cli(args, fault="update:5:KILL")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert find_checkpoint("auto", out).name == "step_00000003"

    # 2. resumed, then killed half-way through writing checkpoint 6: the temporary folder is never "latest"
    proc = _cli(args + ["--resume", "auto"], fault="checkpoint:6:KILL")
    assert proc.returncode == -9, proc.stderr[-2000:]
    half = ckpts / ".tmp-step_00000006"
    assert half.is_dir() and (half / "model.safetensors").is_file() and not (half / "COMPLETE").exists()
    assert _complete_steps(out) == ["step_00000003"]
    assert find_checkpoint("auto", out).name == "step_00000003"
    assert find_checkpoint(str(ckpts), out).name == "step_00000003"

    # 3. resumed, then killed between epochs: epoch 1 logged, its checkpoint (step 9) not yet written
    proc = _cli(args + ["--resume", "auto"], fault="epoch_end:9:KILL")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in json.loads((out / "log.json").read_text())] == [9]
    assert not half.exists()  # the leftover of the killed checkpoint write was cleaned up on resume
    assert find_checkpoint("auto", out).name == "step_00000006"

    # 4. resumed to the end
    proc = _cli(args + ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_weights(straight), _weights(out))
    log_a = json.loads((straight / "log.json").read_text())
    log_b = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [9, 14]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-9)
    assert not list(ckpts.glob(".*"))  # no temporary or half-deleted folders left


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_sigterm_sigint_save_a_checkpoint_exit_nonzero_and_resume_exactly(straight, tmp_path, sig, code):
    out = tmp_path / sig
    args = ARGS + ["--output", str(out)]
    proc = _cli(args, fault=f"update:4:{sig}")  # arrives during step 5: that step finishes, then it stops
    assert proc.returncode == code, proc.stderr[-2000:]
    assert f"stopped by SIG{sig} at step 5" in proc.stderr and "--resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert find_checkpoint("auto", out).name == "step_00000005"
    assert not (out / "model.safetensors").exists()
    proc = _cli(args + ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(_weights(straight), _weights(out))


def test_same_seed_gives_bitwise_identical_weights_and_another_seed_does_not(tmp_path):
    args = ARGS[:-6] + ["--max-steps", "5"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(args + ["--seed", str(seed), "--output", str(tmp_path / name)]) == 0
        runs[name] = _weights(tmp_path / name)
    _assert_same(runs["a"], runs["b"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


# ----------------------------------------------------------------------------- numerical faults


def _poison_meta(monkeypatch, calls, what):
    """Make the meta steps numbered in ``calls`` (0-based) give a NaN meta loss or NaN meta gradient."""
    real = meta_mod.meta_step
    count = {"n": 0}

    def poisoned(model, optimizer, weight_net, *a, **kw):
        result = real(model, optimizer, weight_net, *a, **kw)
        n, count["n"] = count["n"], count["n"] + 1
        if calls == "all" or n in calls:
            if what == "loss":
                result.meta_loss = torch.tensor(float("nan"))
            else:
                next(weight_net.parameters()).grad[0, 0] = float("inf")
        return result

    monkeypatch.setattr(meta_mod, "meta_step", poisoned)
    return count


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_meta_step_leaves_predictor_and_meta_optimizer_untouched(tiny_model, monkeypatch, what):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    l2w = L2W(tiny_model, opt, eps=0.8, hidden_sizes=(8,), meta_lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))

    def one_update():
        for xt, yt in l2w.split(x, y):  # the first half only: one meta step
            l2w.loss(tiny_model(xt), yt)
            break

    one_update()  # a good meta step first, so the meta optimizer has state to protect
    net_before = copy.deepcopy(l2w.weight_net.state_dict())
    opt_before = copy.deepcopy(l2w.meta_optimizer.state_dict())
    _poison_meta(monkeypatch, {0}, what)
    one_update()
    assert l2w.last_meta_skipped and l2w.meta_skipped == 1
    assert all(torch.equal(net_before[k], v) for k, v in l2w.weight_net.state_dict().items())
    opt_after = l2w.meta_optimizer.state_dict()
    for pid, st in opt_before["state"].items():
        assert all(torch.equal(torch.as_tensor(st[k]), torch.as_tensor(opt_after["state"][pid][k])) for k in st)
    assert all(t.grad is None for t in l2w.weight_net.parameters())
    one_update()  # the next (finite) meta step updates the predictor again
    assert not l2w.last_meta_skipped and l2w.meta_skipped == 1
    assert any(not torch.equal(net_before[k], v) for k, v in l2w.weight_net.state_dict().items())


def test_train_counts_skipped_meta_updates_in_the_log(tmp_path, monkeypatch):
    count = _poison_meta(monkeypatch, {1, 2}, "loss")
    out = tmp_path / "run"
    assert main(ARGS[:-6] + ["--max-steps", "3", "--max-nonfinite", "3", "--output", str(out)]) == 0
    row = json.loads((out / "log.json").read_text())[-1]
    assert count["n"] == 6 and row["skipped_meta_updates"] == 2 and row["skipped_updates"] == 0
    assert row["meta_loss"] == row["meta_loss"]  # the NaN meta losses are not averaged into the log


def test_train_stops_after_max_nonfinite_meta_steps_in_a_row(tmp_path, monkeypatch, capsys):
    _poison_meta(monkeypatch, "all", "grad")
    out = tmp_path / "run"
    code = main(ARGS[:-6] + ["--max-steps", "6", "--max-nonfinite", "3", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and "3 non-finite losses in a row (latest: the meta loss or meta gradient)" in err, err
    assert "--max-nonfinite" in err and "Traceback" not in err


def test_skipped_training_update_leaves_model_bn_stats_and_optimizer_untouched(tmp_path, monkeypatch):
    """Step 2's two updates get a NaN loss: checkpoints 1 and 2 must hold identical model and optimizer."""
    import timm_l2w.weighting as weighting

    real = weighting.exit_losses
    calls = {"n": 0}

    def poisoned(outputs, target, *a, **kw):
        losses = real(outputs, target, *a, **kw)
        if any(o.requires_grad for o in outputs):  # the training losses (not the logging ones)
            calls["n"] += 1
            if calls["n"] in (3, 4):
                losses = losses + float("nan")
        return losses

    monkeypatch.setattr(weighting, "exit_losses", poisoned)
    out = tmp_path / "run"
    args = ARGS[:-6] + ["--weighting", "uniform", "--max-steps", "3", "--checkpoint-every", "1",
                        "--keep-checkpoints", "5", "--output", str(out)]
    assert main(args) == 0
    c1, c2, c3 = (out / "checkpoints" / f"step_{i:08d}" for i in (1, 2, 3))
    m1, m2, m3 = (load_file(c / "model.safetensors") for c in (c1, c2, c3))
    assert all(torch.equal(m1[k], m2[k]) for k in m1)  # weights and BN running stats
    assert any(not torch.equal(m2[k], m3[k]) for k in m2)  # step 3 trained again
    o1, o2 = (torch.load(c / "state" / "optimizer.bin", weights_only=True) for c in (c1, c2))
    for pid, st in o1["state"].items():
        assert torch.equal(st["momentum_buffer"], o2["state"][pid]["momentum_buffer"])
    assert json.loads((out / "log.json").read_text())[-1]["skipped_updates"] == 2

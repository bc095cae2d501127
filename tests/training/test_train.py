"""`timm-l2w train`: both weightings, logs and checkpoints, exact resume, bf16, clear errors."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, register_tiny, saved_weights
from timm_l2w.cli.train import main
from timm_l2w.training.checkpoints import find_checkpoint

TINY = register_tiny()
BASE = ["--model", TINY, "--no-progress", "--batch-size", "32", "--lr", "0.05"]


@pytest.mark.parametrize("weighting", ["l2w", "uniform"])
def test_short_run_writes_everything_and_loss_goes_down(tmp_path, weighting):
    out = tmp_path / weighting
    code = main(BASE + ["--weighting", weighting, "--epochs", "3", "--output", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"])
    assert all(math.isfinite(float(r[f"loss_{k}"])) and 0 <= float(r[f"acc_{k}"]) <= 100
               for r in rows for k in (1, 2, 3))
    assert json.loads((out / "log.json").read_text())[-1]["step"] == int(rows[-1]["step"])
    if weighting == "l2w":
        assert all(math.isfinite(float(r["meta_loss"])) for r in rows)
        assert (out / "weight_predictor.safetensors").is_file()
    else:
        assert rows[0]["meta_loss"] == "" and not (out / "weight_predictor.safetensors").exists()
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts][-1] == f"step_{int(rows[-1]['step']):08d}" and len(ckpts) == 2  # keep 2
    assert find_checkpoint("auto", out) == ckpts[-1]
    assert set(load_file(out / "model.safetensors")) == set(load_file(ckpts[-1] / "model.safetensors"))
    results = json.loads((out / f"{TINY}_{weighting}.json").read_text())
    assert len(results["anytime"]) == 3 and len(results["budgeted"]) == 39
    assert results["anytime"][-1]["top1"] > 30  # well above chance (10%) after 3 epochs on digits
    assert (out / f"{TINY}_{weighting}.png").stat().st_size > 1000


@pytest.mark.parametrize("stop_at", [4, 9])  # mid-epoch and at the end of epoch 1 (9 steps per epoch)
def test_resume_gives_identical_final_weights(tmp_path, stop_at):
    args = BASE + ["--max-steps", "12", "--held-out", "1197", "--no-eval", "--warmup-steps", "3"]  # 300 images
    assert main(args + ["--output", str(tmp_path / "straight")]) == 0
    again = tmp_path / "resumed"
    assert main(args + ["--output", str(again), "--stop-after-steps", str(stop_at)]) == 0
    assert find_checkpoint("auto", again).name == f"step_{stop_at:08d}"
    assert not (again / "model.safetensors").exists()  # it really stopped early
    assert main(args + ["--output", str(again), "--resume", "auto"]) == 0
    a, b = saved_weights(tmp_path / "straight"), saved_weights(again)
    assert set(a) == set(b) and any(k.startswith("wp.") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff[:5]}"
    log_a = json.loads((tmp_path / "straight" / "log.json").read_text())
    log_b = json.loads((again / "log.json").read_text())
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [9, 12]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-9)


def test_bf16_runs_an_l2w_step_with_finite_losses(tmp_path):
    out = tmp_path / "bf16"
    assert main(BASE + ["--mixed-precision", "bf16", "--max-steps", "2", "--output", str(out), "--no-eval"]) == 0
    row = json.loads((out / "log.json").read_text())[-1]
    assert math.isfinite(row["loss"]) and math.isfinite(row["meta_loss"]) and row["skipped_updates"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "cifar-11"], "unknown dataset 'cifar-11'"),
    (["--model", "resnet_nonexistent"], "unknown model 'resnet_nonexistent'"),
    (["--batch-size", "7"], "two equal halves"),
    (["--dataset", "fashion-mnist", "--data-dir", "{tmp}"], "apt-get install dataset-fashion-mnist"),
    (["--resume", "auto"], "no complete checkpoint"),
    (["--resume", "{tmp}"], "no complete checkpoint"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, extra, message):
    (tmp_path / "checkpoints" / ".tmp-step_00000004").mkdir(parents=True)  # a half-written checkpoint
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code = main(BASE + ["--max-steps", "1", "--output", str(tmp_path), "--no-eval"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_non_finite_losses_are_skipped_then_stop_with_a_clear_error(tmp_path, capsys):
    code = main(BASE + ["--weighting", "uniform", "--lr", "1e30", "--max-nonfinite", "3", "--max-steps", "30",
                        "--output", str(tmp_path), "--no-eval"])
    err = capsys.readouterr().err
    assert code == 3 and "3 non-finite losses in a row" in err and "--lr" in err


def test_the_run_parts_sit_below_the_command():
    """timm_l2w.training (loop, run, update, epoch summary, checkpoints) never imports the command (timm_l2w.cli):
    no import circle."""
    import ast

    package = ROOT / "timm_l2w" / "training"
    for file in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from ..cli import x` and `from .. import cli` alike
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}{'.' if node.module else ''}{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert name not in ("..cli", "timm_l2w.cli") and not name.startswith(("..cli.", "timm_l2w.cli.")), \
                    f"{file.name} imports {name}"
    source = (package / "run.py").read_text() + (package / "loop.py").read_text()
    assert all(f"from .{part} import" in source for part in ("checkpoints", "update", "summary", "stops"))

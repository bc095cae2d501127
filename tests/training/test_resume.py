"""Resuming `timm-l2w train`: a finished run, another run's output, another batch size, a checkpoint that
cannot be placed on this device."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tests.helpers import register_tiny
from timm_l2w.cli.train import main as train_main

TINY = register_tiny()
BASE = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--held-out", "1197", "--log-with", "none"]


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_auto_on_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "3", "--output", str(out)]
    assert train_main(args) == 0
    before = _hashes(out)
    assert "model.safetensors" in before and f"{TINY}_l2w.json" in before
    capsys.readouterr()
    assert train_main(args + ["--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "already complete (step 3 of 3)" in printed and "epoch 1:" not in printed
    assert _hashes(out) == before  # no step 4 checkpoint, no second log row, same model file
    # results lost (e.g. killed after the last checkpoint): only the final files are written again
    (out / "model.safetensors").unlink()
    (out / f"{TINY}_l2w.json").unlink()
    assert train_main(args + ["--resume", "auto"]) == 0
    after = _hashes(out)
    from safetensors.torch import load_file

    rewritten = load_file(out / "model.safetensors")
    kept = load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert set(rewritten) == set(kept) and all(torch.equal(rewritten[k], kept[k]) for k in kept)
    assert (out / f"{TINY}_l2w.json").is_file() and after["log.csv"] == before["log.csv"]
    assert sorted((out / "checkpoints").iterdir())[-1].name == "step_00000003"


def test_a_checkpoint_that_cannot_be_placed_on_this_device_is_not_called_damaged(tmp_path, capsys, monkeypatch):
    args = BASE + ["--max-steps", "2", "--no-eval", "--no-progress", "--output", str(tmp_path)]
    assert train_main(args + ["--stop-after-steps", "1"]) == 0
    import accelerate

    def refuse(self, *a, **k):
        raise RuntimeError("Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False.")

    monkeypatch.setattr(accelerate.Accelerator, "load_state", refuse)
    capsys.readouterr()
    assert train_main(args + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "is intact but its tensors cannot be placed on this process's device" in err
    assert "damaged" not in err.replace("not damaged", "") and "Traceback" not in err


def _checkpoints(out: Path) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))


def test_a_fresh_run_into_another_runs_output_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    first = BASE + ["--max-steps", "4", "--checkpoint-every", "2", "--no-eval", "--no-progress", "--output", str(out)]
    assert train_main(first) == 0
    before = _hashes(out)
    capsys.readouterr()
    again = BASE + ["--max-steps", "1", "--no-eval", "--no-progress", "--output", str(out)]
    assert train_main(again) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoints up to step 4)" in err and "--resume auto" in err and "--overwrite" in err
    assert _hashes(out) == before  # refused before anything was written
    assert train_main(again + ["--overwrite"]) == 0
    assert _checkpoints(out) == ["step_00000001"]  # the old run's checkpoints are gone: resume auto finds the new one
    log = json.loads((out / "log.json").read_text())
    assert [row["step"] for row in log] == [1]


def test_resume_with_another_batch_size_is_refused_and_a_resume_says_its_step(tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "4", "--no-eval", "--no-progress", "--output", str(out)]
    assert train_main(args + ["--stop-after-steps", "2"]) == 0
    capsys.readouterr()
    other = [a if a != "32" else "16" for a in args]  # --batch-size 16
    assert train_main(other + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 32 (now 16)" in err and "cannot be resumed" in err and "Traceback" not in err
    assert train_main(args + ["--resume", "auto"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out

"""`timm-l2w train` on two CPU ranks (accelerate launch): the world size logged, one pause, the resume."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import LAUNCH, accelerate_launch, register_tiny

pytestmark = pytest.mark.multiprocess


TINY = register_tiny()
BASE = ["--model", TINY, "--batch-size", "32", "--lr", "0.05", "--held-out", "1197", "--log-with", "none"]


def _launch_two_ranks(*argv: str) -> subprocess.CompletedProcess:
    """The README's 2-rank CPU command, running ``timm-l2w train`` with the tiny test model."""
    return accelerate_launch([str(LAUNCH / "ddp_check.py"), "--train", *argv])


def test_two_cpu_ranks_log_world_size_pause_once_and_resume(tmp_path):
    args = BASE + ["--max-steps", "4", "--no-eval", "--no-progress", "--output", str(tmp_path)]
    first = _launch_two_ranks(*args, "--stop-after-steps", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "world size 2 (2 processes" in first.stdout and "device cpu" in first.stdout
    assert first.stderr.count("paused after step 2") == 1  # both ranks stop, one says so
    second = _launch_two_ranks(*args, "--resume", "auto")  # used to fail: map_location cpu:0
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "cannot be resumed" not in second.stderr
    log = json.loads((tmp_path / "log.json").read_text())
    assert log[-1]["step"] == 4 and (tmp_path / "model.safetensors").is_file()

"""benchmarks/gpu_check.sh without CUDA: it says so and runs the CPU-sized smoke of its steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _run(tmp_path: Path, only: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    if only:
        env["GPU_CHECK_ONLY"] = only
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=1500)


def _check(tmp_path: Path, proc: subprocess.CompletedProcess, ran: list) -> dict:
    out = tmp_path / "cpu-smoke"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "not GPU results" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["device"] == "cpu"
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert {k for k, v in status.items() if v == "ok"} == set(ran), status
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in ran)
    return {"out": out, "summary": summary}


def test_gpu_check_smoke_runs_its_cheapest_steps(tmp_path):
    """The default suite's variant: the script's mode detection, step table and summary, with three steps."""
    proc = _run(tmp_path, only="tests precision_func throughput")
    got = _check(tmp_path, proc, ["tests", "precision_func", "throughput"])
    throughput = json.loads((got["out"] / "train_throughput.json").read_text())
    assert [(r["weighting"], r["meta_interval"]) for r in throughput["rows"]] == [("uniform", None), ("l2w", 1),
                                                                                  ("l2w", 100)]
    assert all(r["images_per_s"] > 0 for r in throughput["rows"])
    precision = json.loads((got["out"] / "meta_precision_func.json").read_text())
    policies = set(precision["summary"]["init"]["bf16"])
    assert {"fp32", "amp", "lowp-fwd"} <= policies and precision["timing"]["fp32_over_amp"]["bf16"] > 0
    assert "| init | bf16 | fp32 |" in got["summary"] and "not run (only: " in json.dumps(
        json.loads((got["out"] / "gpu_check.json").read_text()))


@pytest.mark.slow
def test_gpu_check_full_cpu_smoke(tmp_path):
    """Every step of the smoke (a few minutes on a loaded 2-core machine); the fast variant above covers
    the script's machinery, the benchmarks' functions have their own tests."""
    proc = _run(tmp_path)
    got = _check(tmp_path, proc, ["tests", "meta_step", "early_exit", "precision_higher", "precision_func",
                                  "throughput"])
    assert (got["out"] / "early_exit_latency_msdnet_l2w_cifar_tiny.json").is_file()
    assert "ratio_interval1=" in got["summary"]

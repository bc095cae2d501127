"""benchmarks/gpu_paper_study.sh: the study's plan from the measured throughput, and (slow) the script's smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from paper_study_plan import flags, study_plan  # noqa: E402


def _rows(l2w_eager, uniform_eager, l2w_graphs=None, uniform_graphs=None, graphs="on (2 graphs, 40 replays)"):
    rows = [{"model": "m", "batch": 1024, "weighting": "uniform", "meta_interval": None, "mode": "eager",
             "path": "sync-free", "images_per_s": uniform_eager},
            {"model": "m", "batch": 1024, "weighting": "l2w", "meta_interval": 1, "mode": "eager", "path": "sync-free",
             "images_per_s": l2w_eager},
            {"model": "m", "batch": 1024, "weighting": "l2w", "meta_interval": 10, "mode": "eager",
             "path": "sync-free", "images_per_s": 10 * l2w_eager},
            {"model": "m", "batch": 64, "weighting": "l2w", "meta_interval": 1, "mode": "eager", "path": "sync-free",
             "images_per_s": 1.0}]
    if l2w_graphs:
        rows += [{"model": "m", "batch": 1024, "weighting": w, "meta_interval": i, "mode": "graphs",
                  "path": "sync-free", "images_per_s": r, "graphs": graphs}
                 for w, i, r in (("uniform", None, uniform_graphs), ("l2w", 1, l2w_graphs))]
    return {"rows": rows}


def test_the_plan_fits_whole_epochs_of_six_runs_in_the_time_left():
    # six runs: 3 x 55,000 / 1,100 + 3 x 55,000 / 5,500 = 180 s per epoch of all; (700 - 60) x 0.7 = 448 s -> 2
    plan = study_plan(_rows(1100.0, 5500.0), 700, model="m")
    assert plan["epochs"] == 2 and plan["mode"] == "eager" and not plan["cuda_graphs"] and plan["measured"]
    assert plan["epoch_seconds_all_runs"] == pytest.approx(180.0)
    assert flags(plan) == ("--epochs 2", "")


def test_graphs_are_chosen_when_they_ran_and_were_faster():
    plan = study_plan(_rows(1100.0, 5500.0, 11000.0, 55000.0), 700, model="m")
    assert plan["mode"] == "graphs" and plan["epochs"] == 24 and flags(plan) == ("--epochs 24", "--cuda-graphs")
    fell_back = study_plan(_rows(1100.0, 5500.0, 11000.0, 55000.0, graphs="off: capture failed"), 700, model="m")
    assert fell_back["mode"] == "eager"  # a graphs row whose capture fell back is an eager measurement


def test_under_one_epoch_the_plan_counts_loader_batches_and_without_rows_it_assumes_rates():
    plan = study_plan(_rows(110.0, 550.0), 700, model="m")  # 1800 s per epoch of all runs
    assert "epochs" not in plan and plan["steps"] == int(448 / (3 / 110 + 3 / 550) / 1024)
    assumed = study_plan(None, 300)
    assert not assumed["measured"] and assumed["images_per_s"] == {"l2w": 1000.0, "uniform": 4000.0}
    assert 1 <= assumed["steps"] <= 55_000 // 1024


@pytest.mark.slow
def test_the_script_runs_every_step_in_its_smoke_mode(tmp_path):
    """Without CUDA: tests, throughput, TF32 check, the study (two runs, two steps) and its summary, at tiny sizes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_PAPER_OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_paper_study.sh")], env=env, capture_output=True,
                          text=True, timeout=1500)
    out = tmp_path / "cpu-smoke"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_paper_study.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["tests", "throughput", "tf32", "study", "summary"]
    assert all(s["status"] == "ok" for s in report["steps"]), report
    assert (out / "study" / "uniform_seed0.json").is_file() and (out / "study" / "l2w_seed0.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "## train_throughput.py" in summary and "## tf32_precision.py" in summary and "## study" in summary

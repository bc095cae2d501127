"""benchmarks/gpu_paper_study.sh: the study's plan from the measured throughput, and the whole script's CPU smoke."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from paper_study_plan import flags, study_plan

from tests.helpers import ROOT


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


STEPS = ["tests", "throughput", "tf32", "early_exit", "study", "summary"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The script without CUDA: every step at tiny sizes (about a minute and a half of CPU time)."""
    root = tmp_path_factory.mktemp("gpu_paper_study")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_PAPER_OUT": str(root), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_paper_study.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, root / "cpu-smoke"


def test_the_smoke_runs_every_step_in_order_and_says_it_is_no_gpu_result(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "not GPU results" in proc.stdout
    report = json.loads((out / "gpu_paper_study.json").read_text())
    assert report["device"] == "cpu" and report["smoke"] is True
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), report
    assert all((out / f"{name}.log").is_file() for name in STEPS)
    assert "passed" in (out / "tests.log").read_text().strip().splitlines()[-1]


def test_the_throughput_and_tf32_steps_write_their_tables(smoke):
    _, out = smoke
    rows = json.loads((out / "train_throughput.json").read_text())["rows"]
    assert {(r["weighting"], r["meta_interval"], r["mode"]) for r in rows} >= {("uniform", None, "eager"),
                                                                              ("l2w", 1, "eager"), ("l2w", 4, "graphs")}
    assert all(r["images_per_s"] > 0 and r["time_over_uniform"] > 0 for r in rows)
    tf32 = json.loads((out / "tf32_precision.json").read_text())
    assert "tf32_safe" in tf32 and tf32["verdict"] and tf32["summary"]


def test_the_early_exit_step_writes_speed_up_and_efficiency_per_model_batch_and_budget(smoke):
    _, out = smoke
    report = json.loads((out / "early_exit_batches.json").read_text())
    assert report["device"] == "cpu" and report["batch_sizes"] == [1, 8] and len(report["qs"]) == 3
    assert set(report["models"]) == {"msdnet_l2w_cifar_tiny", "resnet18"}
    assert report["models"]["resnet18"]["onnx"] == "ok" and report["models"]["msdnet_l2w_cifar_tiny"]["onnx"] is None
    rows = report["rows"]
    keys = {(r["model"], r["backend"], r["batch"], r["q"]) for r in rows}
    expected = {(m, "torch", b, q) for m in report["models"] for b in (1, 8) for q in report["qs"]}
    expected |= {("resnet18", "onnxruntime", b, q) for b in (1, 8) for q in report["qs"]}
    assert keys == expected and len(rows) == len(expected)
    for r in rows:
        assert r["time_full_s"] > 0 and r["time_early_s"] > 0 and r["promise"] >= 1.0
        assert r["speedup"] == pytest.approx(r["time_full_s"] / r["time_early_s"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["promise"])
        assert sum(r["exit_fractions"]) == pytest.approx(1.0) and r["syncs_per_batch"] is None  # counted on CUDA only
    assert rows[0]["provider"] is None and {r["provider"] for r in rows if r["backend"] == "onnxruntime"} == {
        "CPUExecutionProvider"}
    assert all(f"min_efficiency_torch_batch{b}" in report for b in (1, 8))
    with open(out / "early_exit_batches.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"speedup", "efficiency", "promise", "syncs_per_batch"} <= set(table[0])


def test_the_study_trains_both_weightings_and_the_summary_has_every_section(smoke):
    _, out = smoke
    assert "steps" in json.loads((out / "study_plan.json").read_text())
    for name in ("uniform_seed0.json", "l2w_seed0.json"):
        assert json.loads((out / "study" / name).read_text())
    summary = (out / "summary.md").read_text()
    for section in ("## tests", "## train_throughput.py", "## tf32_precision.py", "## early_exit_batches.py",
                    "## study plan", "## study (benchmarks/fidelity.py --summarize-only)"):
        assert section in summary, section
    assert "| resnet18 | onnxruntime (CPUExecutionProvider) | 8 |" in summary

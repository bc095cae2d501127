"""`timm-l2w demo` (issue 13): every budget, paired uncertainty, a summary that says what it shows, a plot
whose legend sits outside the data; the digits-affine data it runs on."""
from __future__ import annotations

import csv
import json

import matplotlib.figure
import numpy as np
import pytest
import torch

from tests.helpers import ROOT, register_tiny
from timm_l2w.cli.demo import main as demo_main
from timm_l2w.data import DIGITS_AFFINE_COPIES, create_datasets
from timm_l2w.evaluation import plot_curves
from timm_l2w.study.stats import paired_bootstrap

TINY = register_tiny()


def test_demo_reports_all_39_budgets_with_intervals_and_a_summary(tmp_path, capsys):
    code = demo_main(["--model", TINY, "--model-kwargs", "--max-steps", "2", "--batch-size", "16", "--seeds", "2",
                      "--jobs", "1", "--bootstrap", "200", "--input-size", "16", "--checkpoint-every", "1",
                      "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert len(rows) == 39 and [float(r["q"]) for r in rows] == pytest.approx([j / 20 for j in range(1, 40)])
    for r in rows:
        diff, lo, hi = float(r["diff"]), float(r["diff_lo95"]), float(r["diff_hi95"])
        assert lo <= diff <= hi and diff == pytest.approx(float(r["l2w_top1"]) - float(r["uniform_top1"]), abs=1e-3)
        assert float(r["diff_seed_lo95"]) - 1e-3 <= diff <= float(r["diff_seed_hi95"]) + 1e-3  # t interval over seeds
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == 2 and len(summary["per_seed_mean_diff"]) == 2 and summary["test_images"] == 300
    assert summary["mean_diff"] == pytest.approx(np.mean(summary["per_seed_mean_diff"]))
    lo, hi = summary["seed_interval95"]
    assert lo <= summary["mean_diff"] <= hi
    assert summary["mean_diff_interval95"][0] <= summary["mean_diff"] <= summary["mean_diff_interval95"][1]
    assert "what it says:" in out and summary["verdict"] in out and "over the 2 seeds" in out
    assert out.count("\n") > 39 and "accuracy rises with FLOPs: from exit 1 to exit 3" in out
    assert "what L2W learns" in out and "correlation of a sample's weight with its loss" in out
    learned = summary["weights_over_training"]
    assert sorted(learned) == ["0", "1"] and [r["step"] for r in learned["0"]] == [1, 2]  # a checkpoint per step
    assert len(learned["0"][-1]["corr_loss_weight"]) == 3 and len(learned["0"][-1]["weight_bins"][0]) == 5
    for name in ("l2w_vs_uniform.png", "what_l2w_learns.png"):
        assert (tmp_path / name).stat().st_size > 1000
    for run in ("l2w_seed0", "l2w_seed1", "uniform_seed0", "uniform_seed1"):
        assert (tmp_path / run / "model.safetensors").is_file()
    assert (tmp_path / "l2w_seed0" / "weight_predictor.safetensors").is_file()
    assert not (tmp_path / "uniform_seed0" / "weight_predictor.safetensors").exists()
    assert demo_main(["--model", TINY, "--model-kwargs", "--max-steps", "1", "--batch-size", "16", "--seeds", "1",
                      "--jobs", "1", "--bootstrap", "50", "--input-size", "16", "--checkpoint-every", "0",
                      "--output", str(tmp_path)]) == 0  # the same --output again: its run folders are overwritten
    out = capsys.readouterr().out
    assert "one seed:" in out and "run --seeds 4 or more" in out and "no checkpoints to read it from" in out


def test_verdict_says_what_the_seeds_can_tell():
    from timm_l2w.study.stats import seeds_for_half_width, t_interval
    from timm_l2w.study.verdict import verdict

    mean, lo, hi = t_interval([0.5, -0.3, 1.1, -0.9])
    assert float(mean) == pytest.approx(0.1)
    assert float(hi - mean) == pytest.approx(3.182446305 * np.std([0.5, -0.3, 1.1, -0.9], ddof=1) / 2)
    text = verdict([0.5, -0.3, 1.1, -0.9], float(lo), float(hi), -0.4, 0.6, seeds_for_half_width(0.876, 1.0))
    assert text.startswith("no difference these 4 seeds can detect") and "contains zero" in text
    assert "the seeds, not the test images, dominate" in text and "would take about 6 seeds" in text
    assert seeds_for_half_width(0.876, 1.0) == 6 and seeds_for_half_width(0.0, 1.0) == 2
    mean, lo, hi = t_interval([-3.3, -2.9, -3.1, -2.7])
    text = verdict([-3.3, -2.9, -3.1, -2.7], float(lo), float(hi), -4.0, -2.0, 2)
    assert text.startswith("L2W is behind equal weighting by 3.00 points") and "excludes zero (4 of 4 seeds" in text
    assert verdict([1.6], float("nan"), float("nan"), -1.0, 4.2, None).startswith("one seed: +1.60 points")


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 400)) < 0.8
    same = paired_bootstrap(a, a, reps=300)
    assert np.all(same["diff"] == 0) and np.all(same["diff_lo"] == 0) and np.all(same["diff_hi"] == 0)
    worse = a & (rng.random(a.shape) < 0.9)  # about 8 points lower, paired sample by sample
    res = paired_bootstrap(a, worse, reps=500)
    assert np.all(res["diff_lo"] > 0) and np.all(res["diff"] < res["diff_hi"])
    assert res["a"] == pytest.approx(a.mean(axis=(0, 2)) * 100)
    assert res["mean_diff_lo"] < float(res["mean_diff"]) < res["mean_diff_hi"]
    with pytest.raises(ValueError, match="seeds, budgets, samples"):
        paired_bootstrap(a[0], a[0])


def test_demo_data_is_fixed_by_seed_and_harder_than_plain_digits():
    plain, warped, again = create_datasets("digits"), create_datasets("digits-affine"), create_datasets("digits-affine")
    assert len(warped.train) == DIGITS_AFFINE_COPIES * len(plain.train)
    assert len(warped.held_out) == len(plain.held_out) and len(warped.test) == len(plain.test) == 300
    assert torch.equal(warped.test.images, again.test.images) and torch.equal(warped.train.images, again.train.images)
    assert torch.equal(warped.test.labels, plain.test.labels)  # the same test digits, transformed
    x, _ = warped.collate_fn([warped.test[i] for i in range(4)])
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    copies = warped.train.images.view(DIGITS_AFFINE_COPIES, len(plain.train), 1, 16, 16)
    assert not torch.equal(copies[0], copies[1])  # every copy is transformed differently


def test_legend_never_covers_the_data(tmp_path, monkeypatch):
    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **k):
        figures.append(fig)
        fig.canvas.draw()
        figures.append([(ax.get_legend().get_window_extent(), ax.get_window_extent()) for ax in fig.axes])
        return original(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    x = list(range(39))
    curves = {"L2W": (x, [50 + i for i in x]), "equal weighting": (x, [49 + i for i in x])}
    points = {"L2W": ([0, 38], [50, 88]), "equal weighting": ([0, 38], [49, 87])}
    plot_curves(curves, tmp_path / "p.png", "MFLOPs", "top-1", points)
    (legend, axes), = figures[1]
    assert not legend.overlaps(axes)  # outside the axes: the lower-right corner holds the curves' tails


def test_default_output_folders_are_git_ignored():
    from timm_l2w.cli.demo import _parser
    from timm_l2w.cli.train import build_parser

    ignored = (ROOT / ".gitignore").read_text().split()
    for default in (_parser().get_default("output"), build_parser().get_default("output")):
        assert default.split("/")[0] + "/" in ignored, default

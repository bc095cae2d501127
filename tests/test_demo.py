"""`timm-l2w demo` (issue 13): every budget, paired uncertainty, a summary that says what it shows, a plot
whose legend sits outside the data; the digits-affine data it runs on."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch

from timm_l2w.data import DIGITS_AFFINE_COPIES, create_datasets
from timm_l2w.demo import main as demo_main, paired_bootstrap
from timm_l2w.plot import plot_curves

sys.path.insert(0, str(Path(__file__).parent))
from ddp_check import register_tiny  # noqa: E402

TINY = register_tiny()


def test_demo_reports_all_39_budgets_with_intervals_and_a_summary(tmp_path, capsys):
    code = demo_main(["--model", TINY, "--max-steps", "2", "--batch-size", "16", "--seeds", "2", "--jobs", "1",
                      "--bootstrap", "200", "--input-size", "16", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert len(rows) == 39 and [float(r["q"]) for r in rows] == pytest.approx([j / 20 for j in range(1, 40)])
    for r in rows:
        diff, lo, hi = float(r["diff"]), float(r["diff_lo95"]), float(r["diff_hi95"])
        assert lo <= diff <= hi and diff == pytest.approx(float(r["l2w_top1"]) - float(r["uniform_top1"]), abs=1e-3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == 2 and len(summary["per_seed_mean_diff"]) == 2 and summary["test_images"] == 300
    assert summary["mean_diff_interval95"][0] <= summary["mean_diff"] <= summary["mean_diff_interval95"][1]
    assert "what it says:" in out and summary["verdict"] in out
    assert out.count("\n") > 39 and "accuracy rises with FLOPs: from exit 1 to exit 3" in out
    assert (tmp_path / "l2w_vs_uniform.png").stat().st_size > 1000
    for run in ("l2w_seed0", "l2w_seed1", "uniform_seed0", "uniform_seed1"):
        assert (tmp_path / run / "model.safetensors").is_file()
    assert (tmp_path / "l2w_seed0" / "weight_predictor.safetensors").is_file()
    assert not (tmp_path / "uniform_seed0" / "weight_predictor.safetensors").exists()


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
    from timm_l2w.demo import _parser
    from timm_l2w.train import build_parser

    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().split()
    for default in (_parser().get_default("output"), build_parser().get_default("output")):
        assert default.split("/")[0] + "/" in ignored, default

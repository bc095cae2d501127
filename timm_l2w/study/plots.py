"""The study's plots: budgeted curves of every variant (mean ± std over seeds) and the paired gain against
the cost ratio (from the summary :func:`timm_l2w.study.summary.summarize_records` returns), and what the
weight predictor learns (:func:`plot_weights_vs_loss`, also drawn by ``timm-l2w demo``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from timm_l2w.files import write_bytes_atomic
from timm_l2w.study.runner import REFERENCE

__all__ = ["plot_curves", "plot_gain_vs_cost", "plot_weights_vs_loss", "save_figure", "figure"]

_COLORS = {"uniform": "tab:blue", "l2w": "tab:red", "l2w_int10": "tab:orange", "l2w_int100": "tab:green",
           "uniform_ge_kd": "tab:purple", "l2w_kd": "tab:brown"}


def save_figure(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def figure() -> tuple:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.8), dpi=120)


def plot_curves(s: Dict[str, Any], path: Path) -> None:
    """Budgeted curve (mean ± std band) and anytime exits (mean ± std) of every variant."""
    grid = np.array(s["grid_mflops"])
    fig, ax = figure()
    for v in s["variants"]:
        color, n = _COLORS.get(v), len(s["seeds"][v])
        m, sd = np.array(s["curve_mean"][v]), np.array(s["curve_std"][v])
        ax.plot(grid, m, color=color, label=f"{s['labels'][v]} (mean of {n} seed{'s' * (n > 1)})")
        ax.fill_between(grid, m - sd, m + sd, color=color, alpha=0.15, linewidth=0)
        ax.errorbar(s["exit_mflops"], [a["mean"] for a in s["anytime_top1"][v]],
                    yerr=[a["std"] for a in s["anytime_top1"][v]], fmt="*", color=color, markersize=8,
                    capsize=3, label=f"{s['labels'][v]}: exits")
    ax.set_xlabel("average MFLOPs per image (test)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{s['model']}, Fashion-MNIST 32x32, {s['train_length']} (mean ± std)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0)
    save_figure(fig, path)


def plot_gain_vs_cost(s: Dict[str, Any], path: Path) -> None:
    """One point per L2W variant: paired mean gain (95% t-interval) against its cost ratio (seed range)."""
    fig, ax = figure()
    bases = set()
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.plot([1.0], [0.0], "o", color=_COLORS[REFERENCE], label=f"{s['labels'][REFERENCE]} (reference)")
    for v, c in s["comparisons"].items():
        ratio, gain = _cost_basis(c), c["paired_mean_gain"]
        if ratio is None or gain is None:
            continue
        bases.add(ratio["key"])
        ci = gain["ci95_t"]
        yerr = None if ci is None else [[gain["mean"] - ci[0]], [ci[1] - gain["mean"]]]
        xerr = [[ratio["mean"] - ratio["min"]], [ratio["max"] - ratio["mean"]]]
        ax.errorbar([ratio["mean"]], [gain["mean"]], xerr=xerr, yerr=yerr, fmt="o", color=_COLORS.get(v), capsize=4,
                    label=f"{s['labels'][v]} ({gain['n']} seed{'s' * (gain['n'] > 1)}"
                          f"{'' if ci else ', no interval'})")
    what = " and ".join({"cpu_s": "CPU seconds", "wall_s": "wall-clock seconds"}[b] for b in sorted(bases)) or "n/a"
    ax.set_xlabel(f"cost ratio vs equal weighting ({what} per run, same seed; bars: seed range)")
    ax.set_ylabel("mean budgeted gain (top-1 points; bars: 95% t-interval)")
    ax.set_title(f"{s['model']}, {s['train_length']}: what L2W buys and what it costs", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0)
    save_figure(fig, path)


def _cost_basis(comparison: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The ratio the gain-vs-cost plot uses: CPU seconds when measured, else wall-clock seconds."""
    for key in ("cost_ratio_cpu", "cost_ratio_wall"):
        if comparison[key]["mean"] is not None:
            return comparison[key]
    return None


def plot_weights_vs_loss(runs: Dict[Any, list], path: Path, title: str) -> Path:
    """What L2W learns, from every seed's ``weights_over_training`` rows (``{seed: rows}``).

    Left: at the end of training, the mean predicted weight against the mean loss in loss quantiles, per
    exit (mean over seeds). Right: the correlation of a sample's weight with its loss, per exit, at every
    checkpoint (thick: mean over seeds; thin: each seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(s for s, rows in runs.items() if rows)
    if not seeds:
        raise ValueError("no weights_over_training rows to plot: train L2W runs with checkpoints")
    last = [runs[s][-1] for s in seeds]
    loss_bins = np.mean([r["loss_bins"] for r in last], axis=0)  # [K, bins]
    weight_bins = np.mean([r["weight_bins"] for r in last], axis=0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, loss_bins.shape[0]))
    for k, color in enumerate(colors):
        left.plot(loss_bins[k], weight_bins[k], "o-", color=color, label=f"exit {k + 1}")
        for s in seeds:
            rows = runs[s]
            steps = [r["step"] for r in rows]
            right.plot(steps, [float(r["corr_loss_weight"][k]) for r in rows], color=color, alpha=0.25, linewidth=0.8)
        common = sorted(set.intersection(*[{r["step"] for r in runs[s]} for s in seeds]))
        mean = [np.nanmean([float(next(r for r in runs[s] if r["step"] == st)["corr_loss_weight"][k]) for s in seeds])
                for st in common]
        right.plot(common, mean, color=color, linewidth=2.2, label=f"exit {k + 1}")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xlabel("sample's loss at the exit (mean of a loss quantile, held-out images)")
    left.set_ylabel("predicted weight (mean)")
    left.set_title(f"end of training, mean of {len(seeds)} seed{'s' * (len(seeds) > 1)}", fontsize=10)
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_xlabel("training step (checkpoint)")
    right.set_ylabel("correlation of weight and loss")
    right.set_title("over training (thick: seed mean, thin: each seed)", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    right.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return path

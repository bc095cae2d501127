"""Plots of evaluation results (matplotlib, Agg backend: works without a display).

:func:`plot_budgeted` draws accuracy vs average FLOPs: one curve per named budgeted result (e.g.
L2W vs equal weighting) and, optionally, each model's per-exit anytime points.
:func:`plot_curves` is the generic line plot underneath (also used for accuracy vs latency).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

__all__ = ["plot_curves", "plot_budgeted"]

Series = Tuple[Sequence[float], Sequence[float]]
Band = Tuple[Sequence[float], Sequence[float], Sequence[float]]


def plot_curves(
    curves: Mapping[str, Series],
    path: Path | str,
    xlabel: str,
    ylabel: str,
    points: Optional[Mapping[str, Series]] = None,
    title: Optional[str] = None,
    point_suffix: str = "",
    bands: Optional[Mapping[str, Band]] = None,
) -> Path:
    """Save a PNG with one line per ``curves[name] = (x, y)`` and markers for ``points[name]``.

    Points share the colour of the curve of the same name; their legend label is ``name + point_suffix``.
    ``bands[name] = (x, low, high)`` shades an uncertainty band around that curve. The legend sits
    outside the axes, so it never covers data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves and not points:
        raise ValueError("nothing to plot: pass at least one curve or point series")
    for name, (x, y) in list(curves.items()) + list((points or {}).items()):
        if len(x) != len(y):
            raise ValueError(f"series '{name}' has {len(x)} x values but {len(y)} y values")
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        colors = {}
        for name, (x, y) in curves.items():
            order = sorted(range(len(x)), key=lambda i: x[i])
            (line,) = ax.plot([x[i] for i in order], [y[i] for i in order], marker=".", label=name)
            colors[name] = line.get_color()
        for name, (x, low, high) in (bands or {}).items():
            order = sorted(range(len(x)), key=lambda i: x[i])
            ax.fill_between([x[i] for i in order], [low[i] for i in order], [high[i] for i in order],
                            color=colors.get(name), alpha=0.2, linewidth=0)
        for name, (x, y) in (points or {}).items():
            ax.scatter(x, y, marker="*", s=80, zorder=3, color=colors.get(name), label=f"{name}{point_suffix}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")  # the figure grows to hold the legend
    finally:
        plt.close(fig)
    from ..files import write_bytes_atomic

    return write_bytes_atomic(path, buf.getvalue())


def _budget_series(result: Any, flops_scale: float) -> Series:
    rows = result.rows() if hasattr(result, "rows") else list(result)
    return [r["expected_flops"] / flops_scale for r in rows], [r["test_top1"] for r in rows]


def plot_budgeted(
    curves: Mapping[str, Any],
    path: Path | str,
    anytime: Optional[Mapping[str, Sequence[Mapping[str, float]]]] = None,
    flops_scale: float = 1e6,
    title: Optional[str] = "Budgeted evaluation",
    bands: Optional[Mapping[str, Band]] = None,
) -> Path:
    """Accuracy vs average FLOPs for each ``curves[name]`` (BudgetedResults or its rows).

    ``anytime[name]`` (rows of :func:`timm_l2w.evaluation.anytime_metrics` with ``flops``) adds that
    model's per-exit points. FLOPs are divided by ``flops_scale`` (default: MFLOPs).
    ``bands[name] = (flops, low, high)`` (FLOPs already scaled) shades an interval around a curve.
    """
    unit = {1.0: "FLOPs", 1e6: "MFLOPs", 1e9: "GFLOPs"}.get(flops_scale, f"FLOPs / {flops_scale:g}")
    series = {name: _budget_series(result, flops_scale) for name, result in curves.items()}
    points = {}
    for name, rows in (anytime or {}).items():
        if any("flops" not in r for r in rows):
            raise ValueError(f"anytime rows of '{name}' have no 'flops': pass flops to anytime_metrics")
        points[name] = ([r["flops"] / flops_scale for r in rows], [r["top1"] for r in rows])
    return plot_curves(series, path, f"average {unit} per image", "top-1 accuracy (%)", points, title,
                       point_suffix=" (exits)", bands=bands)

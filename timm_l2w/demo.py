"""``timm-l2w demo``: L2W vs equal weighting on built-in data, in a few minutes on a CPU.

Trains the same multi-exit model twice with the same seed, data order and schedule, once with the
L2W weighted loss and meta step and once with equal weights, evaluates both (anytime and budgeted,
thresholds calibrated on the held-out split), prints the two budgeted curves side by side on a
common FLOPs grid and writes one plot with both curves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["main", "compare_curves"]


def compare_curves(curves: Dict[str, Any], points: int = 8) -> List[Dict[str, float]]:
    """Accuracy of every curve interpolated at ``points`` FLOPs evenly spaced over their common range.

    ``curves[name]`` is a :class:`timm_l2w.evaluate.BudgetedResults` (or its rows). Returns rows
    ``{"mflops": ..., name: top1, ...}``.
    """
    series = {}
    for name, result in curves.items():
        rows = result.rows() if hasattr(result, "rows") else list(result)
        flops = np.array([r["expected_flops"] for r in rows], dtype=np.float64) / 1e6
        acc = np.array([r["test_top1"] for r in rows], dtype=np.float64)
        order = np.argsort(flops, kind="stable")
        series[name] = (flops[order], acc[order])
    lo = max(f.min() for f, _ in series.values())
    hi = min(f.max() for f, _ in series.values())
    if not lo < hi:
        raise ValueError("the curves do not overlap in FLOPs: nothing to compare")
    grid = np.linspace(lo, hi, points)
    table = {name: np.interp(grid, f, a) for name, (f, a) in series.items()}
    return [{"mflops": float(g), **{name: float(v[i]) for name, v in table.items()}} for i, g in enumerate(grid)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timm-l2w demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny", help="registered multi-exit model")
    p.add_argument("--dataset", default="digits", help="built-in data set (see timm-l2w train --help)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-steps", type=int, default=40, help="loader batches per run (two updates each)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=4, help="warmup, in updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="output/demo", help="folder for both runs, the table and the plot")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the tiny model gains nothing from more, and on a busy machine "
                        "extra threads stall each other (0: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from . import train as train_mod
    from .files import write_text_atomic
    from .plot import plot_budgeted

    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    common = ["--model", args.model, "--dataset", args.dataset, "--max-steps", str(args.max_steps),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
              "--seed", str(args.seed), "--log-with", "none"]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    if args.no_progress:
        common.append("--no-progress")
    results: Dict[str, Dict[str, Any]] = {}
    for weighting, label in (("l2w", "L2W"), ("uniform", "equal weighting")):
        print(f"== training {args.model} on {args.dataset} with {label} ({args.max_steps} steps)", flush=True)
        try:
            run = train_mod.train(train_mod.parse_args(common + ["--weighting", weighting,
                                                                 "--output", str(out / weighting)]))
        except (ValueError, FileNotFoundError, TypeError) as err:
            print(f"timm-l2w demo: error: {err}", file=sys.stderr)
            return 2
        results[label] = run["eval"]
    curves = {name: r["budgeted"] for name, r in results.items()}
    anytime = {name: r["anytime"] for name, r in results.items()}
    rows = compare_curves(curves)
    names = list(curves)
    print("\nbudgeted evaluation on the test split (thresholds from the held-out split)")
    print(f"{'MFLOPs':>8}  " + "  ".join(f"{n:>16}" for n in names))
    for row in rows:
        print(f"{row['mflops']:8.2f}  " + "  ".join(f"{row[n]:15.2f}%" for n in names))
    print("\nanytime (every exit): " + "; ".join(
        f"{n}: " + " / ".join(f"{r['top1']:.1f}" for r in anytime[n]) for n in names))
    lines = ["mflops," + ",".join(names)] + [f"{r['mflops']:.4f}," + ",".join(f"{r[n]:.4f}" for n in names)
                                             for r in rows]
    write_text_atomic(out / "comparison.csv", "\n".join(lines) + "\n")
    plot = plot_budgeted(curves, out / "l2w_vs_uniform.png", anytime=anytime,
                         title=f"{args.model} on {args.dataset}: L2W vs equal weighting")
    print(f"\nwrote {out / 'comparison.csv'} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

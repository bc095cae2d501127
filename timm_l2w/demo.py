"""``timm-l2w demo``: L2W vs equal weighting on built-in data, in a few minutes on a CPU.

Trains the same multi-exit model with the L2W weighted loss and meta step and with equal weights, for
several seeds (same seed, data order and schedule within a pair), evaluates every run (anytime and
the 39 budgets of the paper's budgeted evaluation, thresholds calibrated on the held-out split), and
reports the difference with its uncertainty: the spread over seeds and a paired bootstrap interval
over the test images (the same resampled images for both weightings). Writes ``comparison.csv`` (one
row per budget), ``summary.json`` and one plot with both curves.

The default data, ``digits-affine`` (scikit-learn's digits, randomly rotated, scaled and shifted),
is offline and hard enough for the exits to separate: later, costlier exits are more accurate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .cli_common import add_input_size, add_version

__all__ = ["main", "budget_correctness", "paired_bootstrap"]

LABELS = {"l2w": "L2W", "uniform": "equal weighting"}


def budget_correctness(test: Any, thresholds: Any) -> np.ndarray:
    """``[B, N]`` bool: is test sample n right at the exit the thresholds of budget b send it to."""
    from .exits import exit_by_threshold

    exits = exit_by_threshold(test.confidences, thresholds)  # [B, N]
    return test.correct.T.contiguous().gather(0, exits).numpy()


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, level: float = 0.95,
                     seed: int = 0) -> Dict[str, np.ndarray]:
    """Paired bootstrap over test samples of accuracy (%) of ``a`` and ``b`` (``[S, B, N]`` correctness:
    seeds, budgets, samples; accuracy is averaged over seeds).

    Every replicate resamples the N test samples once and applies the same resample to both and to
    every seed and budget. Returns point estimates and ``level`` percentile intervals: ``a``, ``b``,
    ``diff`` (a - b) per budget ``[B]`` with ``*_lo`` / ``*_hi``, and ``mean_diff`` (over budgets).
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be [seeds, budgets, samples] of one shape, got {a.shape} and {b.shape}")
    n = a.shape[-1]
    per_a, per_b = a.mean(axis=0).astype(np.float64), b.mean(axis=0).astype(np.float64)  # [B, N]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)
    boot_a, boot_b = counts @ per_a.T * (100.0 / n), counts @ per_b.T * (100.0 / n)  # [R, B]
    tail = (1 - level) / 2 * 100
    out: Dict[str, np.ndarray] = {}
    for name, point, boot in (("a", per_a.mean(1) * 100, boot_a), ("b", per_b.mean(1) * 100, boot_b),
                              ("diff", (per_a - per_b).mean(1) * 100, boot_a - boot_b)):
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = point, *np.percentile(boot, [tail, 100 - tail], axis=0)
    mean = (boot_a - boot_b).mean(axis=1)
    out["mean_diff"] = np.array(out["diff"].mean())
    out["mean_diff_lo"], out["mean_diff_hi"] = np.percentile(mean, [tail, 100 - tail])
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timm-l2w demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_version(p)
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny", help="registered multi-exit model")
    p.add_argument("--dataset", default="digits-affine", help="data set (see timm-l2w train --help)")
    p.add_argument("--data-dir", default=None, help="folder with the data set files (not needed for digits)")
    add_input_size(p, 20)
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (digits-affine: an epoch holds "
                                                         "6 transformed copies of every training image)")
    p.add_argument("--max-steps", type=int, default=None, help="loader batches per run (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch (two updates on its halves)")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the cosine schedule (chosen on "
                   "equal-weighting runs only, as the one where their exits separate)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup, in updates")
    p.add_argument("--backend", choices=["higher", "func"], default="func",
                   help="L2W virtual-step backend (both give the same step; func is faster on CPU)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per weighting (seeds 0..N-1)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates over the test images")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained at the same time (processes, one CPU thread each)")
    p.add_argument("--output", default="output/demo", help="folder for the runs, the table and the plot")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run; the tiny model gains nothing from more, and on a busy "
                        "machine extra threads stall each other (0: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _train_one(argv: List[str], threads: int) -> Dict[str, Any]:
    """One training run (in this process or a worker): the evaluation outputs and the CPU time."""
    import torch

    from . import train as train_mod

    if threads:
        torch.set_num_threads(threads)
    start = time.process_time()
    run = train_mod.train(train_mod.parse_args(argv))
    ev = run["eval"]
    return {"heldout": ev["heldout"], "test": ev["test"], "flops": list(ev["flops"]),
            "anytime": ev["anytime"], "cpu_s": time.process_time() - start}


def _run_all(jobs: List[Dict[str, Any]], workers: int, threads: int) -> List[Dict[str, Any]]:
    """Train every job, ``workers`` at a time (longest first), printing each as it finishes."""
    def done(job: Dict[str, Any], result: Dict[str, Any]) -> None:
        print(f"== done: {job['label']} seed {job['seed']} (CPU time {result['cpu_s']:.0f} s; top-1 per exit "
              + " / ".join(f"{r['top1']:.1f}" for r in result["anytime"]) + ")", flush=True)

    results: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    if workers <= 1:
        for i, job in enumerate(jobs):
            print(f"== training {job['label']}, seed {job['seed']}", flush=True)
            results[i] = _train_one(job["argv"], threads)
            done(job, results[i])
        return results  # type: ignore[return-value]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    print(f"== training {len(jobs)} runs, {workers} at a time", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_one, job["argv"], threads): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            done(jobs[i], results[i])
    return results  # type: ignore[return-value]


def _verdict(stats: Dict[str, np.ndarray], per_seed: List[float], level: int) -> str:
    lo, hi, mean = float(stats["mean_diff_lo"]), float(stats["mean_diff_hi"]), float(stats["mean_diff"])
    seeds = ", ".join(f"{d:+.2f}" for d in per_seed)
    if lo > 0 or hi < 0:
        side = "ahead of" if mean > 0 else "behind"
        text = (f"L2W is {side} equal weighting by {abs(mean):.2f} points on average, and the {level}% interval "
                f"over test images excludes zero")
        if len(per_seed) > 1 and not all((d > 0) == (mean > 0) for d in per_seed):
            text += f"; but the seeds disagree in sign ({seeds}), so more seeds are needed to trust it"
        return text + "."
    return (f"no difference is detectable at this scale: the {level}% interval ({lo:+.2f} to {hi:+.2f} points) "
            f"contains zero (seeds: {seeds}). The paper's gains (about 1 point on CIFAR-100 after full "
            f"training) are of the size of this demo's uncertainty; see benchmarks/RESULTS.md for a larger study.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from .evaluate import budgeted_evaluation
    from .files import csv_text, write_json_atomic, write_text_atomic
    from .plot import plot_budgeted

    args = _parser().parse_args(list(argv) if argv is not None else None)
    for flag in ("seeds", "bootstrap", "jobs", "batch_size", "input_size", "epochs"):
        if getattr(args, flag) < 1:
            print(f"timm-l2w demo: error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}",
                  file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    common = ["--model", args.model, "--dataset", args.dataset, "--input-size", str(args.input_size),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
              "--backend", args.backend, "--log-with", "none", "--no-progress"]
    common += ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    jobs = [{"weighting": w, "label": LABELS[w], "seed": s,
             "argv": common + ["--weighting", w, "--seed", str(s), "--output", str(out / f"{w}_seed{s}")]}
            for w in ("l2w", "uniform") for s in range(args.seeds)]  # L2W first: the longer runs
    print(f"timm-l2w demo: {args.model} on {args.dataset} ({args.input_size}x{args.input_size}), L2W vs equal "
          f"weighting, {args.seeds} seed(s) each; {min(args.jobs, len(jobs))} run(s) at a time", flush=True)
    wall = time.perf_counter()
    try:
        results = _run_all(jobs, min(args.jobs, len(jobs)), args.threads)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"timm-l2w demo: error: {err}", file=sys.stderr)
        return 2

    # budgeted curves (thresholds from each run's held-out split) and per-sample correctness per budget
    curves: Dict[str, List[Any]] = {"l2w": [], "uniform": []}
    correct: Dict[str, List[np.ndarray]] = {"l2w": [], "uniform": []}
    anytime: Dict[str, List[List[Dict[str, float]]]] = {"l2w": [], "uniform": []}
    for job, res in zip(jobs, results):
        budgeted = budgeted_evaluation(res["heldout"], res["test"], res["flops"])
        curves[job["weighting"]].append(budgeted)
        correct[job["weighting"]].append(budget_correctness(res["test"], budgeted.thresholds))
        anytime[job["weighting"]].append(res["anytime"])
    level = 95
    stats = paired_bootstrap(np.stack(correct["l2w"]), np.stack(correct["uniform"]), reps=args.bootstrap,
                             level=level / 100)
    mflops = {w: np.mean([c.expected_flops.numpy() for c in curves[w]], axis=0) / 1e6 for w in curves}
    exits = {w: np.mean([[r["top1"] for r in a] for a in anytime[w]], axis=0) for w in anytime}
    exit_mflops = np.array([r["flops"] for r in anytime["l2w"][0]]) / 1e6
    per_seed = [float((a.mean(-1) - b.mean(-1)).mean() * 100) for a, b in zip(correct["l2w"], correct["uniform"])]
    q = curves["l2w"][0].q.numpy()

    rows = [{"budget": b + 1, "q": round(float(q[b]), 4),
             "l2w_mflops": round(float(mflops["l2w"][b]), 4), "l2w_top1": round(float(stats["a"][b]), 4),
             "uniform_mflops": round(float(mflops["uniform"][b]), 4), "uniform_top1": round(float(stats["b"][b]), 4),
             "diff": round(float(stats["diff"][b]), 4), f"diff_lo{level}": round(float(stats["diff_lo"][b]), 4),
             f"diff_hi{level}": round(float(stats["diff_hi"][b]), 4)} for b in range(len(q))]
    write_text_atomic(out / "comparison.csv", csv_text(rows))
    n_test = correct["l2w"][0].shape[-1]
    print(f"\nbudgeted evaluation on the test split ({n_test} images; thresholds from the held-out split), "
          f"top-1 % averaged over {args.seeds} seed(s); difference L2W - equal with its {level}% paired "
          f"bootstrap interval over the test images")
    print(f"{'budget':>6} {'q':>5} {'MFLOPs':>7} {'L2W':>6} {'MFLOPs':>7} {'equal':>6} {'diff':>6}  interval")
    for r in rows:
        print(f"{r['budget']:>6} {r['q']:>5.2f} {r['l2w_mflops']:>7.2f} {r['l2w_top1']:>6.2f} {r['uniform_mflops']:>7.2f} "
              f"{r['uniform_top1']:>6.2f} {r['diff']:>+6.2f}  [{r[f'diff_lo{level}']:+.2f}, {r[f'diff_hi{level}']:+.2f}]")

    ahead = int((stats["diff"] > 0).sum())
    behind = int((stats["diff"] < 0).sum())
    above, below = int((stats["diff_lo"] > 0).sum()), int((stats["diff_hi"] < 0).sum())
    verdict = _verdict(stats, per_seed, level)
    summary_lines = [
        f"exits ({' / '.join(f'{f:.2f}' for f in exit_mflops)} MFLOPs), top-1 % averaged over seeds:",
        f"  L2W             {' / '.join(f'{a:.1f}' for a in exits['l2w'])}",
        f"  equal weighting {' / '.join(f'{a:.1f}' for a in exits['uniform'])}",
        f"  accuracy rises with FLOPs: from exit 1 to exit {len(exit_mflops)} "
        + ", ".join(f"{exits[w][-1] - exits[w][0]:+.1f} points ({LABELS[w]})" for w in exits),
        f"budgeted curves, cheapest to costliest budget: equal weighting {stats['b'][0]:.1f} -> {stats['b'][-1]:.1f} %, "
        f"L2W {stats['a'][0]:.1f} -> {stats['a'][-1]:.1f} %",
        f"L2W - equal weighting over the 39 budgets: {float(stats['mean_diff']):+.2f} points on average, "
        f"{level}% interval [{float(stats['mean_diff_lo']):+.2f}, {float(stats['mean_diff_hi']):+.2f}]; "
        f"per seed {', '.join(f'{d:+.2f}' for d in per_seed)}",
        f"L2W ahead at {ahead}, behind at {behind} of {len(q)} budgets; the {level}% interval lies above zero at "
        f"{above} and below zero at {below} of them (39 overlapping tests: expect a few by chance)",
        f"what it says: {verdict}",
    ]
    print("\nsummary\n" + "\n".join(summary_lines))
    write_json_atomic(out / "summary.json", {
        "model": args.model, "dataset": args.dataset, "input_size": args.input_size, "seeds": args.seeds,
        "test_images": n_test, "bootstrap": args.bootstrap, "exit_mflops": exit_mflops.tolist(),
        "exit_top1": {w: exits[w].tolist() for w in exits}, "comparison": "L2W - equal weighting, top-1 points", "mean_diff": float(stats["mean_diff"]),
        f"mean_diff_interval{level}": [float(stats["mean_diff_lo"]), float(stats["mean_diff_hi"])],
        "per_seed_mean_diff": per_seed, "budgets_ahead": ahead, "budgets_behind": behind,
        "budgets_interval_above_zero": above, "budgets_interval_below_zero": below,
        "verdict": verdict, "cpu_s": {f"{j['weighting']}_seed{j['seed']}": round(r["cpu_s"], 1)
                                      for j, r in zip(jobs, results)},
        "wall_s": round(time.perf_counter() - wall, 1)})
    bands = {LABELS["l2w"]: (mflops["l2w"], stats["a_lo"], stats["a_hi"]),
             LABELS["uniform"]: (mflops["uniform"], stats["b_lo"], stats["b_hi"])}
    mean_rows = {LABELS[w]: [{"expected_flops": f * 1e6, "test_top1": a} for f, a in
                             zip(mflops[w], stats["a" if w == "l2w" else "b"])] for w in curves}
    exit_points = {LABELS[w]: [{"flops": f * 1e6, "top1": a} for f, a in zip(exit_mflops, exits[w])] for w in exits}
    plot = plot_budgeted(mean_rows, out / "l2w_vs_uniform.png", anytime=exit_points, bands=bands,
                         title=f"{args.model} on {args.dataset}, {args.seeds} seed(s)\n"
                               f"shaded: {level}% bootstrap interval over the {n_test} test images")
    print(f"\nwrote {out / 'comparison.csv'}, {out / 'summary.json'} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

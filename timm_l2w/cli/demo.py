"""``timm-l2w demo``: L2W vs equal weighting on built-in data, in a few minutes on a CPU.

Trains the same multi-exit model with the L2W weighted loss and meta step and with equal weights, for
several seeds (same seed, data order and schedule within a pair), evaluates every run (anytime and
the 39 budgets of the paper's budgeted evaluation, thresholds calibrated on the held-out split), and
reports the difference with two uncertainties: the spread over seeds (paired differences, Student t
interval: another seed, or another CPU's rounding, is another training run) and a paired bootstrap over
the test images (the same resampled images for both weightings, the seeds held fixed). The verdict says
what the seeds can tell. It also shows what L2W learns: each L2W run checkpoints during training, and
every checkpoint's weight predictor is applied to that checkpoint's exit losses on the held-out images
(a sample's weight against its loss, per exit).

Writes ``comparison.csv`` (one row per budget), ``summary.json``, ``l2w_vs_uniform.png`` (both curves)
and ``what_l2w_learns.png`` (weight against loss per exit, and over training).

The default data, ``digits-affine`` (scikit-learn's digits, randomly rotated, scaled and shifted),
is offline and hard enough for the exits to separate: later, costlier exits are more accurate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..study.verdict import LEVEL, PAPER_GAIN, budget_correctness, verdict
from .common import add_input_size, add_version

__all__ = ["main"]

LABELS = {"l2w": "L2W", "uniform": "equal weighting"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timm-l2w demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_version(p)
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny", help="registered multi-exit model")
    p.add_argument("--model-kwargs", nargs="*", default=["n_blocks=4"], metavar="KEY=VALUE",
                   help="timm.create_model arguments (the default: the tiny MSDNet with 4 blocks, so 4 exits: "
                        "4 seeds of both weightings fit in a few minutes on 2 cores)")
    p.add_argument("--dataset", default="digits-affine", help="data set (see timm-l2w train --help)")
    p.add_argument("--data-dir", default=None, help="folder with the data set files (not needed for digits)")
    add_input_size(p, 20)
    p.add_argument("--max-steps", type=int, default=84, help="loader batches per run (84 of 64 images: three "
                   "quarters of an epoch of digits-affine, which holds 6 transformed copies of every training image)")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of --max-steps")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch (two updates on its halves)")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the cosine schedule (chosen on "
                   "equal-weighting runs only, as the one where their exits separate)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup, in updates")
    p.add_argument("--meta-lr", type=float, default=None, help="Adam lr of the weight predictor (default: the "
                   "paper's CIFAR 1e-4, as timm-l2w train)")
    p.add_argument("--backend", choices=["higher", "func"], default="func",
                   help="L2W virtual-step backend (both give the same step; func is faster on CPU)")
    p.add_argument("--seeds", type=int, default=4, help="training seeds per weighting (seeds 0..N-1); the seed "
                   "interval needs 2 or more, and 4 or more to say much")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates over the test images")
    p.add_argument("--checkpoint-every", type=int, default=12, help="L2W runs: checkpoint every N steps, for "
                   "what the predictor learns over training (0: off)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained at the same time (processes, one CPU thread each)")
    p.add_argument("--output", default="output/demo", help="folder for the runs, the table and the plots "
                   "(its run folders are overwritten)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run; the tiny model gains nothing from more, and on a busy "
                        "machine extra threads stall each other (0: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _train_one(argv: List[str], threads: int) -> Dict[str, Any]:
    """One training run (in this process or a worker): evaluation outputs, the predictor analysis (L2W runs
    with checkpoints) and the CPU time."""
    import torch

    from ..data import create_datasets, create_loaders
    from ..study.weights import weights_over_training
    from ..training.loop import train
    from .train import parse_args

    if threads:
        torch.set_num_threads(threads)
    start = time.process_time()
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="--eps .* is above")  # said once, in the demo's first lines
        run = train(args)
    ev = run["eval"]
    weights = None
    if args.weighting == "l2w" and args.checkpoint_every:
        splits = create_datasets(args.dataset, data_dir=args.data_dir, input_size=args.input_size,
                                 held_out=args.held_out)
        _, held, _ = create_loaders(splits, args.batch_size, eval_batch_size=args.eval_batch_size, drop_last=False)
        weights = weights_over_training(args.output, held, eps=args.eps, constraint=args.constraint,
                                        input_type=args.input_type)
    return {"heldout": ev["heldout"], "test": ev["test"], "flops": list(ev["flops"]), "anytime": ev["anytime"],
            "weights": weights, "settings": {k: getattr(args, k) for k in ("eps", "constraint", "meta_interval")},
            "cpu_s": time.process_time() - start}


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


def _signed(values: Sequence[float], digits: int = 2) -> str:
    return ", ".join(f"{v:+.{digits}f}" for v in values)


def _learned_lines(runs: Dict[int, List[Dict[str, Any]]]) -> List[str]:
    """Summary lines on what the predictor learned: the correlation of weight and loss per exit at the first
    and the last checkpoint (seed means; how many seeds end positive), the weights' spread, where seeds agree."""
    from ..study.weights import predictor_summary

    p = predictor_summary({s: {"weights_over_training": rows} for s, rows in runs.items() if rows})
    if p is None:
        return ["what L2W learns: no checkpoints to read it from (--checkpoint-every 0)"]
    n, k = len(p["seeds"]), len(p["corr_end"]["mean"])
    corr, pos, first = p["corr_end"]["mean"], p["seeds_positive"], p["corr_mean_over_steps"][0]
    spread = [float(np.mean([rows[i]["weight_std"] for rows in runs.values() if rows])) for i in (0, -1)]
    falls = [i + 1 for i in range(k) if pos[i] == 0]
    rises = [i + 1 for i in range(k) if pos[i] == n]
    mixed = [i + 1 for i in range(k) if i + 1 not in falls + rises]

    def exits(ks: List[int]) -> str:
        return f"exit{'s' * (len(ks) > 1)} {', '.join(map(str, ks))}"

    said = ([f"falls with the loss at {exits(falls)}"] if falls else []) + \
        ([f"rises with it at {exits(rises)}"] if rises else [])
    agree = f"in every seed the weight {' and '.join(said)}" if said else "no exit where every seed agrees on the sign"
    return [f"what L2W learns (every checkpoint's predictor applied to its own exit losses on the held-out images): "
            f"correlation of a sample's weight with its loss per exit, mean over {n} seeds, at step {p['steps'][0]} "
            f"{' / '.join(f'{c:+.2f}' for c in first)}, at step {p['steps'][-1]} "
            f"{' / '.join(f'{c:+.2f}' for c in corr)} "
            f"(seeds ending positive: {' / '.join(map(str, pos))} of {n}); the weights' spread within an exit (std) "
            f"went from {spread[0]:.2f} to {spread[1]:.2f}, range at the end {p['weight_range_end'][0]:.2f} to "
            f"{p['weight_range_end'][1]:.2f}",
            f"  {agree}" + (f"; the seeds disagree at {exits(mixed)}" if mixed and said else "")
            + f" (after {p['steps'][-1]} steps; the Fashion-MNIST study in benchmarks/RESULTS.md finds one pattern in "
              f"all its seeds only after 300 steps, mixed at step 50)"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from ..evaluation import budgeted_evaluation, plot_budgeted
    from ..files import csv_text, write_json_atomic, write_text_atomic
    from ..study.plots import plot_weights_vs_loss
    from ..study.stats import paired_bootstrap, seeds_for_half_width, t_interval

    args = _parser().parse_args(list(argv) if argv is not None else None)
    for flag in ("seeds", "bootstrap", "jobs", "batch_size", "input_size", "max_steps", "epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"timm-l2w demo: error: --{flag.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.checkpoint_every < 0:
        print(f"timm-l2w demo: error: --checkpoint-every must be >= 0, got {args.checkpoint_every}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    common = ["--model", args.model, "--dataset", args.dataset, "--input-size", str(args.input_size),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
              "--backend", args.backend, "--log-with", "none", "--no-progress", "--overwrite"]
    common += ["--model-kwargs", *args.model_kwargs] if args.model_kwargs else []
    common += ["--epochs", str(args.epochs)] if args.epochs else ["--max-steps", str(args.max_steps)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    if args.meta_lr is not None:
        common += ["--meta-lr", str(args.meta_lr)]
    ckpt = (["--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", "1000"]
            if args.checkpoint_every else [])
    jobs = [{"weighting": w, "label": LABELS[w], "seed": s,
             "argv": common + (ckpt if w == "l2w" else []) + ["--weighting", w, "--seed", str(s),
                                                              "--output", str(out / f"{w}_seed{s}")]}
            for w in ("l2w", "uniform") for s in range(args.seeds)]  # L2W first: the longer runs
    kwargs = f" ({', '.join(args.model_kwargs)})" if args.model_kwargs else ""
    length = f"{args.epochs} epoch(s)" if args.epochs else f"{args.max_steps} steps"
    print(f"timm-l2w demo: {args.model}{kwargs} on {args.dataset} ({args.input_size}x{args.input_size}), {length} "
          f"per run, L2W vs equal weighting, {args.seeds} seed(s) each; {min(args.jobs, len(jobs))} run(s) at a time",
          flush=True)
    print("L2W at the paper's CIFAR settings (eps 0.8, col constraint, a meta step every update): eps 0.8 lets a "
          "sample's weight go below zero (docs/method.md §2)", flush=True)
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
    a, b = np.stack(correct["l2w"]), np.stack(correct["uniform"])  # [S, B, N]
    stats = paired_bootstrap(a, b, reps=args.bootstrap, level=LEVEL / 100)
    acc = {w: np.stack(correct[w]).mean(-1) * 100 for w in correct}  # [S, B] top-1 per seed and budget
    diff_by_seed = acc["l2w"] - acc["uniform"]  # [S, B] paired by seed
    _, seed_lo, seed_hi = t_interval(diff_by_seed, LEVEL / 100)  # [B]
    per_seed = diff_by_seed.mean(1)  # [S]: mean over the budgets
    mean_diff, mean_lo, mean_hi = (float(v) for v in t_interval(per_seed, LEVEL / 100))
    spread = float(per_seed.std(ddof=1)) if args.seeds > 1 else float("nan")
    needed = seeds_for_half_width(spread, PAPER_GAIN, LEVEL / 100) if args.seeds > 1 else None
    mflops = {w: np.mean([c.expected_flops.numpy() for c in curves[w]], axis=0) / 1e6 for w in curves}
    exits = {w: np.mean([[r["top1"] for r in a_] for a_ in anytime[w]], axis=0) for w in anytime}
    exit_mflops = np.array([r["flops"] for r in anytime["l2w"][0]]) / 1e6
    q = curves["l2w"][0].q.numpy()

    def r4(x: Any) -> Optional[float]:
        return None if not np.isfinite(x) else round(float(x), 4)

    rows = [{"budget": j + 1, "q": round(float(q[j]), 4),
             "l2w_mflops": r4(mflops["l2w"][j]), "l2w_top1": r4(stats["a"][j]),
             "uniform_mflops": r4(mflops["uniform"][j]), "uniform_top1": r4(stats["b"][j]),
             "diff": r4(stats["diff"][j]),
             f"diff_seed_lo{LEVEL}": r4(seed_lo[j]), f"diff_seed_hi{LEVEL}": r4(seed_hi[j]),
             f"diff_lo{LEVEL}": r4(stats["diff_lo"][j]), f"diff_hi{LEVEL}": r4(stats["diff_hi"][j])}
            for j in range(len(q))]
    write_text_atomic(out / "comparison.csv", csv_text(rows))
    n_test = a.shape[-1]

    def interval(lo: Optional[float], hi: Optional[float]) -> str:
        return "       n/a       " if lo is None else f"[{lo:+6.2f}, {hi:+6.2f}]"

    print(f"\nbudgeted evaluation on the test split ({n_test} images; thresholds from the held-out split), top-1 % "
          f"averaged over {args.seeds} seed(s); difference L2W - equal with its {LEVEL}% intervals: over the seeds "
          f"(paired by seed, Student t) and over the test images (paired bootstrap, seeds held fixed)")
    print(f"{'budget':>6} {'q':>5} {'MFLOPs':>7} {'L2W':>6} {'MFLOPs':>7} {'equal':>6} {'diff':>6}  "
          f"{'seeds':^17}  {'test images':^17}")
    for r in rows:
        print(f"{r['budget']:>6} {r['q']:>5.2f} {r['l2w_mflops']:>7.2f} {r['l2w_top1']:>6.2f} "
              f"{r['uniform_mflops']:>7.2f} {r['uniform_top1']:>6.2f} {r['diff']:>+6.2f}  "
              f"{interval(r[f'diff_seed_lo{LEVEL}'], r[f'diff_seed_hi{LEVEL}'])}"
              f"  {interval(r[f'diff_lo{LEVEL}'], r[f'diff_hi{LEVEL}'])}")

    ahead, behind = int((stats["diff"] > 0).sum()), int((stats["diff"] < 0).sum())
    above, below = int((seed_lo > 0).sum()), int((seed_hi < 0).sum())
    text = verdict(per_seed, mean_lo, mean_hi, float(stats["mean_diff_lo"]), float(stats["mean_diff_hi"]), needed)
    weights = {job["seed"]: res["weights"] for job, res in zip(jobs, results) if job["weighting"] == "l2w"}
    learned = _learned_lines(weights)
    seed_part = (f"over the {args.seeds} seeds [{mean_lo:+.2f}, {mean_hi:+.2f}] (per seed {_signed(per_seed)}; "
                 f"seed spread {spread:.2f})" if args.seeds > 1 else "over the seeds: n/a with one seed")
    summary_lines = [
        f"exits ({' / '.join(f'{f:.2f}' for f in exit_mflops)} MFLOPs), top-1 % averaged over seeds:",
        f"  L2W             {' / '.join(f'{x:.1f}' for x in exits['l2w'])}",
        f"  equal weighting {' / '.join(f'{x:.1f}' for x in exits['uniform'])}",
        f"  accuracy rises with FLOPs: from exit 1 to exit {len(exit_mflops)} "
        + ", ".join(f"{exits[w][-1] - exits[w][0]:+.1f} points ({LABELS[w]})" for w in exits),
        f"budgeted curves, cheapest to costliest budget: "
        f"equal weighting {stats['b'][0]:.1f} -> {stats['b'][-1]:.1f} %, "
        f"L2W {stats['a'][0]:.1f} -> {stats['a'][-1]:.1f} %",
        f"L2W - equal weighting over the 39 budgets: {mean_diff:+.2f} points on average; {LEVEL}% interval "
        f"{seed_part}; over the test images [{float(stats['mean_diff_lo']):+.2f}, {float(stats['mean_diff_hi']):+.2f}]",
        f"L2W ahead at {ahead}, behind at {behind} of {len(q)} budgets; "
        f"the seed interval lies above zero at {above} and "
        f"below zero at {below} of them (39 overlapping tests: expect a few by chance)",
        *learned,
        f"what it says: {text}",
    ]
    print("\nsummary\n" + "\n".join(summary_lines))
    wall_s = round(time.perf_counter() - wall, 1)

    def finite(x: float) -> Optional[float]:
        return float(x) if np.isfinite(x) else None

    write_json_atomic(out / "summary.json", {
        "model": args.model, "model_kwargs": args.model_kwargs, "dataset": args.dataset, "input_size": args.input_size,
        "train_length": length, "seeds": args.seeds, "test_images": n_test, "bootstrap": args.bootstrap,
        "exit_mflops": exit_mflops.tolist(), "exit_top1": {w: exits[w].tolist() for w in exits},
        "comparison": "L2W - equal weighting, top-1 points, mean over the 39 budgets", "mean_diff": mean_diff,
        f"seed_interval{LEVEL}": [finite(mean_lo), finite(mean_hi)], "seed_spread": finite(spread),
        f"seeds_for_{PAPER_GAIN:g}_point": needed,
        f"mean_diff_interval{LEVEL}": [float(stats["mean_diff_lo"]), float(stats["mean_diff_hi"])],
        "per_seed_mean_diff": per_seed.tolist(), "budgets_ahead": ahead, "budgets_behind": behind,
        "budgets_seed_interval_above_zero": above, "budgets_seed_interval_below_zero": below,
        "what_l2w_learns": learned, "weights_over_training": {str(s): w for s, w in weights.items()},
        "verdict": text, "cpu_s": {f"{j['weighting']}_seed{j['seed']}": round(r["cpu_s"], 1)
                                   for j, r in zip(jobs, results)},
        "wall_s": wall_s})
    band = {w: t_interval(acc[w], LEVEL / 100) for w in acc}
    bands = {LABELS[w]: (mflops[w], band[w][1], band[w][2]) for w in acc} if args.seeds > 1 else None
    mean_rows = {LABELS[w]: [{"expected_flops": f * 1e6, "test_top1": x} for f, x in
                             zip(mflops[w], stats["a" if w == "l2w" else "b"])] for w in curves}
    exit_points = {LABELS[w]: [{"flops": f * 1e6, "top1": x} for f, x in zip(exit_mflops, exits[w])] for w in exits}
    shade = f"shaded: {LEVEL}% interval over the {args.seeds} seeds" if bands else "one seed: no interval"
    plot = plot_budgeted(mean_rows, out / "l2w_vs_uniform.png", anytime=exit_points, bands=bands,
                         title=f"{args.model}{kwargs} on {args.dataset}, {args.seeds} seed(s)\n{shade}")
    written = [out / "comparison.csv", out / "summary.json", plot]
    if any(weights.values()):
        written.append(plot_weights_vs_loss(weights, out / "what_l2w_learns.png",
                                            f"what L2W learns: {args.model}{kwargs} on {args.dataset}"))
    print(f"\nwrote {', '.join(map(str, written))} (wall time {wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

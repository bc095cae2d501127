"""Does L2W beat equal weighting? Seeded study on Fashion-MNIST at 32x32 (issue 8).

For every seed, the same multi-exit network (default ``msdnet_l2w_cifar_tiny``, 5 exits) is trained
twice through ``timm_l2w.train`` with the same data order, schedule and initialisation: once with
L2W (the paper's CIFAR settings: eps 0.8, col constraint, loss input, target_p_index 15,
meta_interval 1, Adam 1e-4 / wd 1e-4 meta optimizer with cosine annealing) and once with equal
weighting. Each run is evaluated by the package (anytime accuracy of every exit; budgeted accuracy
for the paper's 39 exit distributions, thresholds calibrated on the held-out split of 5,000
training images, accuracy and expected FLOPs on the 10,000 test images).

Runs execute as separate one-thread processes, ``--jobs`` at a time; each writes
``RESULTS/<weighting>_seed<s>.json`` as soon as it finishes and a run whose file exists is skipped,
so the script can be stopped and restarted. Training folders (checkpoints) go to ``RESULTS/runs/``.
L2W runs also checkpoint every ``--checkpoint-every`` steps; after the run the predictor of every
checkpoint is applied to that checkpoint's exit losses on 1,000 held-out images to show how the
predicted weights evolve during training.

The summary (``summary.json``, ``summary.md``, ``l2w_vs_uniform.png``) puts every budgeted curve on
a common grid of 39 FLOPs values (linear interpolation over the range all curves cover) and gives,
per weighting, mean and standard deviation over seeds; the gain of L2W at each grid point (difference
of the means), its mean over the grid, the share of grid points where L2W is ahead, and the same gain
paired by seed (mean and std over seeds of each seed's mean gain).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``) or the four IDX files in ``--data-dir``.

    python benchmarks/fidelity.py [--seeds 0 1 2] [--steps 300] [--jobs 2] [--out benchmarks/results/fidelity]
    python benchmarks/fidelity.py --summarize-only      # aggregate the result files present
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from timm_l2w.files import write_bytes_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fidelity"
WEIGHTINGS = ("l2w", "uniform")
LABELS = {"l2w": "L2W", "uniform": "equal weighting"}
# a run variant: (weighting, extra `timm-l2w train` flags); "l2w" is the preset's meta interval (1, CIFAR)
VARIANTS = {"l2w": ("l2w", []), "uniform": ("uniform", []),
            "l2w_int10": ("l2w", ["--meta-interval", "10"]), "l2w_int100": ("l2w", ["--meta-interval", "100"])}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for result files, logs and plots")
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's location)")
    p.add_argument("--steps", type=int, default=300, help="loader batches per run (two updates each)")
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs instead of --steps")
    p.add_argument("--variants", nargs="+", default=list(WEIGHTINGS), choices=sorted(VARIANTS),
                   help="runs per seed: l2w (preset meta interval), uniform, l2w_int10, l2w_int100")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20, help="linear warmup, in updates")
    p.add_argument("--checkpoint-every", type=int, default=50, help="L2W runs: checkpoint every N steps for "
                   "the weights-over-training analysis (0: off)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `timm-l2w train` flags for both weightings (e.g. --eps 0.4); put it last")
    p.add_argument("--summarize-only", action="store_true", help="only aggregate the result files present")
    p.add_argument("--run-one", nargs=2, metavar=("WEIGHTING", "SEED"), help=argparse.SUPPRESS)
    return p


def _shown(value: Any) -> str:
    """A path (or argument) as recorded in results: relative to the repository when inside it."""
    text = str(value)
    root = f"{ROOT}{os.sep}"
    return text[len(root):] if text.startswith(root) else text


def _result_path(out: Path, weighting: str, seed: int) -> Path:
    return out / f"{weighting}_seed{seed}.json"


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(_clean(obj), indent=1) + "\n")


def _code_version() -> Dict[str, Any]:
    """The commit and a hash of any uncommitted change to timm_l2w/ (the tree is shared and moving)."""
    import hashlib

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "timm_l2w")
    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "timm_l2w_uncommitted_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def _clean(value: Any) -> Any:
    """JSON-safe copy: inf/nan floats become strings, tensors lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ----------------------------------------------------------------------------- one run (child process)


def _train_argv(args: argparse.Namespace, variant: str, seed: int, output: Path) -> List[str]:
    weighting, variant_flags = VARIANTS[variant]
    length = ["--epochs", str(args.epochs)] if args.epochs else ["--max-steps", str(args.steps)]
    argv = ["--model", args.model, "--dataset", "fashion-mnist", "--input-size", "32", *length,
            "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--warmup-steps", str(args.warmup_steps), "--weighting", weighting, "--seed", str(seed),
            "--output", str(output), "--log-with", "none", "--no-progress", "--cpu"]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.checkpoint_every:  # every run can resume; L2W runs keep them all for the weights analysis
        keep = "1000" if weighting == "l2w" else "2"
        argv += ["--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", keep]
    return argv + variant_flags + list(args.extra)


def weights_over_training(run_dir: Path, model_name: str, train_args: argparse.Namespace,
                          n_images: int = 1000) -> List[Dict[str, Any]]:
    """For every checkpoint of an L2W run: its predictor's weights on its own exit losses.

    Uses the first ``n_images`` held-out images (model in eval mode). Per exit: mean and std of the
    weight, mean loss, and the Pearson correlation between a sample's loss and its weight.
    """
    import timm
    import torch

    from timm_l2w.checkpoint import load_state_dict
    from timm_l2w.data import create_datasets, create_loaders
    from timm_l2w.evaluate import collect_exit_outputs
    from timm_l2w.weighting import WeightPredictor, sample_weights

    splits = create_datasets("fashion-mnist", data_dir=train_args.data_dir, input_size=32)
    splits.held_out = torch.utils.data.Subset(splits.held_out, range(n_images))
    _, held, _ = create_loaders(splits, 64, eval_batch_size=250, drop_last=False)
    rows = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        if not (ckpt / "COMPLETE").is_file():
            continue
        model = timm.create_model(model_name, num_classes=splits.num_classes, in_chans=3)
        model.load_state_dict(load_state_dict(ckpt / "model.safetensors"))
        net = WeightPredictor.from_state_dict(load_state_dict(ckpt / "weight_predictor.safetensors"),
                                              input_type=train_args.input_type)
        out = collect_exit_outputs(model, held)
        with torch.no_grad():
            w = sample_weights(net, out.losses.float(), eps=train_args.eps, constraint=train_args.constraint)
        loss = out.losses.float()
        corr = []
        for k in range(loss.shape[1]):
            a, b = loss[:, k] - loss[:, k].mean(), w[:, k] - w[:, k].mean()
            denom = float(a.norm() * b.norm())
            corr.append(float((a * b).sum()) / denom if denom > 0 else float("nan"))
        rows.append({"step": int(ckpt.name.split("_")[1]),
                     "weight_mean": w.mean(0).tolist(), "weight_std": w.std(0).tolist(),
                     "loss_mean": loss.mean(0).tolist(), "corr_loss_weight": corr,
                     "weight_min": float(w.min()), "weight_max": float(w.max())})
    return rows


def run_one(args: argparse.Namespace, variant: str, seed: int) -> Path:
    """Train + evaluate one (variant, seed) in this process; write its result file.

    A run stopped part-way continues from its newest complete checkpoint (``--resume auto``).
    """
    import torch

    torch.set_num_threads(1)
    from timm_l2w import train as train_mod

    out = Path(args.out)
    weighting = VARIANTS[variant][0]
    run_dir = out / "runs" / f"{variant}_seed{seed}"
    argv = _train_argv(args, variant, seed, run_dir)
    resumed = any((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    targs = train_mod.parse_args(argv + (["--resume", "auto"] if resumed else []))
    code = _code_version()
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_mod.train(targs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ev = result["eval"]
    record: Dict[str, Any] = {
        "variant": variant, "weighting": weighting, "seed": seed, "model": args.model,
        "train_argv": [_shown(a) for a in argv], "code": code, "resumed": resumed, "cpu_s": cpu,
        "settings": {k: getattr(targs, k) for k in ("eps", "constraint", "input_type", "target_p_index",
                                                   "meta_interval", "meta_lr", "meta_weight_decay", "hidden",
                                                   "lr", "momentum", "weight_decay", "batch_size", "max_steps",
                                                   "warmup_steps", "backend")},
        "wall_s": wall, "train_s": sum(r["time_s"] for r in result["history"]),
        "flops": [float(f) for f in ev["flops"]],
        "anytime": ev["anytime"], "budgeted": ev["budgeted"].rows(), "history": result["history"],
    }
    if weighting == "l2w" and args.checkpoint_every:
        record["weights_over_training"] = weights_over_training(run_dir, args.model, targs)
    path = _result_path(out, variant, seed)
    _write_json(path, record)
    print(f"{variant} seed {seed}: done in {wall:.0f}s -> {_shown(path)}", flush=True)
    return path


# ----------------------------------------------------------------------------- orchestration


def launch_all(args: argparse.Namespace) -> None:
    """Run every missing (weighting, seed) in child processes, ``--jobs`` at a time."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # seed by seed (a stopped study leaves complete comparisons), variants in the order given
    todo = [(w, s) for s in args.seeds for w in args.variants if not _result_path(out, w, s).is_file()]
    done = [(w, s) for s in args.seeds for w in args.variants if (w, s) not in todo]
    if done:
        print(f"skipping finished runs: {done}", flush=True)
    running: List[tuple] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    passthrough = ["--out", str(out), "--model", args.model, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                   "--warmup-steps", str(args.warmup_steps), "--checkpoint-every", str(args.checkpoint_every)]
    if args.epochs:
        passthrough += ["--epochs", str(args.epochs)]
    if args.data_dir:
        passthrough += ["--data-dir", args.data_dir]
    if args.extra:
        passthrough += ["--extra", *args.extra]
    failed = []
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            w, s = todo.pop(0)
            log = open(out / f"{w}_seed{s}.log", "w")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", w, str(s), *passthrough]
            print(f"start {w} seed {s}", flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, w, s))
        time.sleep(2)
        for item in list(running):
            proc, log, w, s = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"finished {w} seed {s}: exit code {proc.returncode}", flush=True)
                if proc.returncode != 0:
                    failed.append((w, s))
    if failed:
        print(f"failed runs (see their .log files): {failed}", flush=True)


# ----------------------------------------------------------------------------- summary


def _curve(record: Dict[str, Any]) -> tuple:
    rows = record["budgeted"]
    f = np.array([r["expected_flops"] for r in rows], dtype=np.float64) / 1e6
    a = np.array([r["test_top1"] for r in rows], dtype=np.float64)
    order = np.argsort(f, kind="stable")
    return f[order], a[order]


def _ms(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def summarize(out: Path, seeds: Sequence[int], points: int = 39) -> Optional[Dict[str, Any]]:
    records = {w: {} for w in WEIGHTINGS}
    for w in WEIGHTINGS:
        for s in seeds:
            path = _result_path(out, w, s)
            if path.is_file():
                records[w][s] = json.loads(path.read_text())
    if not all(records[w] for w in WEIGHTINGS):
        print("not enough results to compare yet: " + ", ".join(f"{w}: seeds {sorted(records[w])}" for w in WEIGHTINGS))
        return None
    curves = {w: {s: _curve(r) for s, r in records[w].items()} for w in WEIGHTINGS}
    all_curves = [c for w in WEIGHTINGS for c in curves[w].values()]
    lo = max(f.min() for f, _ in all_curves)
    hi = min(f.max() for f, _ in all_curves)
    grid = np.linspace(lo, hi, points)
    on_grid = {w: {s: np.interp(grid, f, a) for s, (f, a) in curves[w].items()} for w in WEIGHTINGS}
    stats = {}
    for w in WEIGHTINGS:
        m = np.stack(list(on_grid[w].values()))
        stats[w] = {"mean": m.mean(0), "std": m.std(0, ddof=1) if m.shape[0] > 1 else np.zeros(points)}
    gain = stats["l2w"]["mean"] - stats["uniform"]["mean"]
    paired = sorted(set(records["l2w"]) & set(records["uniform"]))
    per_seed_gain = {s: float((on_grid["l2w"][s] - on_grid["uniform"][s]).mean()) for s in paired}
    per_seed_share = {s: float(((on_grid["l2w"][s] - on_grid["uniform"][s]) > 0).mean()) for s in paired}
    # the same comparison by budget index (same q, thresholds on the held-out split), paired by seed
    by_q = [float(np.mean([records["l2w"][s]["budgeted"][b]["test_top1"] - records["uniform"][s]["budgeted"][b]["test_top1"]
                           for s in paired])) for b in range(len(records["l2w"][paired[0]]["budgeted"]))] if paired else []
    num_exits = len(next(iter(records["l2w"].values()))["anytime"])
    anytime = {w: [_ms([r["anytime"][k]["top1"] for r in records[w].values()]) for k in range(num_exits)]
               for w in WEIGHTINGS}
    peak = {w: _ms([max(row["test_top1"] for row in r["budgeted"]) for r in records[w].values()]) for w in WEIGHTINGS}
    flops = next(iter(records["l2w"].values()))["flops"]
    time_s = {w: _ms([r["train_s"] for r in records[w].values()]) for w in WEIGHTINGS}
    summary = {
        "seeds": {w: sorted(records[w]) for w in WEIGHTINGS},
        "settings": next(iter(records["l2w"].values()))["settings"],
        "model": next(iter(records["l2w"].values()))["model"],
        "exit_mflops": [f / 1e6 for f in flops],
        "grid_mflops": grid.tolist(),
        "curve_mean": {w: stats[w]["mean"].tolist() for w in WEIGHTINGS},
        "curve_std": {w: stats[w]["std"].tolist() for w in WEIGHTINGS},
        "gain_on_grid": gain.tolist(),
        "mean_gain": float(gain.mean()),
        "share_ahead": float((gain > 0).mean()),
        "paired_gain_per_seed": per_seed_gain,
        "paired_mean_gain": _ms(list(per_seed_gain.values())) if per_seed_gain else None,
        "paired_share_ahead_per_seed": per_seed_share,
        "gain_by_budget_index": by_q,
        "mean_gain_by_budget_index": float(np.mean(by_q)) if by_q else None,
        "gain_at_training_q": _train_q_gain(records, paired),
        "share_ahead_by_budget_index": float(np.mean(np.array(by_q) > 0)) if by_q else None,
        "anytime_top1": anytime,
        "peak_budgeted_top1": peak,
        "train_s": time_s,
    }
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(_markdown(summary))
    _plot(summary, records, out / "l2w_vs_uniform.png")
    return summary


def _train_q_gain(records: Dict[str, Dict[int, Any]], paired: Sequence[int]) -> Optional[Dict[str, Any]]:
    """Test top-1 of both weightings at the budget of the training distribution (q = j/20), per seed."""
    if not paired:
        return None
    j = records["l2w"][paired[0]]["settings"]["target_p_index"]
    rows = {w: [next(r for r in records[w][s]["budgeted"] if r["q"] is not None and abs(r["q"] - j / 20) < 1e-9)
                for s in paired] for w in WEIGHTINGS}
    gains = [a["test_top1"] - b["test_top1"] for a, b in zip(rows["l2w"], rows["uniform"])]
    return {"q": j / 20, "l2w": _ms([r["test_top1"] for r in rows["l2w"]]),
            "uniform": _ms([r["test_top1"] for r in rows["uniform"]]), "gain": _ms(gains),
            "mflops": {w: _ms([r["expected_flops"] / 1e6 for r in rows[w]]) for w in WEIGHTINGS}}


def _markdown(s: Dict[str, Any]) -> str:
    lines = [f"seeds: L2W {s['seeds']['l2w']}, equal weighting {s['seeds']['uniform']}", "",
             "| exit | MFLOPs | L2W top-1 | equal top-1 |", "|---|---|---|---|"]
    for k, mf in enumerate(s["exit_mflops"]):
        a, b = s["anytime_top1"]["l2w"][k], s["anytime_top1"]["uniform"][k]
        lines.append(f"| {k + 1} | {mf:.2f} | {a['mean']:.2f} ± {a['std']:.2f} | {b['mean']:.2f} ± {b['std']:.2f} |")
    lines += ["", "| avg MFLOPs | L2W top-1 | equal top-1 | gain |", "|---|---|---|---|"]
    for i in range(0, len(s["grid_mflops"]), 4):
        lines.append(f"| {s['grid_mflops'][i]:.2f} | {s['curve_mean']['l2w'][i]:.2f} ± {s['curve_std']['l2w'][i]:.2f} | "
                     f"{s['curve_mean']['uniform'][i]:.2f} ± {s['curve_std']['uniform'][i]:.2f} | {s['gain_on_grid'][i]:+.2f} |")
    pg = s["paired_mean_gain"]
    lines += ["", f"mean gain over the {len(s['grid_mflops'])} grid budgets: {s['mean_gain']:+.3f} points; "
              f"L2W ahead at {100 * s['share_ahead']:.0f}% of them",
              f"paired by seed: {pg['mean']:+.3f} ± {pg['std']:.3f} points (per seed: "
              + ", ".join(f"{k}: {v:+.3f}" for k, v in s["paired_gain_per_seed"].items()) + ")",
              f"by budget index (same q): mean gain {s['mean_gain_by_budget_index']:+.3f}, L2W ahead at "
              f"{100 * s['share_ahead_by_budget_index']:.0f}% of the 39",
              (lambda t: f"at the training distribution q = {t['q']:.2f}: L2W {t['l2w']['mean']:.2f} ± {t['l2w']['std']:.2f} "
               f"at {t['mflops']['l2w']['mean']:.2f} MFLOPs, equal {t['uniform']['mean']:.2f} ± {t['uniform']['std']:.2f} at "
               f"{t['mflops']['uniform']['mean']:.2f} MFLOPs, paired gain {t['gain']['mean']:+.2f} ± {t['gain']['std']:.2f}")(s["gain_at_training_q"]),
              f"peak budgeted top-1: L2W {s['peak_budgeted_top1']['l2w']['mean']:.2f} ± {s['peak_budgeted_top1']['l2w']['std']:.2f}, "
              f"equal {s['peak_budgeted_top1']['uniform']['mean']:.2f} ± {s['peak_budgeted_top1']['uniform']['std']:.2f}",
              f"training time per run (s, one thread): L2W {s['train_s']['l2w']['mean']:.0f}, "
              f"equal {s['train_s']['uniform']['mean']:.0f}", ""]
    return "\n".join(lines)


def _plot(s: Dict[str, Any], records: Dict[str, Dict[int, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(s["grid_mflops"])
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        for w, color in zip(WEIGHTINGS, ("tab:red", "tab:blue")):
            m, sd = np.array(s["curve_mean"][w]), np.array(s["curve_std"][w])
            n = len(s["seeds"][w])
            ax.plot(grid, m, color=color, label=f"{LABELS[w]} (mean of {n} seeds)")
            ax.fill_between(grid, m - sd, m + sd, color=color, alpha=0.2, linewidth=0)
            am = [a["mean"] for a in s["anytime_top1"][w]]
            asd = [a["std"] for a in s["anytime_top1"][w]]
            ax.errorbar(s["exit_mflops"], am, yerr=asd, fmt="*", color=color, markersize=8, capsize=3,
                        label=f"{LABELS[w]} exits")
        ax.set_xlabel("average MFLOPs per image (test)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{s['model']}, Fashion-MNIST 32x32 (mean ± std)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.run_one:
        run_one(args, args.run_one[0], int(args.run_one[1]))
        return 0
    import timm_l2w  # noqa: F401  (fail early if the package is not installed)

    out = Path(args.out)
    if not args.summarize_only:
        launch_all(args)
    summary = summarize(out, args.seeds)
    if summary is not None:
        print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

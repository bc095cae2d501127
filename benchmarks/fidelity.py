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

Variants besides L2W and equal weighting: L2W at meta interval 10 and 100 (issue 14), and IMTA's
methods (issue 15): equal weighting with gradient equilibrium and one-for-all distillation
(``uniform_ge_kd``) and L2W with distillation (``l2w_kd``). Every run's result file also holds its
budgeted curves under the entropy and patience exit rules (``budgeted_rules``), computed from the same
exit outputs. ``--device cuda`` trains and evaluates every run on the visible GPU
(``benchmarks/gpu_study.sh`` runs the study that way in one prepared script).

The summary (``summary.json``, ``summary.md``, ``l2w_vs_uniform.png``, ``gain_vs_cost.png``) works on
whatever result files exist (it says which are missing) and compares every variant present with
equal weighting of the same seeds. Every budgeted curve goes on one common grid of 39 FLOPs
values (linear interpolation over the range all curves cover). Per L2W variant: the gain of the
seed-mean curves on the grid (mean, share of grid points ahead); the paired gain per seed with a 95%
Student t interval and a percentile bootstrap interval over seeds (the result files hold no per-sample
outputs); the same budget by budget (same q); the gain at the training q; the peak; the anytime gain
per exit; the cost ratio per seed pair (CPU and wall seconds; resumed runs, whose times cover only the
last segment, are left out); and the predictor analysis (weight vs loss correlation per exit at the
end of training and over the checkpoints).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``) or the four IDX files in ``--data-dir``.

    python benchmarks/fidelity.py [--seeds 0 1 2] [--steps 300] [--jobs 2] [--out benchmarks/results/fidelity]
    python benchmarks/fidelity.py --summarize-only      # aggregate the result files present
    python benchmarks/fidelity.py --summarize-only --out DIR --seeds 0 1 2 --variants l2w uniform l2w_int10 l2w_int100
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
            "l2w_int10": ("l2w", ["--meta-interval", "10"]), "l2w_int100": ("l2w", ["--meta-interval", "100"]),
            # the field's other training methods (IMTA's gradient equilibrium and one-for-all distillation)
            "uniform_ge_kd": ("uniform", ["--gradient-equilibrium", "--distill"]),
            "l2w_kd": ("l2w", ["--distill"])}
METHOD_LABELS = {"uniform_ge_kd": "equal weighting + GE + KD", "l2w_kd": "L2W + KD"}
# exit rules evaluated on every run besides the paper's max-softmax confidence (same exit outputs)
EXTRA_RULES = ("entropy", "patience")


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
                   help="runs per seed: l2w (preset meta interval), uniform, l2w_int10, l2w_int100 (the "
                   "summary covers every variant present and reports these when missing)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20, help="linear warmup, in updates")
    p.add_argument("--checkpoint-every", type=int, default=50, help="L2W runs: checkpoint every N steps for "
                   "the weights-over-training analysis (0: off)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the runs train and evaluate (cuda: every run on the one visible GPU)")
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

    # a copy of the tree whose git metadata may be missing or stale (e.g. on a lent GPU machine) names
    # its commit in STUDY_COMMIT; the uncommitted hash is then taken against that commit when git has it
    named = os.environ.get("STUDY_COMMIT")
    if named and git("cat-file", "-t", named).strip() == "commit":
        diff = git("diff", named, "--", "timm_l2w")
    else:
        diff = git("diff", "HEAD", "--", "timm_l2w")
    return {"commit": named or git("rev-parse", "HEAD").strip() or None,
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
            "--output", str(output), "--log-with", "none", "--no-progress"]
    if getattr(args, "device", "cpu") == "cpu":
        argv.append("--cpu")
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


def exit_rule_rows(ev: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Budgeted rows of the other exit rules on the run's own held-out and test outputs.

    ``ev`` is ``timm_l2w.train``'s evaluation (confidence rule, in ``record["budgeted"]``); entropy is
    calibrated like confidence (the 39 distributions), patience has one budget per p = 1..K.
    """
    from timm_l2w.evaluate import budgeted_evaluation

    return {rule: budgeted_evaluation(ev["heldout"], ev["test"], ev["flops"], rule=rule).rows() for rule in EXTRA_RULES}


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
    record["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record["budgeted_rules"] = exit_rule_rows(ev)
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
                   "--warmup-steps", str(args.warmup_steps), "--checkpoint-every", str(args.checkpoint_every),
                   "--device", args.device]
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

REFERENCE = "uniform"  # every L2W variant is compared with equal weighting of the same seed
N_BOOTSTRAP = 10000
# the paper's budget distributions are q = j / 20 (j = 1..39); the training distribution is j = target_p_index
_Q_STEP = 20


def variant_label(variant: str, settings: Optional[Dict[str, Any]] = None) -> str:
    """How a variant is named in tables and plots (L2W variants by their meta interval)."""
    if variant in METHOD_LABELS:
        return METHOD_LABELS[variant]
    if VARIANTS.get(variant, (variant,))[0] != "l2w":
        return LABELS.get(variant, variant)
    interval = (settings or {}).get("meta_interval")
    return f"L2W, meta interval {interval}" if interval is not None else f"L2W ({variant})"


def load_records(out: Path, seeds: Sequence[int]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """The result files present in ``out`` for ``seeds``: ``{variant: {seed: record}}``, known variants only."""
    records: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for variant in VARIANTS:
        for seed in seeds:
            path = _result_path(out, variant, seed)
            if not path.is_file():
                continue
            try:
                records.setdefault(variant, {})[seed] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{_shown(path)} is not a readable result file ({exc}); delete it and rerun the "
                                 "study's command (runs whose result file exists are skipped)")
    return records


def missing_runs(out: Path, variants: Sequence[str], seeds: Sequence[int],
                 records: Dict[str, Dict[int, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per variant asked for or present: the seeds without a result file and the newest checkpoint of each."""
    missing = {}
    for variant in dict.fromkeys([*variants, *records]):
        absent = [s for s in seeds if s not in records.get(variant, {})]
        if not absent:
            continue
        progress = {}
        for s in absent:
            done = sorted((out / "runs" / f"{variant}_seed{s}" / "checkpoints").glob("step_*/COMPLETE"))
            if done:
                progress[s] = int(done[-1].parent.name.split("_")[1])
        missing[variant] = {"seeds": absent, "checkpoint_step": progress}
    return missing


def _ms(values: Sequence[float]) -> Optional[Dict[str, float]]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def mean_with_intervals(values: Sequence[float], seed: int = 0) -> Optional[Dict[str, Any]]:
    """Mean, std and n of ``values`` (one per seed) with two 95% intervals for the mean.

    ``ci95_t``: Student t interval (n - 1 degrees of freedom); ``ci95_bootstrap``: percentile interval of
    the mean over ``N_BOOTSTRAP`` resamples of the values with replacement. Both are None for n < 2.
    """
    stats = _ms(values)
    if stats is None:
        return None
    stats.update(ci95_t=None, ci95_bootstrap=None)
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return stats
    from scipy import stats as sps

    sem = v.std(ddof=1) / math.sqrt(v.size)
    lo_hi = sps.t.interval(0.95, v.size - 1, loc=v.mean(), scale=sem) if sem > 0 else (v.mean(), v.mean())
    stats["ci95_t"] = [float(lo_hi[0]), float(lo_hi[1])]
    if sem > 0:
        boot = sps.bootstrap((v,), np.mean, n_resamples=N_BOOTSTRAP, method="percentile",
                             confidence_level=0.95, rng=np.random.default_rng(seed))
        stats["ci95_bootstrap"] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    else:
        stats["ci95_bootstrap"] = [float(v.mean()), float(v.mean())]
    return stats


def cost_ratio(runs: Dict[int, Dict[str, Any]], reference: Dict[int, Dict[str, Any]], key: str) -> Dict[str, Any]:
    """Per seed, ``runs[s][key] / reference[s][key]`` (same seed, same study), and their mean.

    A pair is left out when either run was resumed (its times cover only the last segment) or lacks ``key``.
    """
    per_seed, excluded = {}, {}
    for s in sorted(set(runs) & set(reference)):
        a, b = runs[s], reference[s]
        if a.get("resumed") or b.get("resumed"):
            excluded[s] = "resumed run (times cover only its last segment)"
        elif a.get(key) is None or b.get(key) is None:
            excluded[s] = f"{key} not recorded"
        else:
            per_seed[s] = float(a[key]) / float(b[key])
    values = list(per_seed.values())
    return {"key": key, "per_seed": per_seed, "mean": float(np.mean(values)) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None, "excluded": excluded}


def run_costs(runs: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """CPU, wall and training seconds per run; means over the runs that were not resumed."""
    whole = [s for s in sorted(runs) if not runs[s].get("resumed")]
    cost: Dict[str, Any] = {"resumed_seeds": [s for s in sorted(runs) if runs[s].get("resumed")]}
    for key in ("cpu_s", "wall_s", "train_s"):
        cost[key] = {s: runs[s].get(key) for s in sorted(runs)}
        cost[f"{key}_stats"] = _ms([runs[s][key] for s in whole if runs[s].get(key) is not None])
    return cost


def _curve(rows: Sequence[Dict[str, Any]]) -> tuple:
    """A budgeted curve's (MFLOPs, test top-1) arrays, sorted by FLOPs."""
    f = np.array([r["expected_flops"] for r in rows], dtype=np.float64) / 1e6
    a = np.array([r["test_top1"] for r in rows], dtype=np.float64)
    order = np.argsort(f, kind="stable")
    return f[order], a[order]


def _num(value: Any) -> float:
    """A number from a result file (non-finite floats are stored as strings)."""
    return float(value) if value is not None else float("nan")


def predictor_summary(runs: Dict[int, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Weight vs loss correlation per exit from each run's ``weights_over_training``.

    End of training: each seed's last checkpoint (mean, min, max over seeds of the correlation; mean
    weight per exit). Trajectory: the seed-mean correlation at every checkpoint step all seeds have, and
    per exit the first step from which that mean keeps the sign it ends with.
    """
    rows = {s: r["weights_over_training"] for s, r in runs.items() if r.get("weights_over_training")}
    if not rows:
        return None
    last = {s: w[-1] for s, w in rows.items()}
    corr_end = np.array([[_num(c) for c in last[s]["corr_loss_weight"]] for s in sorted(last)])
    weight_end = np.array([[_num(c) for c in last[s]["weight_mean"]] for s in sorted(last)])
    steps = sorted(set.intersection(*[{row["step"] for row in w} for w in rows.values()]))
    traj = np.array([[[_num(c) for c in next(row for row in rows[s] if row["step"] == step)["corr_loss_weight"]]
                      for step in steps] for s in sorted(rows)])  # seeds x steps x exits
    traj_mean = np.nanmean(traj, axis=0) if steps else np.zeros((0, corr_end.shape[1]))
    settled = []
    for k in range(traj_mean.shape[1]):
        sign = np.sign(traj_mean[-1, k]) if steps else 0.0
        differs = np.nonzero(np.sign(traj_mean[:, k]) != sign)[0]  # steps with another sign (or nan)
        idx = int(differs[-1]) + 1 if differs.size else 0
        settled.append(steps[idx] if steps and sign != 0 and idx < len(steps) else None)
    return {
        "seeds": sorted(rows),
        "end_step": {s: last[s]["step"] for s in sorted(last)},
        "corr_end": {"mean": np.nanmean(corr_end, 0).tolist(), "min": np.nanmin(corr_end, 0).tolist(),
                     "max": np.nanmax(corr_end, 0).tolist()},
        "weight_mean_end": np.nanmean(weight_end, 0).tolist(),
        "weight_range_end": [min(_num(last[s]["weight_min"]) for s in last), max(_num(last[s]["weight_max"]) for s in last)],
        "steps": steps,
        "corr_mean_over_steps": traj_mean.tolist(),
        "sign_settled_from_step": settled,
    }


def _at_q(rows: Sequence[Dict[str, Any]], q: float) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if r.get("q") is not None and abs(r["q"] - q) < 1e-9), None)


def _train_q_gain(runs: Dict[int, Any], reference: Dict[int, Any], paired: Sequence[int],
                  target_p_index: Optional[int]) -> Optional[Dict[str, Any]]:
    """Test top-1 of a variant and of equal weighting at the training distribution's budget, per seed."""
    if not paired or target_p_index is None:
        return None
    q = target_p_index / _Q_STEP
    rows = {"variant": [_at_q(runs[s]["budgeted"], q) for s in paired],
            "reference": [_at_q(reference[s]["budgeted"], q) for s in paired]}
    if any(r is None for side in rows.values() for r in side):
        return None
    return {"q": q, "variant": _ms([r["test_top1"] for r in rows["variant"]]),
            "reference": _ms([r["test_top1"] for r in rows["reference"]]),
            "gain": mean_with_intervals([a["test_top1"] - b["test_top1"] for a, b in zip(rows["variant"], rows["reference"])]),
            "mflops": {side: _ms([r["expected_flops"] / 1e6 for r in rows[side]]) for side in rows}}


def compare_variant(runs: Dict[int, Dict[str, Any]], reference: Dict[int, Dict[str, Any]],
                    on_grid: Dict[int, np.ndarray], on_grid_ref: Dict[int, np.ndarray]) -> Dict[str, Any]:
    """Everything issue 14 asks of one L2W variant against equal weighting (see ``summarize_records``)."""
    mean_v = np.mean(np.stack(list(on_grid.values())), 0)
    mean_r = np.mean(np.stack(list(on_grid_ref.values())), 0)
    gain = mean_v - mean_r
    paired = sorted(set(runs) & set(reference))
    diff = {s: on_grid[s] - on_grid_ref[s] for s in paired}
    n_budgets = min(len(r["budgeted"]) for r in [*runs.values(), *reference.values()])
    by_index = {s: np.array([runs[s]["budgeted"][b]["test_top1"] - reference[s]["budgeted"][b]["test_top1"]
                             for b in range(n_budgets)]) for s in paired}
    by_index_mean = np.mean(np.stack(list(by_index.values())), 0) if paired else None
    num_exits = min(len(r["anytime"]) for r in [*runs.values(), *reference.values()])
    settings = next(iter(runs.values()))["settings"]
    peak = {s: max(r["test_top1"] for r in runs[s]["budgeted"]) - max(r["test_top1"] for r in reference[s]["budgeted"])
            for s in paired}
    return {
        "seeds_paired": paired,
        "gain_on_grid": gain.tolist(),
        "mean_gain": float(gain.mean()),
        "share_ahead": float((gain > 0).mean()),
        "paired_gain_per_seed": {s: float(d.mean()) for s, d in diff.items()},
        "paired_mean_gain": mean_with_intervals([float(d.mean()) for d in diff.values()]),
        "paired_share_ahead_per_seed": {s: float((d > 0).mean()) for s, d in diff.items()},
        "gain_by_budget_index": by_index_mean.tolist() if paired else [],
        "gain_by_budget_index_per_seed": {s: float(d.mean()) for s, d in by_index.items()},
        "mean_gain_by_budget_index": mean_with_intervals([float(d.mean()) for d in by_index.values()]),
        "share_ahead_by_budget_index": float((by_index_mean > 0).mean()) if paired else None,
        "gain_at_training_q": _train_q_gain(runs, reference, paired, settings.get("target_p_index")),
        "anytime_gain": [_ms([runs[s]["anytime"][k]["top1"] - reference[s]["anytime"][k]["top1"] for s in paired])
                         for k in range(num_exits)],
        "peak_gain": _ms(list(peak.values())),
        "cost_ratio_cpu": cost_ratio(runs, reference, "cpu_s"),
        "cost_ratio_wall": cost_ratio(runs, reference, "wall_s"),
        "predictor": predictor_summary(runs),
    }


def summarize_records(records: Dict[str, Dict[int, Dict[str, Any]]], points: int = 39) -> Dict[str, Any]:
    """The study's summary from ``{variant: {seed: record}}`` (needs equal weighting and one other variant).

    Every budgeted curve goes on one grid of ``points`` FLOPs values over the range all curves cover
    (linear interpolation); per variant: mean and std over its seeds. Per other variant, against equal
    weighting: the gain of the seed-mean curves on the grid, its mean and share of grid points ahead;
    the same per seed (pairs of runs with the same seed) with t and bootstrap intervals over seeds; the
    gain budget by budget (same q, no interpolation); gain at the training q; anytime gain per exit;
    peak; cost ratios (CPU and wall seconds, resumed runs left out); the predictor analysis. Where the
    result files hold them, ``exit_rules``: every variant's curves under the other exit rules.
    """
    if REFERENCE not in records or len(records) < 2:
        raise ValueError("the summary needs equal-weighting runs and the runs of at least one other variant")
    models = {r["model"] for runs in records.values() for r in runs.values()}
    if len(models) > 1:
        raise ValueError(f"the result files mix models {sorted(models)}: summarize one model per --out folder")
    # equal weighting first, then the L2W variants by meta interval, then the other methods
    compared = sorted((v for v in records if v != REFERENCE),
                      key=lambda v: (v in METHOD_LABELS, _interval(records[v]), v))
    variants = [REFERENCE, *compared]
    curves = {v: {s: _curve(r["budgeted"]) for s, r in records[v].items()} for v in variants}
    every = [c for v in variants for c in curves[v].values()]
    lo, hi = max(f.min() for f, _ in every), min(f.max() for f, _ in every)
    if not lo < hi:
        raise ValueError("the budgeted curves do not overlap in FLOPs: nothing to compare")
    grid = np.linspace(lo, hi, points)
    on_grid = {v: {s: np.interp(grid, f, a) for s, (f, a) in curves[v].items()} for v in variants}
    settings = {v: next(iter(records[v].values()))["settings"] for v in variants}
    num_exits = min(len(r["anytime"]) for runs in records.values() for r in runs.values())
    first = next(iter(records[REFERENCE].values()))
    stacked = {v: np.stack(list(on_grid[v].values())) for v in variants}
    commits = sorted({((r.get("code") or {}).get("commit") or "not recorded")[:12]
                      for runs in records.values() for r in runs.values()})
    return {
        "model": first["model"],
        "reference": REFERENCE,
        "variants": variants,
        "labels": {v: variant_label(v, settings[v]) for v in variants},
        "seeds": {v: sorted(records[v]) for v in variants},
        "train_length": _train_length(first),
        "commits": commits,
        "settings": settings,
        "exit_mflops": [f / 1e6 for f in first["flops"]][:num_exits],
        "grid_mflops": grid.tolist(),
        "curve_mean": {v: stacked[v].mean(0).tolist() for v in variants},
        "curve_std": {v: (stacked[v].std(0, ddof=1) if len(stacked[v]) > 1 else np.zeros(points)).tolist()
                      for v in variants},
        "anytime_top1": {v: [_ms([r["anytime"][k]["top1"] for r in records[v].values()]) for k in range(num_exits)]
                         for v in variants},
        "peak_budgeted_top1": {v: _ms([max(row["test_top1"] for row in r["budgeted"]) for r in records[v].values()])
                               for v in variants},
        "cost": {v: run_costs(records[v]) for v in variants},
        "comparisons": {v: compare_variant(records[v], records[REFERENCE], on_grid[v], on_grid[REFERENCE])
                        for v in compared},
        "exit_rules": exit_rule_summary({v: records[v] for v in variants}, [f / 1e6 for f in first["flops"]], grid),
    }


def _rule_curve(record: Dict[str, Any], rule: str) -> Optional[tuple]:
    rows = record["budgeted"] if rule == "confidence" else (record.get("budgeted_rules") or {}).get(rule)
    if not rows:
        return None
    return _curve(rows)


def exit_rule_summary(records: Dict[str, Dict[int, Dict[str, Any]]], exit_mflops: Sequence[float],
                      grid: np.ndarray) -> Optional[Dict[str, Any]]:
    """Every variant under every exit rule: test top-1 (mean ± std over seeds) at the FLOPs of each exit.

    A curve is read at a FLOPs value by linear interpolation only inside the FLOPs range it covers
    (None outside). ``mean_on_grid``: the curve's mean over the comparison grid, for the rules whose
    curves cover it (confidence and entropy); patience has only K budgets and is read at the exits.
    Returns None when no result file holds the other rules.
    """
    rules = ["confidence", *EXTRA_RULES]
    if not any(r.get("budgeted_rules") for runs in records.values() for r in runs.values()):
        return None
    table: Dict[str, Dict[str, Any]] = {}
    for v, runs in records.items():
        for rule in rules:
            curves = [c for c in (_rule_curve(r, rule) for r in runs.values()) if c is not None]
            if not curves:
                continue
            at_exit = []
            for mf in exit_mflops:
                vals = [float(np.interp(mf, f, a)) for f, a in curves if f.min() - 1e-9 <= mf <= f.max() + 1e-9]
                at_exit.append(_ms(vals) if len(vals) == len(curves) else None)
            covers = all(f.min() <= grid[0] + 1e-9 and f.max() >= grid[-1] - 1e-9 for f, _ in curves)
            table.setdefault(v, {})[rule] = {
                "seeds": len(curves), "at_exit_mflops": at_exit,
                "mean_on_grid": _ms([float(np.interp(grid, f, a).mean()) for f, a in curves]) if covers else None,
                "mflops_range": [min(float(f.min()) for f, _ in curves), max(float(f.max()) for f, _ in curves)]}
    return {"rules": rules, "exit_mflops": list(exit_mflops), "table": table}


def _interval(runs: Dict[int, Dict[str, Any]]) -> float:
    interval = next(iter(runs.values()))["settings"].get("meta_interval")
    return float(interval) if interval is not None else math.inf


def _train_length(record: Dict[str, Any]) -> str:
    argv = record.get("train_argv", [])
    for flag in ("--epochs", "--max-steps"):
        if flag in argv:
            return f"{flag} {argv[argv.index(flag) + 1]}"
    return "not recorded"


def summarize(out: Path, seeds: Sequence[int], variants: Sequence[str] = WEIGHTINGS,
              points: int = 39) -> Optional[Dict[str, Any]]:
    """Summarize the result files in ``out`` (any subset of variants and seeds); write the report files.

    Writes ``summary.json``, ``summary.md``, ``l2w_vs_uniform.png`` (budgeted curves of every variant)
    and ``gain_vs_cost.png``. Returns None (after saying what is missing) when no comparison is possible.
    """
    records = load_records(out, seeds)
    missing = missing_runs(out, variants, seeds, records)
    if missing:
        print("missing result files: " + _missing_text(missing, records))
    try:
        summary = summarize_records(records, points)
    except ValueError as exc:
        present = ", ".join(f"{v}: seeds {sorted(r)}" for v, r in records.items()) or "none"
        print(f"nothing summarized ({exc}); result files present: {present}")
        return None
    summary["seeds_requested"] = list(seeds)
    summary["missing"] = missing
    _write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", _markdown(summary))
    _plot_curves(summary, out / "l2w_vs_uniform.png")
    _plot_gain_vs_cost(summary, out / "gain_vs_cost.png")
    return summary


# ----------------------------------------------------------------------------- report text and plots


def _pm(stats: Optional[Dict[str, float]], digits: int = 2, sign: bool = False) -> str:
    if stats is None:
        return "n/a"
    mean = f"{stats['mean']:{'+' if sign else ''}.{digits}f}"
    return mean if stats["n"] < 2 else f"{mean} ± {stats['std']:.{digits}f}"  # no spread from one run


def _ci(stats: Optional[Dict[str, Any]], key: str, digits: int = 3) -> str:
    """``stats[key]`` (an interval from mean_with_intervals) as text; n/a without paired seeds or with one."""
    if stats is None:
        return "n/a"
    interval = stats[key]
    return "n/a (n < 2)" if interval is None else f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def _per_seed(values: Dict[Any, float], fmt: str = "+.3f", unit: str = "") -> str:
    return ", ".join(f"{s}: {v:{fmt}}{unit}" for s, v in values.items()) or "n/a"


def _distinct_resamples(s: Dict[str, Any]) -> str:
    n = max((len(c["seeds_paired"]) for c in s["comparisons"].values()), default=0)
    if n < 2:
        return "needs 2 seeds or more"
    return f"with {n} seeds only {math.comb(2 * n - 1, n)} distinct resamples exist: a coarse interval"


def _missing_text(missing: Dict[str, Dict[str, Any]], records: Dict[str, Any]) -> str:
    parts = []
    for v, m in missing.items():
        where = "".join(f" (seed {s} at checkpoint step {step})" for s, step in m["checkpoint_step"].items())
        parts.append(f"{v} seeds {', '.join(map(str, m['seeds']))}{where}" if v in records
                     else f"{v}: no runs{where}")
    return "; ".join(parts)


def _ratio_text(ratio: Dict[str, Any]) -> str:
    if ratio["mean"] is None:
        return "n/a"
    text = f"{ratio['mean']:.2f}x ({_per_seed(ratio['per_seed'], '.2f', 'x')})"
    return text + (f"; left out: {_per_seed_text(ratio['excluded'])}" if ratio["excluded"] else "")


def _per_seed_text(reasons: Dict[Any, str]) -> str:
    return ", ".join(f"seed {s} ({why})" for s, why in reasons.items())


def _cost_basis(comparison: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The ratio the gain-vs-cost plot uses: CPU seconds when measured, else wall-clock seconds."""
    for key in ("cost_ratio_cpu", "cost_ratio_wall"):
        if comparison[key]["mean"] is not None:
            return comparison[key]
    return None


def _markdown(s: Dict[str, Any]) -> str:
    lab, ref = s["labels"], s["reference"]
    l2w = list(s["comparisons"])
    lines = [f"# L2W vs equal weighting: {s['model']}, Fashion-MNIST 32x32, {s['train_length']}", "",
             "runs (seeds): " + "; ".join(f"{lab[v]} {s['seeds'][v]}" for v in s["variants"]),
             "missing: " + (_missing_text(s["missing"], s["seeds"]) if s.get("missing") else "none"),
             f"code: commit {', '.join(s['commits'])}", "",
             "## Budgeted gain over equal weighting", "",
             f"Grid: {len(s['grid_mflops'])} FLOPs values, {s['grid_mflops'][0]:.2f}-{s['grid_mflops'][-1]:.2f} "
             "MFLOPs (the range every curve covers; linear interpolation). *Mean gain*: mean over the grid of "
             "the difference of the seed-mean curves; *ahead*: share of grid points where that difference is "
             "> 0 (each curve's mean over the seeds it has). *Paired*: per seed both have, the mean over the "
             "grid of that seed's L2W run minus its equal-weighting run (same initialisation, data order and "
             "schedule). Intervals are 95% for the mean paired gain, "
             "over seeds only (the result files hold no per-sample outputs, so test images cannot be "
             f"resampled): Student t with n - 1 degrees of freedom, and a percentile bootstrap of {N_BOOTSTRAP} "
             f"resamples of the seeds ({_distinct_resamples(s)}).", "",
             "| variant | seeds paired | mean gain | ahead | paired gain (mean ± std) | 95% t-interval | "
             "95% bootstrap (seeds) | per seed | ahead per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for v in l2w:
        c = s["comparisons"][v]
        pg = c["paired_mean_gain"]
        lines.append(f"| {lab[v]} | {len(c['seeds_paired'])} | {c['mean_gain']:+.3f} | {100 * c['share_ahead']:.0f}% | "
                     f"{_pm(pg, 3, True)} | {_ci(pg, 'ci95_t')} | {_ci(pg, 'ci95_bootstrap')} | "
                     f"{_per_seed(c['paired_gain_per_seed'])} | "
                     f"{_per_seed({k: 100 * x for k, x in c['paired_share_ahead_per_seed'].items()}, '.0f', '%')} |")
    lines += ["", "Same comparison budget by budget (same q, thresholds from the held-out split, no "
              "interpolation; paired by seed), at the training distribution's q, and at each curve's peak:", "",
              "| variant | gain by budget index | 95% t-interval | ahead (seed-mean gain > 0) | at training q: "
              "variant / equal (MFLOPs) | gain at training q | peak: variant / equal | peak gain |", "|---|---|---|---|---|---|---|---|"]
    for v in l2w:
        c = s["comparisons"][v]
        bi, tq = c["mean_gain_by_budget_index"], c["gain_at_training_q"]
        at_q = ("n/a" if tq is None else f"q = {tq['q']:.2f}: {_pm(tq['variant'])} ({tq['mflops']['variant']['mean']:.2f}) / "
                f"{_pm(tq['reference'])} ({tq['mflops']['reference']['mean']:.2f})")
        share = c["share_ahead_by_budget_index"]
        lines.append(f"| {lab[v]} | {_pm(bi, 3, True)} | {_ci(bi, 'ci95_t')} | "
                     f"{'n/a' if share is None else f'{100 * share:.0f}%'} | {at_q} | "
                     f"{_pm(tq and tq['gain'], 2, True)} | {_pm(s['peak_budgeted_top1'][v])} / "
                     f"{_pm(s['peak_budgeted_top1'][ref])} | {_pm(c['peak_gain'], 2, True)} |")
    shown = s["variants"]
    lines += ["", "## Budgeted curves (test top-1 %, mean ± std over seeds; every 4th grid point, all in summary.json)", "",
              "| avg MFLOPs | " + " | ".join(lab[v] for v in shown) + " | " + " | ".join(f"gain {lab[v]}" for v in l2w) + " |",
              "|---|" + "---|" * (len(shown) + len(l2w))]
    for i in range(0, len(s["grid_mflops"]), 4):
        lines.append(f"| {s['grid_mflops'][i]:.2f} | "
                     + " | ".join(f"{s['curve_mean'][v][i]:.2f} ± {s['curve_std'][v][i]:.2f}" for v in shown) + " | "
                     + " | ".join(f"{s['comparisons'][v]['gain_on_grid'][i]:+.2f}" for v in l2w) + " |")
    lines += ["", "## Anytime top-1 per exit (test %, mean ± std over seeds; gain: paired by seed)", "",
              "| exit | MFLOPs | " + " | ".join(lab[v] for v in shown) + " | " + " | ".join(f"gain {lab[v]}" for v in l2w) + " |",
              "|---|---|" + "---|" * (len(shown) + len(l2w))]
    for k, mf in enumerate(s["exit_mflops"]):
        lines.append(f"| {k + 1} | {mf:.2f} | " + " | ".join(_pm(s["anytime_top1"][v][k]) for v in shown) + " | "
                     + " | ".join(_pm(s["comparisons"][v]["anytime_gain"][k], 2, True) for v in l2w) + " |")
    lines += _exit_rules_markdown(s)
    lines += ["", "## Cost", "",
              "CPU s: process CPU time of the run's `timm_l2w.train` call (training and the final evaluation, "
              "one thread); wall s: its wall-clock time (when runs share the machine it includes waiting); "
              "train s: the training loop's own timer. Means over runs that were not "
              "resumed. Ratio: per seed, the variant's run over the equal-weighting run of the same seed, then "
              "the mean. A resumed run's times cover only its last segment, so resumed runs are flagged and "
              "left out of the means and ratios.", "",
              "| variant | runs | resumed (seeds) | CPU s per run | wall s per run | train s per run | "
              "CPU ratio vs equal | wall ratio vs equal |", "|---|---|---|---|---|---|---|---|"]
    for v in shown:
        cost, c = s["cost"][v], s["comparisons"].get(v)
        lines.append(f"| {lab[v]} | {len(s['seeds'][v])} | {cost['resumed_seeds'] or 'none'} | "
                     f"{_pm(cost['cpu_s_stats'], 0)} | {_pm(cost['wall_s_stats'], 0)} | {_pm(cost['train_s_stats'], 0)} | "
                     f"{'1 (reference)' if c is None else _ratio_text(c['cost_ratio_cpu'])} | "
                     f"{'1 (reference)' if c is None else _ratio_text(c['cost_ratio_wall'])} |")
    lines += ["", "## Predictor: weight vs loss correlation per exit", "",
              "From `weights_over_training`: every checkpoint's predictor applied to that checkpoint's exit "
              "losses on 1,000 held-out images; Pearson correlation between a sample's loss and its weight. "
              "End: each seed's last checkpoint, mean [min, max] over seeds. Settled: first checkpoint step "
              "from which the seed-mean correlation keeps the sign it ends with. Trajectory: seed-mean "
              "correlation at up to 5 evenly spaced checkpoints.", ""]
    for v in l2w:
        p = s["comparisons"][v]["predictor"]
        if p is None:
            lines += [f"{lab[v]}: no weights_over_training in these runs", ""]
            continue
        picks = sorted(set(np.linspace(0, len(p["steps"]) - 1, min(5, len(p["steps"]))).round().astype(int).tolist()))
        lines += [f"{lab[v]} (seeds {p['seeds']}, last checkpoint step {_per_seed(p['end_step'], 'd')}; weights at "
                  f"the end range {p['weight_range_end'][0]:.2f}-{p['weight_range_end'][1]:.2f}):", "",
                  "| exit | corr at end | mean weight at end | settled from step | trajectory (steps "
                  + " / ".join(str(p["steps"][i]) for i in picks) + ") |", "|---|---|---|---|---|"]
        for k in range(len(p["weight_mean_end"])):
            ce = p["corr_end"]
            lines.append(f"| {k + 1} | {ce['mean'][k]:+.2f} [{ce['min'][k]:+.2f}, {ce['max'][k]:+.2f}] | "
                         f"{p['weight_mean_end'][k]:.2f} | {p['sign_settled_from_step'][k] or 'n/a'} | "
                         + " / ".join(f"{p['corr_mean_over_steps'][i][k]:+.2f}" for i in picks) + " |")
        lines.append("")
    lines += ["Plots: `l2w_vs_uniform.png` (budgeted curves, ± 1 std bands, exits with error bars), "
              "`gain_vs_cost.png` (paired mean gain with its 95% t-interval against the cost ratio).", ""]
    return "\n".join(lines)


def _exit_rules_markdown(s: Dict[str, Any]) -> List[str]:
    rules = s.get("exit_rules")
    if not rules:
        return []
    lab, mf = s["labels"], rules["exit_mflops"]
    lines = ["", "## Exit rules (test top-1 %, mean ± std over seeds)", "",
             "Every run's own held-out and test outputs under each exit rule: *confidence* (max softmax, the "
             "paper's) and *entropy* are calibrated on the held-out split for the 39 distributions; *patience* "
             "exits once the prediction has stayed the same for p consecutive exits (p = 1..K, no calibration). "
             "Each curve is read at the FLOPs of every exit (linear interpolation, only inside the FLOPs range the "
             "curve covers; n/a outside). Mean on grid: the curve's mean over the comparison grid above "
             "(n/a where the curve does not cover the whole grid).", "",
             "| variant | rule | mean on grid | " + " | ".join(f"at exit {k + 1} ({m:.2f} MFLOPs)" for k, m in enumerate(mf))
             + " |", "|---|---|---|" + "---|" * len(mf)]
    for v in s["variants"]:
        for rule, row in rules["table"].get(v, {}).items():
            lines.append(f"| {lab[v]} | {rule} | {_pm(row['mean_on_grid'])} | "
                         + " | ".join(_pm(x) for x in row["at_exit_mflops"]) + " |")
    return lines


_COLORS = {"uniform": "tab:blue", "l2w": "tab:red", "l2w_int10": "tab:orange", "l2w_int100": "tab:green",
           "uniform_ge_kd": "tab:purple", "l2w_kd": "tab:brown"}


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _figure() -> tuple:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.8), dpi=120)


def _plot_curves(s: Dict[str, Any], path: Path) -> None:
    """Budgeted curve (mean ± std band) and anytime exits (mean ± std) of every variant."""
    grid = np.array(s["grid_mflops"])
    fig, ax = _figure()
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
    _save(fig, path)


def _plot_gain_vs_cost(s: Dict[str, Any], path: Path) -> None:
    """One point per L2W variant: paired mean gain (95% t-interval) against its cost ratio (seed range)."""
    fig, ax = _figure()
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
    _save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.run_one:
        run_one(args, args.run_one[0], int(args.run_one[1]))
        return 0
    import timm_l2w  # noqa: F401  (fail early if the package is not installed)

    out = Path(args.out)
    if not args.summarize_only:
        launch_all(args)
    summary = summarize(out, args.seeds, args.variants)
    if summary is not None:
        print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fidelity study's runs: every (variant, seed) is one ``timm_l2w.training.loop.train`` call in a one-thread child
process, evaluated by the package, its result file written as soon as it finishes (a run whose file exists
is skipped, a run stopped part-way resumes from its newest checkpoint). ``benchmarks/fidelity.py`` is the
command line; its docstring describes the study.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from timm_l2w.files import write_text_atomic

__all__ = ["VARIANTS", "WEIGHTINGS", "LABELS", "METHOD_LABELS", "EXTRA_RULES", "REFERENCE", "result_path", "write_json",
           "shown", "clean",
           "code_version", "train_argv", "exit_rule_rows", "run_one", "launch_all"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout the study runs from (paths in results are relative to it)
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
REFERENCE = "uniform"  # every L2W variant is compared with equal weighting of the same seed
HELD_OUT_IMAGES = 1000  # held-out images the predictor analysis applies every checkpoint's predictor to


def shown(value: Any) -> str:
    """A path (or argument) as recorded in results: relative to the repository when inside it."""
    text = str(value)
    root = f"{ROOT}{os.sep}"
    return text[len(root):] if text.startswith(root) else text


def result_path(out: Path, weighting: str, seed: int) -> Path:
    return out / f"{weighting}_seed{seed}.json"


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(clean(obj), indent=1) + "\n")


def code_version() -> Dict[str, Any]:
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


def clean(value: Any) -> Any:
    """JSON-safe copy: inf/nan floats become strings, tensors lists."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "tolist"):
        return clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ----------------------------------------------------------------------------- one run (child process)


def train_argv(args: argparse.Namespace, variant: str, seed: int, output: Path) -> List[str]:
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


def _weights_over_training(run_dir: Path, targs: argparse.Namespace) -> List[Dict[str, Any]]:
    """The predictor analysis of an L2W run on the first HELD_OUT_IMAGES held-out Fashion-MNIST images."""
    import torch

    from timm_l2w.data import create_datasets, create_loaders
    from timm_l2w.study.weights import weights_over_training

    splits = create_datasets("fashion-mnist", data_dir=targs.data_dir, input_size=32)
    splits.held_out = torch.utils.data.Subset(splits.held_out, range(HELD_OUT_IMAGES))
    _, held, _ = create_loaders(splits, 64, eval_batch_size=250, drop_last=False)
    return weights_over_training(run_dir, held, eps=targs.eps, constraint=targs.constraint, input_type=targs.input_type)


def exit_rule_rows(ev: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Budgeted rows of the other exit rules on the run's own held-out and test outputs.

    ``ev`` is the training run's evaluation (confidence rule, in ``record["budgeted"]``); entropy is
    calibrated like confidence (the 39 distributions), patience has one budget per p = 1..K.
    """
    from timm_l2w.evaluation import budgeted_evaluation

    return {rule: budgeted_evaluation(ev["heldout"], ev["test"], ev["flops"], rule=rule).rows() for rule in EXTRA_RULES}


def run_one(args: argparse.Namespace, variant: str, seed: int,
            parse_train_args: Callable[[List[str]], argparse.Namespace]) -> Path:
    """Train + evaluate one (variant, seed) in this process; write its result file.

    ``parse_train_args`` reads ``timm-l2w train`` flags into the run's settings (the study's command line
    passes :func:`timm_l2w.cli.train.parse_args`); the run is :func:`timm_l2w.training.loop.train`.

    A run stopped part-way continues from its newest complete checkpoint (``--resume auto``).
    """
    import torch

    torch.set_num_threads(1)
    from timm_l2w.training.loop import train

    out = Path(args.out)
    weighting = VARIANTS[variant][0]
    run_dir = out / "runs" / f"{variant}_seed{seed}"
    argv = train_argv(args, variant, seed, run_dir)
    resumed = any((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    targs = parse_train_args(argv + (["--resume", "auto"] if resumed else []))
    code = code_version()
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(targs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ev = result["eval"]
    record: Dict[str, Any] = {
        "variant": variant, "weighting": weighting, "seed": seed, "model": args.model,
        "train_argv": [shown(a) for a in argv], "code": code, "resumed": resumed, "cpu_s": cpu,
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
        record["weights_over_training"] = _weights_over_training(run_dir, targs)
    path = result_path(out, variant, seed)
    write_json(path, record)
    print(f"{variant} seed {seed}: done in {wall:.0f}s -> {shown(path)}", flush=True)
    return path


# ----------------------------------------------------------------------------- orchestration


def launch_all(args: argparse.Namespace, command: Sequence[str]) -> None:
    """Run every missing (weighting, seed) in child processes, ``--jobs`` at a time; ``command`` starts one
    (``command + ["--run-one", VARIANT, SEED, ...]``: the study's command line, which calls :func:`run_one`)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # seed by seed (a stopped study leaves complete comparisons), variants in the order given
    todo = [(w, s) for s in args.seeds for w in args.variants if not result_path(out, w, s).is_file()]
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
            cmd = [*command, "--run-one", w, str(s), *passthrough]
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

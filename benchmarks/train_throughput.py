"""Training throughput (images/s) of equal weighting vs L2W, through ``timm-l2w train``'s own update.

For each model (``--models``, each at its ``--sizes`` entry) and loader batch (``--batch``, one or more),
every configuration is a ``timm-l2w train`` run (``timm_l2w.training.run.Run``, built as the command line builds
it; 10 classes) fed one synthetic batch (random pixels and labels: throughput does not depend on the data)
on the device, split into two halves, ``forward -> (meta step) -> weighted loss -> backward -> step`` per
half, the schedulers stepped as the training loop steps them:

* weighting ``uniform``, and ``l2w`` at every ``--intervals`` meta interval;
* mode (``--modes``) ``eager`` or ``graphs`` (``--cuda-graphs``: captured and replayed; CUDA only);
* path (``--paths``) ``sync-free`` (the default update) or ``host-skip``: the previous path's host
  decisions put back (the skip of a non-finite real step and of a non-finite meta step read on the host,
  one wait for the device each), to measure what reading them costs.

The configurations of one (model, batch) are built together and timed in alternating rounds (``--rounds``),
``--steps`` loader batches each (at least ``interval / 2``, so every timed window holds a meta step), after
a warm-up (longer under graphs, until every kind of update is captured); the median round is reported.
Rows: model, size, batch, weighting, meta_interval, mode, path, images_per_s, time_over_uniform (the time of
equal weighting's row with the same model, batch, mode and path = 1), meta_steps; on CUDA the peak memory
of the group and whether graphs ran.

    python benchmarks/train_throughput.py --device cuda --models msdnet_l2w_cifar msdnet_l2w_cifar_tiny \\
        --sizes 32 32 --batch 64 1024 --intervals 1 10 100 --modes eager graphs \\
        --out benchmarks/results/gpu/train_throughput.json
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import timm_l2w  # noqa: F401  (registers the models)
from timm_l2w.cli.train import parse_args
from timm_l2w.training.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_precision import write_result  # noqa: E402

NUM_CLASSES = 10  # the runs are built on digits' splits (the batch itself is synthetic)


class Config:
    """One configuration: its run, synthetic batch and timings."""

    def __init__(self, model: str, size: int, batch: int, weighting: str, interval: Optional[int], mode: str,
                 path: str, args: argparse.Namespace, folder: str):
        self.model, self.size, self.batch, self.weighting, self.interval = model, size, batch, weighting, interval
        self.mode, self.path = mode, path
        cuda = args.device.startswith("cuda")
        argv = ["--model", model, "--dataset", "digits", "--input-size", str(size), "--batch-size", str(batch),
                "--max-steps", "100000", "--no-eval", "--no-progress", "--log-with", "none", "--output", folder,
                "--weighting", weighting, "--backend", args.backend, "--mixed-precision", args.precision,
                "--meta-precision", args.meta_precision, "--tf32", args.tf32, "--lr", "0.05"]
        argv += ["--meta-interval", str(interval)] if weighting == "l2w" else []
        argv += [] if cuda else ["--cpu"]
        argv += ["--cuda-graphs"] if mode == "graphs" else []
        torch.manual_seed(0)
        self.run = run = Run(parse_args(argv))
        run.build()
        run.model.train()
        if path == "host-skip":  # the previous path's host decisions
            run.updater.device_skip = False
            if run.l2w is not None:
                run.l2w._fused_meta = False
        device = run.accelerator.device
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        self.stats = run.summary.new_sums(device)
        self.seconds: List[float] = []
        self.steps = max(args.steps, math.ceil((interval or 1) / 2))
        # graphs: every kind of update (half x meta step due) seen twice after the first, host-decided update
        self.warmup = args.warmup + ((interval or 1) + 1 if mode == "graphs" else 0)
        self.meta_steps = 0

    def loader_batch(self) -> None:
        run = self.run
        graphs = run.updater.graphs
        x, y = graphs.stage(self.x, self.y) if graphs is not None else (self.x, self.y)
        halves = run.l2w.split(x, y) if run.l2w is not None else ((x[:self.batch // 2], y[:self.batch // 2]),
                                                                    (x[self.batch // 2:], y[self.batch // 2:]))
        for xt, yt in halves:
            if run.l2w is not None and run.l2w.step % run.l2w.meta_interval == 0:
                self.meta_steps += 1
            run.update(xt, yt, self.stats)
            run.scheduler.step_update(num_updates=run.updater.updates_done)

    def timed(self, count: int, sync) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(count):
            self.loader_batch()
        sync()
        return time.perf_counter() - start

    def graphs_state(self) -> Optional[str]:
        graphs = self.run.updater.graphs
        if graphs is None:
            return None
        if graphs.disabled:
            return f"off: {graphs.disabled}"
        return f"on ({len(graphs.graphs)} graphs, {graphs.replays} replays)"


def run_group(model: str, size: int, batch: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every configuration of one (model, batch), timed in alternating rounds."""
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        specs = [(mode, path, w, i) for mode in args.modes for path in args.paths
                 for w, i in [("uniform", None)] + [("l2w", i) for i in args.intervals]]
        configs = [Config(model, size, batch, w, i, mode, path, args, f"{folder}/{n}")
                   for n, (mode, path, w, i) in enumerate(specs)]
        for c in configs:
            c.timed(c.warmup, sync)
            c.meta_steps = 0
        for _ in range(args.rounds):
            for c in configs:
                c.seconds.append(c.timed(c.steps, sync))
    rows = []
    for c in configs:
        seconds = statistics.median(c.seconds)
        row = {"model": model, "size": size, "batch": batch, "weighting": c.weighting, "meta_interval": c.interval,
               "mode": c.mode, "path": c.path, "steps": c.steps, "rounds": args.rounds, "seconds": seconds,
               "images_per_s": batch * c.steps / seconds, "meta_steps": c.meta_steps // max(args.rounds, 1)}
        if c.graphs_state() is not None:
            row["graphs"] = c.graphs_state()
        if cuda:
            row["peak_memory_mib_group"] = torch.cuda.max_memory_allocated() / 2 ** 20
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["weighting"] == "uniform" and r["mode"] == row["mode"]
                    and r["path"] == row["path"])
        row["time_over_uniform"] = base["images_per_s"] / row["images_per_s"]
    return rows


def run(args: argparse.Namespace, log=print, partial=lambda result: None) -> Dict[str, Any]:
    """Every (model, batch) group in turn; ``partial(result)`` after each (the JSON is written group by group)."""
    torch.set_num_threads(args.threads)
    if len(args.sizes) != len(args.models):
        raise ValueError("--sizes needs one image size per --models entry")
    rows: List[Dict[str, Any]] = []
    for model_name, size in zip(args.models, args.sizes):
        for batch in args.batch:
            for row in run_group(model_name, size, batch, args):
                rows.append(row)
                interval = f" meta interval {row['meta_interval']}" if row["meta_interval"] else ""
                log(f"{model_name} {size}px batch {batch} {row['weighting']}{interval} {row['mode']} {row['path']}: "
                    f"{row['images_per_s']:.1f} images/s ({row['time_over_uniform']:.2f}x the time of equal "
                    f"weighting, {row['meta_steps']} meta steps)"
                    f"{' graphs ' + row['graphs'] if 'graphs' in row else ''}",
                    flush=True)
            partial(_result(args, rows))
    return _result(args, rows)


def _result(args: argparse.Namespace, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    cuda = args.device.startswith("cuda")
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "precision": args.precision, "meta_precision": args.meta_precision, "backend": args.backend,
            "tf32": args.tf32, "threads": args.threads, "num_classes": NUM_CLASSES,
            "timing": f"median of {args.rounds} alternating round(s) per (model, batch)", "rows": list(rows)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["msdnet_l2w_cifar", "msdnet_l2w_cifar_tiny"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 32])
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES, choices=[NUM_CLASSES],
                   help="kept for old command lines: the runs have digits' 10 classes")
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="loader batch sizes (two halves each)")
    p.add_argument("--steps", type=int, default=20, help="timed loader batches per round (at least interval / 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed loader batches first (graphs: + interval + 1)")
    p.add_argument("--rounds", type=int, default=1, help="alternating timing rounds; the median is reported")
    p.add_argument("--intervals", nargs="+", type=int, default=[1, 10, 100])
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "graphs"])
    p.add_argument("--paths", nargs="+", default=["sync-free"], choices=["sync-free", "host-skip"])
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--meta-precision", default="fp32", choices=["fp32", "amp"])
    p.add_argument("--backend", default="func", choices=["higher", "func"])
    p.add_argument("--tf32", default="default", choices=["default", "on", "off"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if any(b < 2 or b % 2 for b in args.batch):
        print("train_throughput.py: every --batch must be an even number >= 2", file=sys.stderr)
        return 2
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        print("train_throughput.py: accelerate runs fp16 only on GPUs: use --precision bf16 or no on the CPU",
              file=sys.stderr)
        return 2
    write_result(args.out, run(args, partial=lambda result: write_result(args.out, result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput (images/s) of equal weighting vs L2W, the way ``timm-l2w train`` runs an update.

For each model (``--models``, each at its own ``--sizes`` entry) and weighting (``uniform``, ``l2w`` at
every ``--intervals`` meta interval): accelerate with ``--precision`` (bf16 by default), timm's SGD, one
synthetic batch of ``--batch`` images (random pixels and labels: throughput does not depend on the data)
split into two halves as ``L2W.split`` does, ``forward -> (meta step) -> weighted loss -> backward ->
step`` per half. After ``--warmup`` loader batches, ``--steps`` loader batches are timed per
configuration (meta interval 100 needs ``--steps`` >= 50 to contain one meta step: 2 updates per batch).
Reports images/s, the time relative to equal weighting and (CUDA) the peak memory.

    python benchmarks/train_throughput.py --device cuda [--models msdnet_l2w_cifar msdnet_l2w --sizes 32 224]
        [--out benchmarks/results/gpu/train_throughput.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import timm_l2w  # noqa: F401  (registers the models)
from timm_l2w import L2W
from timm_l2w.train import create_multi_exit_model
from timm_l2w.weighting import exit_losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_precision import write_result  # noqa: E402


def run_config(model_name: str, size: int, weighting: str, interval: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Images/s of one (model, weighting, meta interval) with ``args``' device, precision, batch and steps."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from timm.optim import create_optimizer_v2

    AcceleratorState._reset_state(reset_partial_state=False)
    cuda = args.device.startswith("cuda")
    acc = Accelerator(mixed_precision=args.precision, cpu=not cuda)
    torch.manual_seed(0)
    model = create_multi_exit_model(model_name, num_classes=args.num_classes).to(acc.device).train()
    opt = create_optimizer_v2(model, opt="momentum", lr=0.1, momentum=0.9, weight_decay=1e-4)
    l2w = None
    if weighting == "l2w":
        l2w = L2W(model, opt, meta_interval=interval, backend=args.backend, accelerator=acc,
                  meta_precision=args.meta_precision)
    model, opt = acc.prepare(model, opt)
    if l2w is not None:
        l2w.model, l2w.optimizer = model, opt
    x = torch.randn(args.batch, 3, size, size, device=acc.device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=acc.device)
    half = args.batch // 2

    def loader_batch() -> None:
        halves = l2w.split(x, y) if l2w is not None else ((x[:half], y[:half]), (x[half:], y[half:]))
        for xt, yt in halves:
            with acc.autocast():
                outputs = model(xt)
            loss = l2w.loss(outputs, yt) if l2w is not None else exit_losses(outputs, yt).mean(dim=0).sum()
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        loader_batch()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loader_batch()
    sync()
    seconds = time.perf_counter() - start
    row = {"model": model_name, "size": size, "weighting": weighting, "meta_interval": interval if l2w else None,
           "batch": args.batch, "steps": args.steps, "seconds": seconds,
           "images_per_s": args.batch * args.steps / seconds,
           "meta_steps": sum(u % interval == 0 for u in range(2 * args.warmup, 2 * (args.warmup + args.steps)))
           if l2w else 0}
    if cuda:
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return row


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    if len(args.sizes) != len(args.models):
        raise ValueError("--sizes needs one image size per --models entry")
    rows: List[Dict[str, Any]] = []
    for model_name, size in zip(args.models, args.sizes):
        base = run_config(model_name, size, "uniform", 0, args)
        rows.append(base)
        print(f"{model_name} {size}px uniform: {base['images_per_s']:.1f} images/s", flush=True)
        for interval in args.intervals:
            row = run_config(model_name, size, "l2w", interval, args)
            row["time_over_uniform"] = base["images_per_s"] / row["images_per_s"]
            rows.append(row)
            print(f"{model_name} {size}px l2w meta_interval {interval}: {row['images_per_s']:.1f} images/s "
                  f"({row['time_over_uniform']:.2f}x the time of equal weighting, {row['meta_steps']} meta steps)",
                  flush=True)
    return {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "precision": args.precision, "meta_precision": args.meta_precision,
            "backend": args.backend, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["msdnet_l2w_cifar", "msdnet_l2w"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="timed loader batches (2 updates each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--intervals", nargs="+", type=int, default=[1, 100])
    p.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--meta-precision", default="fp32", choices=["fp32", "amp"])
    p.add_argument("--backend", default="higher", choices=["higher", "func"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        print("train_throughput.py: --batch must be an even number >= 2", file=sys.stderr)
        return 2
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        print("train_throughput.py: accelerate runs fp16 only on GPUs: use --precision bf16 or no on the CPU",
              file=sys.stderr)
        return 2
    write_result(args.out, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

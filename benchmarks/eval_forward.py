"""Eval-mode ``model(x)`` (blocks + the last exit's head) vs every exit computed and the last kept.

Since the eval forward of block-API models skips the earlier exit heads, this measures what that saves:
per model, one thread, ``--batch`` random images, median of ``--rounds`` alternating rounds in one process.

    python benchmarks/eval_forward.py [--models msdnet_l2w_cifar ranet_l2w_cifar] [--batch 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import timm_l2w  # noqa: F401  (registers the models)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["msdnet_l2w_cifar", "ranet_l2w_cifar"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        model = timm.create_model(name, num_classes=100).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        ways = {"every exit, keep the last": lambda model=model, x=x: model.forward_exits(x)[-1],
                "eval forward": lambda model=model, x=x: model(x)}
        times = {k: [] for k in ways}
        with torch.inference_mode():
            for f in ways.values():  # warm-up
                f()
            for _ in range(args.rounds):
                for k, f in ways.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        every, forward = ms["every exit, keep the last"], ms["eval forward"]
        print(f"{name} ({args.size}px, batch {args.batch}, one thread): every exit {every:.1f} ms, "
              f"eval forward {forward:.1f} ms, ratio {forward / every:.3f}")


if __name__ == "__main__":
    main()

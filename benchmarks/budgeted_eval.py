"""Budgeted evaluation speed: vectorised (timm_l2w) vs a straightforward per-sample Python loop.

N = 10,000 held-out + 10,000 test samples, K = 5 exits, C = 100 classes, the paper's 39 budgets.
The loop runs on a smaller N (``--loop-n``) and its time is scaled linearly to N (stated in the
output; its cost grows a little faster than linearly because of the sorts, so the speedup is a
conservative estimate). Both run in this process with one thread. Target: the whole 39-budget
evaluation under 0.05 s. Last line: ``speedup=<x>``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from timm_l2w.evaluation import ExitOutputs, budgeted_evaluation
from timm_l2w.exits import paper_distributions
from timm_l2w.files import write_text_atomic


def synthetic_outputs(n: int, num_exits: int, num_classes: int, seed: int) -> ExitOutputs:
    """Exits that get sharper and more accurate with depth, like a trained multi-exit network."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (n,), generator=g)
    signal = torch.nn.functional.one_hot(targets, num_classes).float()
    logits = [torch.randn(n, num_classes, generator=g) + (1.0 + k) * signal * torch.rand(n, 1, generator=g) * 3
              for k in range(num_exits)]
    return ExitOutputs.from_logits(logits, targets)


def loop_budgeted(heldout: ExitOutputs, test: ExitOutputs, dist, flops):
    """The procedure of docs/method.md §6 sample by sample in plain Python.

    Returns (test top-1 %, expected FLOPs) per budget.
    """
    h_conf, t_conf = heldout.confidences.tolist(), test.confidences.tolist()
    t_correct = test.correct.tolist()
    n, num_exits = len(h_conf), len(h_conf[0])
    results = []
    for p in dist.tolist():
        thresholds, gone = [], set()
        for k in range(num_exits - 1):
            want, seen, t_k = math.floor(n * p[k]), 0, math.inf
            for i in sorted(range(n), key=lambda i: h_conf[i][k], reverse=True):
                if i in gone:
                    continue
                seen += 1
                if seen == want:
                    t_k = h_conf[i][k]
                    break
            thresholds.append(t_k)
            gone.update(i for i in range(n) if h_conf[i][k] >= t_k)
        hits, cost = 0, 0.0
        for i, row in enumerate(t_conf):
            k = next((k for k, t in enumerate(thresholds) if row[k] >= t), num_exits - 1)
            hits += t_correct[i][k]
            cost += flops[k]
        results.append((100.0 * hits / len(t_conf), cost / len(t_conf)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--loop-n", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "budgeted_eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    num_exits, num_classes = 5, 100
    flops = [15.1e6, 25.6e6, 40.3e6, 53.9e6, 66.1e6]  # shape of MSDNet-CIFAR's curve
    heldout = synthetic_outputs(args.n, num_exits, num_classes, seed=1)
    test = synthetic_outputs(args.n, num_exits, num_classes, seed=2)
    dist = paper_distributions(num_exits)

    budgeted_evaluation(heldout, test, flops)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        res = budgeted_evaluation(heldout, test, flops)
        times.append(time.perf_counter() - start)
    t_vec = statistics.median(times)

    fields = ("confidences", "predictions", "top5", "losses", "targets")
    small_h = ExitOutputs(*(getattr(heldout, f)[: args.loop_n] for f in fields))
    small_t = ExitOutputs(*(getattr(test, f)[: args.loop_n] for f in fields))
    start = time.perf_counter()
    loop = loop_budgeted(small_h, small_t, dist, flops)
    t_loop_small = time.perf_counter() - start
    t_loop = t_loop_small * args.n / args.loop_n
    check = budgeted_evaluation(small_h, small_t, flops)
    agree = all(abs(a - float(check.test_top1[b])) < 1e-9 and abs(f - float(check.expected_flops[b])) < 1e-3
                for b, (a, f) in enumerate(loop))

    report = {
        "n_heldout": args.n, "n_test": args.n, "num_exits": num_exits, "num_classes": num_classes, "budgets": len(res),
        "vectorised_s_median": t_vec, "vectorised_s_all": times,
        "loop_n": args.loop_n, "loop_s_at_loop_n": t_loop_small, "loop_s_scaled_linearly_to_n": t_loop,
        "loop_agrees_with_vectorised": agree, "speedup": t_loop / t_vec, "target_s": 0.05,
        "peak_test_top1": float(res.test_top1.max()),
    }
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(f"budgeted evaluation, {len(res)} budgets, N={args.n}+{args.n}, K={num_exits}, C={num_classes}, 1 thread")
    print(f"vectorised: {t_vec * 1e3:.1f} ms (median of {args.repeats}; target < 50 ms)")
    print(f"per-sample loop: {t_loop_small:.2f} s at N={args.loop_n}, scaled linearly to N={args.n}: {t_loop:.1f} s")
    print(f"loop and vectorised agree at N={args.loop_n}: {agree}")
    print(f"speedup={t_loop / t_vec:.0f}")


if __name__ == "__main__":
    main()

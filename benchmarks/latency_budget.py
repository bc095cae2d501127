"""Latency budgets: does the policy chosen for a budget in milliseconds meet it when it really runs?

For each model (``msdnet_l2w_cifar`` and the wrapped timm backbone ``resnet18_l2w``, 10 classes, 32x32
images, weights from 60 equal-weight training updates on the built-in ``digits-affine`` unless
``--train-steps 0``; policies chosen on 1,000 held-out images)
and each batch size (1 and 64), on the CPU with one thread, in rounds that alternate measuring and
checking (per target, the table right before its checks, so both see the same machine):

1. measure the latency table on the target: PyTorch eager (``measure_latency_table``: the
   ``EarlyExitPredictor``'s own loop) and onnxruntime (``EarlyExitRuntime.stage_latency`` on the exported
   package);
2. choose 5 budgets spread evenly between the cheapest candidate and the most accurate one (on the
   held-out split; larger budgets choose it too) as that table predicts them, and for each the policy
   ``EarlyExitPredictor.from_latency_budget`` picks (held-out split, the paper's 39 distributions);
3. run the chosen policy on the test images, one predict call per batch of that size
   (``EarlyExitPredictor.predict``, ``EarlyExitRuntime.predict``), and take the median of ``--repeats``
   passes: the measured ms per image.

Reported per check: measured / budget (goal: at most 1.10, every time), measured / expected (the
expected latency of the test images' own exit fractions: how good the model of latency is, apart from
the held-out/test difference in exit shares). Writes ``results/latency_budget.json`` and prints a
markdown table; last line ``worst_measured_over_budget=<x>``. ``--clock process`` times CPU time of the
process instead of wall time (one thread: steadier when other jobs share the cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from early_exit_latency import short_training  # noqa: E402

import timm_l2w  # noqa: E402
from timm_l2w.data import create_datasets, create_loaders  # noqa: E402
from timm_l2w.deploy import export_package  # noqa: E402
from timm_l2w.evaluation import budgeted_evaluation, collect_exit_outputs  # noqa: E402
from timm_l2w.files import write_text_atomic  # noqa: E402
from timm_l2w.inference.latency import measure_latency_table, placeholder_predictor  # noqa: E402
from timm_l2w.models.factory import create_multi_exit_model  # noqa: E402
from timm_l2w_runtime import EarlyExitRuntime  # noqa: E402
from timm_l2w_runtime.latency import CLOCKS, expected_latency_ms, latency_batch_sizes  # noqa: E402

SIZE = (3, 32, 32)


def median_ms_per_image(run: Callable[[], Any], images: int, repeats: int, clock: Callable[[], float]) -> float:
    """Median over ``repeats`` passes (after one warm-up) of ``run()``'s time, in ms per image."""
    run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times) * 1e3 / images


def budgets_between(table: Dict[str, Any], candidates, batch: int, count: int) -> List[float]:
    """``count`` budgets evenly from the cheapest candidate to the most accurate one (any larger budget chooses
    that one too; it is the full model, every image to the last exit, when the last exit is the most accurate)."""
    expected = expected_latency_ms(table, candidates.heldout_exit_fractions.numpy(), batch)
    top = float(expected[int(candidates.heldout_top1.argmax())])
    return np.linspace(float(expected.min()), top, count).tolist()


def check_round(model, package: Path, tmp: Path, heldout, candidates, flops, x: torch.Tensor, batch: int, args,
                clock_name: str) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """One round at one batch size, per target: measure its table, then check the budgets on it right away."""
    clock = CLOCKS[clock_name]
    sizes = latency_batch_sizes(batch)
    measure = {"torch": lambda: measure_latency_table(model, SIZE, sizes, repeats=args.table_repeats,
                                                      clock=clock_name),
               "onnxruntime": lambda: EarlyExitRuntime(package, threads=1).stage_latency(
                   sizes, repeats=args.table_repeats, clock=clock_name)}
    xb = np.ascontiguousarray(x.numpy())
    rows, tables = [], {}
    for target, timing in measure.items():
        table = tables[target] = timing()
        for budget in budgets_between(table, candidates, batch, args.budgets):
            predictor = timm_l2w.EarlyExitPredictor.from_latency_budget(model, heldout, table, budget, batch,
                                                                        flops=flops)
            if target == "torch":
                run = predictor.predict
                batches = list(x.split(batch))
                exits = predictor.predict(x, batch_size=batch).exit_index.numpy()
            else:
                policy = predictor.save(tmp / "policy.json", input_size=SIZE)
                run = EarlyExitRuntime(package, policy=policy, threads=1).predict
                batches = [xb[i:i + batch] for i in range(0, len(xb), batch)]
                exits = np.concatenate([run(b).exit_index for b in batches])
            # one predict call per batch, as a service answering requests of that size would make
            measured = median_ms_per_image(lambda run=run, batches=batches: [run(b) for b in batches], len(x),
                                           args.repeats, clock)
            test_fractions = np.bincount(exits, minlength=model.num_exits) / len(exits)
            expected_held = float(expected_latency_ms(table, predictor.calibration_fractions, batch))
            expected_test = float(expected_latency_ms(table, test_fractions, batch))
            rows.append({"target": target, "batch_size": batch, "budget_ms": budget, "measured_ms": measured,
                         "expected_ms_heldout": expected_held, "expected_ms_test": expected_test,
                         "measured_over_budget": measured / budget,
                         "measured_over_expected_test": measured / expected_test,
                         "heldout_exit_fractions": predictor.calibration_fractions,
                         "test_exit_fractions": test_fractions.tolist(),
                         "policy": {"thresholds": predictor.thresholds.tolist()}})
            print(f"  {target:<11} batch {batch:>2}: budget {budget:7.4f} ms  expected {expected_held:7.4f} "
                  f"(test exits {expected_test:7.4f})  measured {measured:7.4f} ms  "
                  f"measured/budget {measured / budget:5.3f}  measured/expected {measured / expected_test:5.3f}",
                  flush=True)
    return rows, tables


def run_model(name: str, args, clock_name: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    splits = create_datasets(args.dataset, input_size=SIZE[1], in_chans=SIZE[0], held_out=args.held_out)
    train_loader, held_loader, test_loader = create_loaders(splits, batch_size=64, eval_batch_size=256)
    model = create_multi_exit_model(name, num_classes=splits.num_classes)
    steps = short_training(model, train_loader, 0.0, max_steps=args.train_steps) if args.train_steps else 0
    model.eval()
    heldout = collect_exit_outputs(model, held_loader)
    x = torch.cat([b[0] for b in test_loader])[:args.images]
    flops = timm_l2w.exit_flops(model, SIZE)
    candidates = budgeted_evaluation(heldout, heldout, flops)
    report: Dict[str, Any] = {"model": name, "train_steps": steps, "images": len(x), "flops": list(flops),
                              "checks": [], "tables": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        package = export_package(model, tmp / "package", placeholder_predictor(model), input_size=SIZE, pt2=False)
        report["export_seconds"] = time.perf_counter() - start
        for batch in args.batch_sizes:
            for r in range(args.rounds):
                print(f"{name}: batch {batch}, round {r + 1} of {args.rounds}", flush=True)
                rows, tables = check_round(model, package, tmp, heldout, candidates, flops, x, batch, args,
                                           clock_name)
                report["checks"] += [dict(row, round=r) for row in rows]
                report["tables"].append({"batch_size": batch, "round": r, **tables})
    return report


def markdown(reports: List[Dict[str, Any]]) -> str:
    lines = ["| model | target | batch | budgets (ms per image) | measured / budget | measured / expected |",
             "| --- | --- | --- | --- | --- | --- |"]
    for rep in reports:
        groups: Dict[tuple, List[Dict[str, Any]]] = {}
        for row in rep["checks"]:
            groups.setdefault((row["target"], row["batch_size"]), []).append(row)
        for (target, batch), rows in groups.items():
            budgets = sorted({round(r["budget_ms"], 4) for r in rows})
            over = [r["measured_over_budget"] for r in rows]
            model_fit = [r["measured_over_expected_test"] for r in rows]
            lines.append(f"| {rep['model']} | {target} | {batch} | {budgets[0]:.3g}-{budgets[-1]:.3g} "
                         f"({len(rows)} checks) | {min(over):.3f}-{max(over):.3f} | "
                         f"{min(model_fit):.3f}-{max(model_fit):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["msdnet_l2w_cifar", "resnet18_l2w"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dataset", default="digits-affine",
                        help="built-in data set (digits-affine: the later exits are needed, so the budgets choose "
                             "different policies)")
    parser.add_argument("--train-steps", type=int, default=60, help="equal-weight training updates (0: random init)")
    parser.add_argument("--held-out", type=int, default=1000,
                        help="held-out images the policies are chosen on (the more, the closer their exit shares "
                             "come to the test images')")
    parser.add_argument("--images", type=int, default=256, help="test images per check (a multiple of 64)")
    parser.add_argument("--budgets", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (measure the tables, check the budgets)")
    parser.add_argument("--table-repeats", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the test images per check")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_budget.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    reports = [run_model(name, args, args.clock) for name in args.models]
    checks = [row for rep in reports for row in rep["checks"]]
    worst = max(row["measured_over_budget"] for row in checks)
    summary = {"threads": 1, "clock": args.clock, "device": checks and reports[0]["tables"][0]["torch"]["device"],
               "onnxruntime": reports[0]["tables"][0]["onnxruntime"]["device"], "torch": torch.__version__,
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "worst_measured_over_budget": worst,
               "within_10_percent": sum(row["measured_over_budget"] <= 1.10 for row in checks),
               "checks": len(checks), "models": reports}
    write_text_atomic(args.out, json.dumps(summary, indent=2) + "\n")
    print(markdown(reports))
    print(f"{summary['within_10_percent']} of {len(checks)} checks within 10% of the budget or under it")
    print(f"worst_measured_over_budget={worst:.3f}")


if __name__ == "__main__":
    main()

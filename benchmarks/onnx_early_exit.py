"""Early exit in onnxruntime vs the full model in onnxruntime: measured speed-up against the FLOPs promise.

The model (MSDNet-CIFAR by default, 10 classes, weights from ``--checkpoint`` or a short equal-weight
training on the built-in digits, 32x32) is exported twice: as the early-exit package of
``timm-l2w export`` (one ONNX graph per stage, run by :class:`timm_l2w_runtime.EarlyExitRuntime`) and
as one ONNX graph of the eval-mode model (the last exit only: blocks + the last head). For each
budget (thresholds calibrated on the held-out split for the paper's ``p_k ∝ q**k``) both run on the
same test images at batch 64 and at batch 1 (64 single-image calls), CPU, one onnxruntime thread,
alternating order, fastest of ``--repeats`` rounds in CPU time of the process (one thread: the time the
work took, not the time other jobs held the cores; wall-clock figures are kept beside). Per budget:

    speed-up   = time_full / time_early
    promise    = FLOPs(full model) / mean FLOPs of the exits the images took
    efficiency = speed-up / promise

FLOPs in the convention of :func:`timm_l2w.exit_flops` (an exit's cost includes the heads of the exits
before it); FLOPs(full model) counts what the eval-mode graph computes (no earlier exit heads). The
run also times the stages chained with nobody leaving early (the cost of splitting the graph) and the
time the runtime spends gathering the remaining samples. Writes ``results/onnx_early_exit.json``;
last line: ``efficiency_batch64=<min over budgets>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from early_exit_latency import load_or_train  # noqa: E402

import timm_l2w  # noqa: E402
from timm_l2w.data import create_datasets, create_loaders  # noqa: E402
from timm_l2w.deploy import export_package  # noqa: E402
from timm_l2w.evaluation import collect_exit_outputs  # noqa: E402
from timm_l2w.files import write_text_atomic  # noqa: E402
from timm_l2w.flops import MODULE_FLOP_COUNTERS  # noqa: E402
from timm_l2w_runtime import EarlyExitRuntime  # noqa: E402
from timm_l2w_runtime import runtime as runtime_module  # noqa: E402


@torch.no_grad()
def forward_flops(model: torch.nn.Module, input_size) -> float:
    """FLOPs of one eval-mode ``model(x)`` on one image, counted like :func:`timm_l2w.exit_flops`."""
    total = [0.0]

    def counter(module):
        return next((MODULE_FLOP_COUNTERS[c] for c in type(module).__mro__ if c in MODULE_FLOP_COUNTERS), None)

    def hook(module, inputs, output):
        total[0] += float(counter(module)(module, inputs, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if counter(m) is not None]
    try:
        model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def export_full_model(model: torch.nn.Module, path: Path, input_size) -> None:
    """The eval-mode model (last exit only) as one ONNX graph with a dynamic batch size."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), redirect_stdout(StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), (torch.randn(2, *input_size),), dynamic_shapes=({0: batch},))
        torch.onnx.export(program, f=str(path), dynamo=True, external_data=False, input_names=["image"],
                          output_names=["logits"])


def best_of(rounds: Dict[str, List[Tuple[float, float]]], clock: int) -> Dict[str, float]:
    """Fastest round of every function on ``clock`` (0: wall, 1: CPU time of this process)."""
    return {name: min(t[clock] for t in times) for name, times in rounds.items()}


def alternate(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[Tuple[float, float]]]:
    """(wall, CPU) seconds of every function per round, the order rotated each round (after a warm-up call each)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    rounds: Dict[str, List[Tuple[float, float]]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            rounds[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return rounds


def stage_seconds(runtime: EarlyExitRuntime, x: np.ndarray, repeats: int) -> np.ndarray:
    """Fastest time of every stage graph on the whole batch ``x`` (stages chained, nobody leaving)."""
    best = np.full(runtime.num_exits, np.inf)
    for _ in range(repeats):
        state = {runtime.manifest["input"]: x}
        for k, (stage, session) in enumerate(zip(runtime.manifest["stages"], runtime.sessions)):
            feeds = {name: state[name] for name in stage["inputs"]}
            start = time.process_time()
            produced = dict(zip(stage["outputs"], session.run(stage["outputs"], feeds)))
            best[k] = min(best[k], time.process_time() - start)
            state = {name: produced.get(name, state.get(name)) for name in stage.get("state", [])}
    return best


class GatherTimer:
    """Time the runtime spends in :func:`timm_l2w_runtime.runtime.select_rows` (dropping the samples that left)."""

    def __init__(self):
        self.seconds, self._select = 0.0, runtime_module.select_rows

    def __enter__(self):
        def timed_select(*args):
            start = time.process_time()
            out = self._select(*args)
            self.seconds += time.process_time() - start
            return out

        runtime_module.select_rows = timed_select
        return self

    def __exit__(self, *exc):
        runtime_module.select_rows = self._select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help=".safetensors weights of --model for 10 digit classes")
    parser.add_argument("--model", default="msdnet_l2w_cifar")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--qs", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    size = (3, 32, 32)

    splits = create_datasets("digits", input_size=32, in_chans=3)
    train_loader, held_loader, test_loader = create_loaders(splits, batch_size=64, eval_batch_size=256)
    model = timm.create_model(args.model, num_classes=splits.num_classes)
    steps = load_or_train(model, args.checkpoint, train_loader, args.train_seconds)
    flops = np.asarray(timm_l2w.exit_flops(model, size))
    full_flops = forward_flops(model, size)
    heldout = collect_exit_outputs(model, held_loader)
    x = torch.cat([b[0] for b in test_loader])[:64]
    y = torch.cat([b[1] for b in test_loader])[:64].numpy()
    predictors = {q: timm_l2w.EarlyExitPredictor.from_distribution(model, heldout, q) for q in args.qs}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export_start = time.perf_counter()
        package = export_package(model, root / "package", predictors[args.qs[0]], input_size=size, pt2=False)
        export_s = time.perf_counter() - export_start
        export_full_model(model, root / "full.onnx", size)
        for q, predictor in predictors.items():
            predictor.save(root / f"policy_{q}.json", input_size=size)
        no_exit = timm_l2w.EarlyExitPredictor(model, [float("inf")] * (model.num_exits - 1) + [float("-inf")])
        no_exit.save(root / "policy_no_exit.json", input_size=size)

        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        full = ort.InferenceSession(str(root / "full.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
        runtimes = {q: EarlyExitRuntime(package, policy=root / f"policy_{q}.json", threads=1) for q in args.qs}
        chained = EarlyExitRuntime(package, policy=root / "policy_no_exit.json", threads=1)
        xb = np.ascontiguousarray(x.numpy())
        singles = [xb[i:i + 1] for i in range(len(xb))]
        full_logits = full.run(None, {"image": xb})[0]
        full_top1 = 100.0 * float((full_logits.argmax(1) == y).mean())

        per_stage = {64: stage_seconds(chained, xb, args.repeats),
                     1: sum(stage_seconds(chained, single, 1) for single in singles) / len(singles)}
        print("stage graphs, ms per image at batch 64:", np.round(per_stage[64] * 1e3 / 64, 3).tolist(),
              "at batch 1:", np.round(per_stage[1] * 1e3, 3).tolist())
        stage_mflops = np.diff(flops, prepend=0) / 1e6
        print("ms per MFLOP at batch 64:", np.round(per_stage[64] * 1e3 / 64 / stage_mflops, 4).tolist())
        rows = []
        for q, runtime in runtimes.items():
            result = runtime.predict(xb)
            with torch.no_grad():
                torch_result = predictors[q].predict(x)
            fractions = result.exit_fractions(model.num_exits)
            expected = float(flops[result.exit_index].mean())
            promise = full_flops / expected
            row = {"q": q, "exit_fractions": fractions.tolist(), "flops_expected": expected,
                   "flops_full_model": full_flops, "flops_last_exit": float(flops[-1]), "promise": promise,
                   "promise_vs_last_exit_flops": float(flops[-1]) / expected,
                   "top1_early": 100.0 * float((result.predictions == y).mean()), "top1_full": full_top1,
                   "same_as_torch_predictor": bool((result.exit_index == torch_result.exit_index.numpy()).all()
                                                   and (result.predictions == torch_result.predictions.numpy()).all())}
            for batch, fns in (
                (64, {"full": lambda: full.run(None, {"image": xb}),
                      "early": lambda runtime=runtime: runtime.predict(xb),
                      "chained": lambda: chained.predict(xb)}),
                (1, {"full": lambda: [full.run(None, {"image": s}) for s in singles],
                     "early": lambda runtime=runtime: [runtime.predict(s) for s in singles],
                     "chained": lambda: [chained.predict(s) for s in singles]}),
            ):
                rounds = alternate(fns, args.repeats)
                best, wall = best_of(rounds, 1), best_of(rounds, 0)  # CPU time: robust to other jobs
                with GatherTimer() as gather:
                    fns["early"]()
                speedup = best["full"] / best["early"]
                # the early path's time if every stage cost its share of the chained per-stage times
                reached = np.array([(result.exit_index >= k).mean() for k in range(model.num_exits)])
                predicted = float(per_stage[batch] @ reached) * (1 if batch == 64 else len(singles))
                row[f"batch{batch}"] = {
                    "time_full_s": best["full"], "time_early_s": best["early"],
                    "time_chained_no_exit_s": best["chained"],
                    "wall_full_s": wall["full"], "wall_early_s": wall["early"],
                    "wall_speedup": wall["full"] / wall["early"],
                    "wall_efficiency": wall["full"] / wall["early"] / promise,
                    "time_full_s_median": statistics.median(t[1] for t in rounds["full"]),
                    "time_early_s_median": statistics.median(t[1] for t in rounds["early"]),
                    "speedup": speedup, "efficiency": speedup / promise,
                    "split_overhead": best["chained"] / best["full"], "gather_s": gather.seconds,
                    "gather_share_of_early": gather.seconds / best["early"],
                    "predicted_early_from_stage_times_s": predicted,
                    "runtime_overhead": best["early"] / predicted,  # loop, exit rule, gathers, session calls
                    "stage_time_promise": best["full"] / predicted,  # the speed-up the per-stage times allow
                }
                print(f"q={q:<4} batch {batch:>2}: exits {[round(f, 2) for f in fractions.tolist()]}  "
                      f"full {best['full'] * 1e3:7.2f} ms  early {best['early'] * 1e3:7.2f} ms  "
                      f"chained (no exit) {best['chained'] * 1e3:7.2f} ms  speed-up {speedup:5.2f}  "
                      f"promise {promise:5.2f}  efficiency {speedup / promise:.3f} "
                      f"(wall clock {wall['full'] / wall['early'] / promise:.3f})  "
                      f"gather {100 * gather.seconds / best['early']:.1f}% of early  "
                      f"runtime overhead {best['early'] / predicted:.3f}  stage-time promise "
                      f"{best['full'] / predicted:5.2f}", flush=True)
            rows.append(row)

    report = {"model": args.model, "checkpoint": args.checkpoint, "train_steps": steps, "input_size": list(size),
              "threads": 1, "repeats": args.repeats, "onnxruntime": ort.__version__, "torch": torch.__version__,
              "export_seconds": export_s, "flops": flops.tolist(), "flops_full_model": full_flops,
              "stage_seconds_batch64": per_stage[64].tolist(), "stage_seconds_batch1": per_stage[1].tolist(),
              "budgets": rows,
              "efficiency_batch64": min(r["batch64"]["efficiency"] for r in rows),
              "efficiency_batch1": min(r["batch1"]["efficiency"] for r in rows)}
    write_text_atomic(Path(args.out_dir) / "onnx_early_exit.json", json.dumps(report, indent=2) + "\n")
    print(f"model {args.model}, {'checkpoint' if args.checkpoint else f'{steps} training steps on digits'}; "
          f"full model {full_flops / 1e6:.2f} MFLOPs, last exit {flops[-1] / 1e6:.2f} MFLOPs (with earlier heads)")
    print(f"efficiency_batch1={report['efficiency_batch1']:.3f}")
    print(f"efficiency_batch64={report['efficiency_batch64']:.3f}")


if __name__ == "__main__":
    main()

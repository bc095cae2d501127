"""Real early exit at batch 1, 64 and 1024: EarlyExitPredictor (and onnxruntime) against the full model.

For every model (a multi-exit timm model such as ``msdnet_l2w_cifar``, or any timm backbone, wrapped as
``multi_exit_l2w``) and every budget ``q`` (thresholds calibrated on held-out digits, 32x32, for the
paper's ``p_k ∝ q**k``), the same test images (tiled to the largest batch) run through the full model
(the eval forward: the last exit) and through :class:`timm_l2w.EarlyExitPredictor`, alternating, fastest
of ``--repeats`` rounds; batch 1 is ``--singles`` one-image calls. Per model, batch and budget:

    speed-up   = time_full / time_early
    promise    = FLOPs of the last exit / mean FLOPs of the exits the images took (timm_l2w.exit_flops)
    efficiency = speed-up / promise

``syncs_per_batch``: host synchronisations of one early-exit call on CUDA (``torch.cuda.set_sync_debug_mode``
warnings; one-image calls averaged); null on the CPU. With ``--onnx MODEL...`` (and onnxruntime installed) the
early-exit package of those models also runs in :class:`timm_l2w_runtime.EarlyExitRuntime` against the full
model in onnxruntime, on the CUDA provider when there is one and the device is CUDA, else the CPU provider.

Weights: a short equal-weight training on digits (``--train-seconds``). Writes
``OUT/early_exit_batches.{json,csv}`` after every model and batch size, so a time limit loses only the
rest. Last lines: ``min_efficiency_batch<B>=<x>``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch

import timm_l2w

sys.path.insert(0, str(Path(__file__).parent))
from early_exit_latency import digits_loaders, short_training  # noqa: E402

from timm_l2w.models.factory import create_multi_exit_model  # noqa: E402

CSV_FIELDS = ["model", "backend", "provider", "device", "batch", "q", "exit_fractions", "flops_expected",
              "flops_full", "promise", "time_full_s", "time_early_s", "speedup", "efficiency", "syncs_per_batch",
              "top1_early", "top1_full"]


def count_syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations torch reports while ``fn()`` runs on CUDA."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def best_times(fns: Dict[str, Callable[[], object]], repeats: int, cuda: bool) -> Dict[str, float]:
    """Fastest wall time of every function over ``repeats`` rounds, order alternating, after two warm-up calls."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in fns.values():
        fn(), fn()
    times: Dict[str, List[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(max(1, repeats)):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {n: min(t) for n, t in times.items()}


def torch_rows(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, flops: torch.Tensor,
               predictors: Dict[float, timm_l2w.EarlyExitPredictor], batch: int, args) -> List[dict]:
    """The predictor against the eval forward at one batch size, every budget."""
    cuda = x.is_cuda
    inputs = [x[i:i + 1] for i in range(args.singles)] if batch == 1 else [x[:batch]]
    labels = y[:args.singles] if batch == 1 else y[:batch]

    def full():
        with torch.inference_mode():
            return [model(inp) for inp in inputs]

    full_top1 = 100.0 * float((torch.cat(full()).argmax(1) == labels).double().mean())
    rows = []
    for q, predictor in predictors.items():
        def early(predictor=predictor):  # bound now: the closure must not see a later loop's predictor
            return [predictor.predict(inp) for inp in inputs]

        best = best_times({"full": full, "early": early}, args.repeats, cuda)
        results = early()
        index = torch.cat([r.exit_index for r in results]).cpu()
        preds = torch.cat([r.predictions for r in results])
        fractions = torch.bincount(index, minlength=len(flops)).double() / len(index)
        expected = float(fractions @ flops)
        syncs = count_syncs(early) / len(inputs) if cuda else None
        speedup = best["full"] / best["early"]
        promise = float(flops[-1]) / expected
        rows.append({"model": name, "backend": "torch", "provider": None, "device": str(x.device), "batch": batch,
                     "q": q, "exit_fractions": fractions.tolist(), "flops_expected": expected,
                     "flops_full": float(flops[-1]), "promise": promise, "time_full_s": best["full"],
                     "time_early_s": best["early"], "speedup": speedup, "efficiency": speedup / promise,
                     "syncs_per_batch": syncs,
                     "top1_early": 100.0 * float((preds == labels).double().mean()), "top1_full": full_top1})
        print(f"{name} torch batch {batch:>4} q={q:<4} full {best['full'] * 1e3:8.2f} ms  early "
              f"{best['early'] * 1e3:8.2f} ms  speed-up {speedup:5.2f}  promise {promise:5.2f}  "
              f"efficiency {speedup / promise:.3f}  syncs/batch {syncs}", flush=True)
    return rows


def onnx_rows(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, flops: torch.Tensor,
              predictors: Dict[float, timm_l2w.EarlyExitPredictor], batches: List[int], args,
              write: Callable[[], None], rows: List[dict]) -> Optional[str]:
    """The early-exit package in onnxruntime against the full model in onnxruntime; None, or why it did not run."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx_early_exit import export_full_model

        from timm_l2w.deploy import export_package
        from timm_l2w_runtime import EarlyExitRuntime
    except ImportError as error:
        return f"not run: {error}"
    if x.is_cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"not run: onnxruntime {ort.__version__} has no CUDAExecutionProvider here (onnxruntime-gpu)"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if x.is_cuda else ["CPUExecutionProvider"]
    provider = providers[0]
    size = tuple(x.shape[1:])
    cpu_model = model.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first = next(iter(predictors.values()))
        package = export_package(cpu_model, root / "package", first, input_size=size, pt2=False)
        export_full_model(cpu_model, root / "full.onnx", size)
        for q, predictor in predictors.items():
            predictor.save(root / f"policy_{q}.json", input_size=size)
        full = ort.InferenceSession(str(root / "full.onnx"), providers=providers)
        runtimes = {q: EarlyExitRuntime(package, policy=root / f"policy_{q}.json", providers=providers)
                    for q in predictors}
        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        for batch in batches:
            inputs = [xs[i:i + 1] for i in range(args.singles)] if batch == 1 else [xs[:batch]]
            labels = ys[:args.singles] if batch == 1 else ys[:batch]
            full_out = np.concatenate([full.run(None, {"image": inp})[0] for inp in inputs])
            full_top1 = 100.0 * float((full_out.argmax(1) == labels).mean())
            for q, runtime in runtimes.items():
                fns = {"full": lambda inputs=inputs: [full.run(None, {"image": inp}) for inp in inputs],
                       "early": lambda runtime=runtime, inputs=inputs: [runtime.predict(inp) for inp in inputs]}
                best = best_times(fns, args.repeats, False)
                results = fns["early"]()
                index = np.concatenate([r.exit_index for r in results])
                preds = np.concatenate([r.predictions for r in results])
                fractions = np.bincount(index, minlength=len(flops)) / len(index)
                expected = float(fractions @ flops.numpy())
                speedup, promise = best["full"] / best["early"], float(flops[-1]) / expected
                rows.append({"model": name, "backend": "onnxruntime", "provider": provider, "device": str(x.device),
                             "batch": batch, "q": q, "exit_fractions": fractions.tolist(), "flops_expected": expected,
                             "flops_full": float(flops[-1]), "promise": promise, "time_full_s": best["full"],
                             "time_early_s": best["early"], "speedup": speedup, "efficiency": speedup / promise,
                             "syncs_per_batch": None, "top1_early": 100.0 * float((preds == labels).mean()),
                             "top1_full": full_top1})
                print(f"{name} onnxruntime ({provider}) batch {batch:>4} q={q:<4} speed-up {speedup:5.2f}  "
                      f"promise {promise:5.2f}  efficiency {speedup / promise:.3f}", flush=True)
            write()
    model.to(x.device)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["msdnet_l2w_cifar", "resnet18"],
                        help="multi-exit models or timm backbones (wrapped as multi_exit_l2w)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--qs", type=float, nargs="+", default=[0.5, 1.0, 1.5], help="the budgets")
    parser.add_argument("--singles", type=int, default=64, help="one-image calls timed at batch 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--onnx", nargs="*", default=[], metavar="MODEL",
                        help="these of --models also run as early-exit packages in onnxruntime")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, held_loader, test_loader, num_classes = digits_loaders()
    x_all = torch.cat([b[0] for b in test_loader])
    y_all = torch.cat([b[1] for b in test_loader])
    reps = -(-max(max(args.batch_sizes), args.singles) // len(x_all))
    x, y = x_all.repeat(reps, 1, 1, 1).to(args.device), y_all.repeat(reps).to(args.device)
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "torch": torch.__version__, "timm": timm.__version__, "batch_sizes": args.batch_sizes, "qs": args.qs,
              "singles": args.singles, "repeats": args.repeats, "tiled_from_test_images": len(x_all),
              "models": {}, "rows": []}

    def write() -> None:
        (out / "early_exit_batches.json").write_text(json.dumps(report, indent=2) + "\n")
        with open(out / "early_exit_batches.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in report["rows"]:
                writer.writerow({**row, "exit_fractions": " ".join(f"{v:.4f}" for v in row["exit_fractions"])})

    for name in args.models:
        torch.manual_seed(0)
        model = create_multi_exit_model(name, num_classes=num_classes).to(args.device)
        start = time.perf_counter()
        steps = short_training(model, train_loader, args.train_seconds, args.device)
        model.eval()
        flops = torch.tensor(timm_l2w.exit_flops(model.cpu(), (3, 32, 32)), dtype=torch.float64)
        model.to(args.device)
        heldout = timm_l2w.collect_exit_outputs(model, held_loader)
        predictors = {q: timm_l2w.EarlyExitPredictor.from_distribution(model, heldout, q) for q in args.qs}
        info = report["models"][name] = {"train_steps": steps, "train_s": time.perf_counter() - start,
                                         "num_exits": model.num_exits, "flops": flops.tolist(), "onnx": None}
        for batch in args.batch_sizes:
            report["rows"] += torch_rows(name, model, x, y, flops, predictors, batch, args)
            write()
        if name in args.onnx:
            try:
                info["onnx"] = onnx_rows(name, model, x, y, flops, predictors, args.batch_sizes, args, write,
                                         report["rows"]) or "ok"
            except Exception as error:  # the torch rows stand; say why onnxruntime did not run
                info["onnx"] = f"failed: {type(error).__name__}: {error}"
                model.to(args.device)
            print(f"{name} in onnxruntime: {info['onnx']}")
            write()
    for backend in ("torch", "onnxruntime"):
        for batch in args.batch_sizes:
            eff = [r["efficiency"] for r in report["rows"] if r["backend"] == backend and r["batch"] == batch]
            if eff:
                report[f"min_efficiency_{backend}_batch{batch}"] = min(eff)
                print(f"min_efficiency_{backend}_batch{batch}={min(eff):.3f}")
    write()


if __name__ == "__main__":
    main()

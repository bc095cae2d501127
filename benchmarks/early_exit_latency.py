"""Real early-exit inference: measured speed-up vs the FLOPs the budget promises (MSDNet-CIFAR or any timm model, CPU).

For several exit distributions (budgets), thresholds are calibrated on the held-out split and a
batch of 256 test images runs (a) through the full network and (b) through
:class:`timm_l2w.EarlyExitPredictor`, alternating, one thread, fastest of ``--repeats`` (wall clock; CPU time
reported too). Per budget:

    efficiency = (time_full / time_early) / (flops_full / flops_expected)

where ``flops_expected`` is the mean FLOPs of the exits the batch actually took. 1.0 means the
wall-clock saving is exactly the FLOPs saving; target >= 0.8. Weights come from ``--checkpoint`` or,
without one, from a short equal-weight training on the built-in digits data (8x8 upscaled to 32x32,
3 channels, ``--train-seconds``). Writes ``results/early_exit_latency.{json,png}`` (accuracy vs
latency). Last line: ``min_efficiency=<x>``.

``--model`` may be any timm model name: a plain one is wrapped as ``multi_exit_l2w`` (exit heads on
its ``feature_info`` points, the backbone split into stages with torch.fx), e.g. ``--model resnet18``;
results then go to ``results/early_exit_latency_<model>.{json,png}``. For such models the FLOPs the
early-exit run really spent are also counted while it runs (``timm_l2w.flops.count_flops``), beside
the FLOPs its exit fractions promise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import timm
import torch

import timm_l2w
from timm_l2w.data import create_datasets, create_loaders
from timm_l2w.evaluation import anytime_metrics, collect_exit_outputs, plot_curves
from timm_l2w.files import write_text_atomic
from timm_l2w.flops import count_flops
from timm_l2w.models.factory import create_multi_exit_model
from timm_l2w.weighting import exit_losses


def digits_loaders(batch_size: int = 64, eval_batch_size: int = 256):
    """(train, held-out, test loaders, number of classes) of the built-in digits at 32x32, 3 channels."""
    splits = create_datasets("digits", input_size=32, in_chans=3)
    return (*create_loaders(splits, batch_size=batch_size, eval_batch_size=eval_batch_size), splits.num_classes)


def short_training(model: torch.nn.Module, loader, seconds: float, device: str = "cpu",
                   max_steps: Optional[int] = None) -> int:
    """Equal-weight multi-exit training (sum of the exits' mean CE) for about ``seconds`` (or exactly
    ``max_steps`` updates: the same model on any machine); returns steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    steps, start = 0, time.perf_counter()
    if max_steps is not None:
        seconds = float("inf")
    while time.perf_counter() - start < seconds and steps != max_steps:
        for x, y in loader:
            if steps == max_steps:
                break
            x, y = x.to(device), y.to(device)
            loss = exit_losses(model(x), y).mean(dim=0).sum()  # train mode: every exit
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
    model.eval()
    return steps


def load_or_train(model: torch.nn.Module, checkpoint, loader, seconds: float, device: str = "cpu") -> int:
    """``checkpoint``'s weights into ``model`` (0 steps), else :func:`short_training` on ``loader`` (on
    ``device``, where the model is moved); returns steps; the model is left in eval mode."""
    model.to(device)
    if checkpoint:
        model.load_state_dict(timm_l2w.load_state_dict(checkpoint))
        model.eval()
        return 0
    return short_training(model, loader, seconds, device)


def timed(fn, x):
    """(wall seconds, CPU seconds of this process) of ``fn(x)`` (CUDA: synchronised before and after)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(x)
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def stage_profile(model: torch.nn.Module, x: torch.Tensor, flops: torch.Tensor, repeats: int) -> dict:
    """A wrapped timm backbone: (a) its staged eval forward against the backbone's own forward and the
    last exit's classifier (the cost of the split itself), (b) the share of the full run's time spent
    up to each exit against its share of the FLOPs (where early exit's time saving can differ from the
    FLOPs saving: early stages move more memory per FLOP). Alternating, fastest of ``repeats``."""
    backbone, fc = model.backbone, model.heads[-1].fc

    def plain(inp):
        with torch.inference_mode():
            return fc(backbone.forward_head(backbone.forward_features(inp), pre_logits=True))

    def staged(inp):
        with torch.inference_mode():
            return model(inp)

    def up_to(k):
        def run(inp):
            with torch.inference_mode():
                state = inp
                for i in range(k + 1):
                    state, _ = model.forward_stage(i, state)
        return run

    fns = {"plain": plain, "staged": staged, **{f"exit{k}": up_to(k) for k in range(model.num_exits)}}
    for fn in fns.values():
        fn(x)
    times = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns.items())
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(fn, x)[0])
    best = {name: min(t) for name, t in times.items()}
    last = best[f"exit{model.num_exits - 1}"]
    return {"split_overhead": best["staged"] / best["plain"], "time_plain_s": best["plain"],
            "time_staged_s": best["staged"],
            "time_share": [best[f"exit{k}"] / last for k in range(model.num_exits)],
            "flops_share": (flops / flops[-1]).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help=".safetensors weights of --model for 10 digit classes")
    parser.add_argument("--model", default="msdnet_l2w_cifar", help="a multi-exit model or any timm model name")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs, metavar="KEY=VALUE",
                        help="timm.create_model arguments, e.g. img_size=32 for a ViT")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--qs", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    train_loader, held_loader, test_loader, num_classes = digits_loaders()
    model = create_multi_exit_model(args.model, num_classes=num_classes, **args.model_kwargs)
    steps = load_or_train(model, args.checkpoint, train_loader, args.train_seconds, args.device)
    flops = torch.tensor(timm_l2w.exit_flops(model, (3, 32, 32)), dtype=torch.float64)
    heldout = collect_exit_outputs(model, held_loader)
    test = collect_exit_outputs(model, test_loader)
    anytime = anytime_metrics(test, flops)
    x = torch.cat([b[0] for b in test_loader])[: args.batch_size].to(args.device)
    y = torch.cat([b[1] for b in test_loader])[: args.batch_size].to(args.device)
    if x.shape[0] < args.batch_size:
        raise SystemExit(f"the test split has only {x.shape[0]} images: pass --batch-size {x.shape[0]} or less")

    def full(inp):  # every stage and every exit head for every sample
        with torch.inference_mode():
            return model.forward_exits(inp)

    rows = []
    for q in args.qs:
        predictor = timm_l2w.EarlyExitPredictor.from_distribution(model, heldout, q)
        for _ in range(2):  # warm-up: allocator and kernels see the shapes of both paths
            full(x), predictor.predict(x)
        times = {"full": [], "early": []}
        for r in range(args.repeats):  # alternate the order, too
            pair = [("full", full), ("early", predictor.predict)]
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                times[name].append(timed(fn, x))
        pred = predictor.predict(x)
        fractions = pred.exit_fractions(len(flops))
        flops_expected = float(fractions @ flops)
        # other jobs on the machine only ever add time: the minimum is the least disturbed run
        tf, te = (min(t[0] for t in times[n]) for n in ("full", "early"))
        cf, ce = (min(t[1] for t in times[n]) for n in ("full", "early"))
        flops_ratio = float(flops[-1]) / flops_expected
        # what the early-exit run really computed, counted while it runs (models counted on the ops they run)
        counted = getattr(model, "flop_counting", None) == "aten"
        measured = count_flops(predictor.predict, x) / len(x) if counted else None
        efficiency = (tf / te) / flops_ratio
        rows.append({
            "q": q, "exit_fractions": fractions.tolist(), "flops_expected": flops_expected,
            "flops_full": float(flops[-1]), "flops_measured": measured, "time_full_s": tf, "time_early_s": te,
            "speedup": tf / te, "flops_ratio": flops_ratio, "efficiency": efficiency,
            "time_full_s_median": statistics.median(t[0] for t in times["full"]),
            "time_early_s_median": statistics.median(t[0] for t in times["early"]),
            "cpu_full_s": cf, "cpu_early_s": ce, "efficiency_cpu_time": (cf / ce) / flops_ratio,
            "top1": 100.0 * float((pred.predictions == y).double().mean()),
            "latency_ms_per_image": 1e3 * te / len(x), "full_latency_ms_per_image": 1e3 * tf / len(x),
            "full_top1": 100.0 * float((full(x)[-1].argmax(1) == y).double().mean()),
        })
        print(f"q={q:<5} exits {[round(f, 2) for f in fractions.tolist()]}  "
              f"{flops_expected / 1e6:6.2f}/{float(flops[-1]) / 1e6:.2f} MFLOPs"
              + (f" (counted {measured / 1e6:.2f})  " if measured is not None else "  ") +
              f"full {tf * 1e3:7.1f} ms  early {te * 1e3:7.1f} ms  speedup {tf / te:5.2f}  "
              f"flops ratio {flops_ratio:5.2f}  efficiency {efficiency:.3f} (cpu time {(cf / ce) / flops_ratio:.3f})  "
              f"top1 {rows[-1]['top1']:.1f}%")

    profile = stage_profile(model, x, flops, max(args.repeats, 15)) if hasattr(model, "backbone") else None
    if profile:
        print(f"split overhead (staged eval forward / the backbone's own forward + classifier): "
              f"{profile['split_overhead']:.3f}; time share to each exit "
              f"{[round(t, 3) for t in profile['time_share']]} vs FLOPs share "
              f"{[round(f, 3) for f in profile['flops_share']]}")

    out_dir = Path(args.out_dir)
    stem = "early_exit_latency" if args.model == "msdnet_l2w_cifar" else f"early_exit_latency_{args.model}"
    report = {"model": args.model, "device": args.device, "checkpoint": args.checkpoint, "train_steps": steps,
              "batch_size": len(x),
              "threads": 1, "flops": flops.tolist(), "anytime": anytime, "budgets": rows, "stage_profile": profile,
              "min_efficiency": min(r["efficiency"] for r in rows)}
    write_text_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    plot_curves(
        {"early exit": ([r["latency_ms_per_image"] for r in rows], [r["top1"] for r in rows])},
        out_dir / f"{stem}.png", "measured latency (ms per image, batch %d, 1 thread)" % len(x),
        "top-1 accuracy (%)",
        points={"full network": ([rows[0]["full_latency_ms_per_image"]], [rows[0]["full_top1"]])},
        title=f"{args.model}: real early exit on {args.device}",
    )
    print(f"model {args.model}, {'checkpoint' if args.checkpoint else f'{steps} training steps on digits'}, "
          f"anytime top1 {[round(r['top1'], 1) for r in anytime]}")
    print(f"min_efficiency={report['min_efficiency']:.3f}")


if __name__ == "__main__":
    main()

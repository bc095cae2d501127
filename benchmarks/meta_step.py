"""Cost of L2W's meta step against a plain equal-weight multi-exit step.

Builds ``msdnet_l2w_cifar`` (100 classes), batches of 64 images 32x32, one thread, and times in one
process, alternating, (a) a plain equal-weight step (forward, sum of exit CEs, backward, SGD) and
(b) one L2W loader batch (two half-batch updates with swapped meta halves) with meta_interval 1
and 100. Prints the median time of each, the ratios L2W / plain and the peak memory of each mode
(CUDA: peak allocated; CPU: peak RSS of a separate short run, torch included), last line
``ratio_interval1=<x> ratio_interval100=<y>``. Targets: <= 3.0 and <= 1.1.

The optimizer is SGD (momentum 0.9, nesterov, weight decay 1e-4). ``--opt adamw`` (any
``timm.optim.create_optimizer_v2`` name) times that optimizer's plain step and L2W step beside
SGD's, all modes alternating in the same rounds, and appends ``<opt>_ratio_interval1=<x>
<opt>_ratio_interval100=<y>`` to the last line: the virtual step of an adaptive optimizer is its own
update rule (timm_l2w.optim_step), so its ratio shows what that costs against SGD's.

    python benchmarks/meta_step.py [--rounds 5] [--backend func|higher] [--compare] [--device cpu|cuda] [--opt adamw]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import timm
import torch
from timm.optim import create_optimizer_v2

import timm_l2w  # noqa: F401  (registers msdnet_l2w_cifar in timm)
from timm_l2w import L2W
from timm_l2w.weighting import weighted_multi_exit_loss

MODES = ("plain", "interval1", "interval100")  # + "interval1_<other backend>" with --compare; "<mode>@<opt>" with --opt
OPT_SETTINGS = {"adamw": dict(lr=1e-3, weight_decay=0.05)}  # create_optimizer_v2 settings per --opt (else lr=1e-3)


def build(mode: str, backend: str, device: str, batch: int, seed: int = 0) -> Callable[[], None]:
    """A closure running one step of ``mode`` (its own model, optimizer and data); ``mode@opt``: with that
    ``create_optimizer_v2`` optimizer instead of SGD."""
    mode, _, opt_name = mode.partition("@")
    torch.manual_seed(seed)
    model = timm.create_model("msdnet_l2w_cifar", num_classes=100).to(device).train()
    if opt_name:
        opt = create_optimizer_v2(model, opt_name, **OPT_SETTINGS.get(opt_name, dict(lr=1e-3)))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    if mode == "plain":
        def step() -> None:
            loss, _ = weighted_multi_exit_loss(model(x), y)  # train mode: every exit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    mode, _, other = mode.partition("_")
    interval = 1 if mode == "interval1" else 100
    l2w = L2W(model, opt, meta_interval=interval, backend=other or backend, total_steps=10_000)

    def l2w_step() -> None:
        for xt, yt in l2w.split(x, y):
            loss = l2w.loss(model(xt), yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return l2w_step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(backend: str, device: str, batch: int, rounds: int, modes=MODES) -> Dict[str, float]:
    """Median seconds per loader batch of each mode, alternating the modes round by round.

    With meta_interval 100, 49 loader batches in 50 carry no meta step and one carries a single
    meta step (half the extra work of an interval-1 batch): its cost per batch is estimated as
    ``t_no_meta + (t_interval1 - t_no_meta) / 100`` from the measured medians.
    """
    steps = {m: build(m, backend, device, batch) for m in modes}
    for step in steps.values():  # warm-up (also fills the momentum buffers, meta step of interval 100)
        step()
    times: Dict[str, list] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            _sync(device)
            start = time.perf_counter()
            steps[mode]()
            _sync(device)
            times[mode].append(time.perf_counter() - start)
    t = {m: statistics.median(v) for m, v in times.items()}
    for m in t:
        if m.startswith("interval100"):
            one = m.replace("interval100", "interval1", 1)
            t[m] = t[m] + (t[one] - t[m]) / 100
    return t


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB (VmHWM: unlike ru_maxrss it is not inherited over fork/exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(mode: str, backend: str, device: str, batch: int) -> float:
    """Peak memory (MiB) of two steps of ``mode``: CUDA peak allocated, or the peak RSS of a child process."""
    if device.startswith("cuda"):
        step = build(mode, backend, device, batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    code = (
        "import sys, torch; sys.path.insert(0, {path!r}); import meta_step as b; "
        "torch.set_num_threads(1); s = b.build({mode!r}, {backend!r}, 'cpu', {batch}); "
        "s(); s(); print(b.peak_rss_kib())"
    ).format(path=str(__import__("pathlib").Path(__file__).resolve().parent), mode=mode, backend=backend, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backend", default="func", choices=["higher", "func"],
                        help="backend of the reported ratios (func: the fast exact one)")
    parser.add_argument("--compare", action="store_true", help="also time interval 1 with the other backend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--opt", default=None,
                        help="also time this create_optimizer_v2 optimizer (e.g. adamw) beside SGD, side by side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    other = "higher" if args.backend == "func" else "func"
    modes = MODES + ((f"interval1_{other}",) if args.compare else ())
    if args.opt:
        modes = modes + tuple(f"{m}@{args.opt}" for m in MODES)
    t = time_modes(args.backend, args.device, args.batch, args.rounds, modes)
    r1 = t["interval1"] / t["plain"]
    r100 = t["interval100"] / t["plain"]
    print(f"device={args.device} backend={args.backend} batch={args.batch} rounds={args.rounds} threads=1")
    print(f"plain step            {t['plain'] * 1e3:9.1f} ms")
    print(f"L2W meta_interval=1   {t['interval1'] * 1e3:9.1f} ms per loader batch")
    print(f"L2W meta_interval=100 {t['interval100'] * 1e3:9.1f} ms per loader batch (1 meta step per 100 updates)")
    if args.compare:
        compared = f"interval1_{other}"
        print(f"L2W meta_interval=1   {t[compared] * 1e3:9.1f} ms per loader batch with backend={other}: "
              f"ratio {t[compared] / t['plain']:.2f}")
    extra = ""
    if args.opt:
        o = args.opt
        print(f"{o}: plain step {t['plain@' + o] * 1e3:9.1f} ms, "
              f"L2W meta_interval=1 {t['interval1@' + o] * 1e3:9.1f} ms, "
              f"meta_interval=100 {t['interval100@' + o] * 1e3:9.1f} ms per loader batch")
        extra = (f" {o}_ratio_interval1={t['interval1@' + o] / t['plain@' + o]:.2f}"
                 f" {o}_ratio_interval100={t['interval100@' + o] / t['plain@' + o]:.3f}")
    if not args.no_memory:
        mem = {m: peak_memory(m, args.backend, args.device, args.batch) for m in modes}
        print("peak memory (MiB): " + json.dumps({m: round(v, 1) for m, v in mem.items()}))
    print(f"ratio_interval1={r1:.2f} ratio_interval100={r100:.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

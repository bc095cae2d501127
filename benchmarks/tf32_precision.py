"""Does TF32 keep the fp32 L2W meta gradient accurate? (docs/precision.md's open question, issue 24.)

On a GPU, torch runs fp32 convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``) and fp32
matmuls in full fp32 (``torch.backends.cuda.matmul.allow_tf32``). For every state and batch (as
``benchmarks/meta_precision.py``: ``init`` and a briefly trained ``trained`` state, consecutive training
batches, the hook's first meta step), the fp32 meta gradient is computed under three TF32 settings and
compared with the float64 one (cosine, relative error):

* ``off``: both off (true fp32); ``default``: torch's (convolutions TF32); ``on``: both on (``--tf32 on``);
* ``jitter``: float64 with the parameters moved by one float32 rounding, the floor any fp32 policy meets.

The verdict line says whether ``on`` stays within ``--tolerance`` of ``off`` in median cosine (then
``timm-l2w train --tf32 on`` is safe for the meta step) and gives the time of one L2W loader batch under
each setting (alternating rounds). On the CPU the three settings are the same computation (a smoke run).

    python benchmarks/tf32_precision.py --device cuda [--model msdnet_l2w_cifar] [--batch 128] [--batches 3]
        [--out benchmarks/results/gpu/tf32_precision.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meta_precision import (  # noqa: E402
    build_state,
    compare,
    hook_step,
    load_batches,
    reference,
    short_training,
    write_result,
)

SETTINGS = {"off": (False, False), "default": (None, None), "on": (True, True)}  # (cudnn, matmul); None: torch's


def tf32_setting(name: str):
    """Context manager: cuDNN / matmul TF32 as ``SETTINGS[name]`` (restored afterwards)."""
    import contextlib

    @contextlib.contextmanager
    def setting():
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        cudnn, matmul = SETTINGS[name]
        torch.backends.cudnn.allow_tf32 = old[0] if cudnn is None else cudnn
        torch.backends.cuda.matmul.allow_tf32 = old[1] if matmul is None else matmul
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

    return setting()


def timed_batch(model, net, batch, backend: str, device: str, name: str) -> float:
    """Seconds of one L2W loader batch (two updates: forward, meta step, weighted loss, backward, SGD)."""
    import copy

    from timm_l2w import L2W

    m, n = copy.deepcopy(model).to(device), copy.deepcopy(net).to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    l2w = L2W(m, opt, weight_net=n, backend=backend)
    x, y = (t.to(device) for t in batch)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with tf32_setting(name):
        for _ in range(2):  # the first batch warms up
            sync()
            start = time.perf_counter()
            for xt, yt in l2w.split(x, y):
                loss = l2w.loss(m(xt), yt)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sync()
    return time.perf_counter() - start


def run(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    batches = load_batches(args.dataset, args.batches, args.batch)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        states = {"init": build_state(args.model, 10, None, args.seed)}
        if args.train_steps:
            log(f"training {args.train_steps} steps of L2W on {args.dataset} for the 'trained' state ...")
            states["trained"] = build_state(args.model, 10, short_training(
                args.model, args.dataset, args.train_steps, str(Path(tmp) / "run")), args.seed)
        for state, (model, net) in states.items():
            for b, batch in enumerate(batches):
                ref, ref_loss = reference(model, net, batch, args.backend, args.device)
                jit, _ = reference(model, net, batch, args.backend, args.device, jitter=2.0 ** -24, seed=b)
                rows.append({"state": state, "batch": b, "tf32": "jitter", **compare(jit, ref)})
                for name in SETTINGS:
                    with tf32_setting(name):
                        g, loss = hook_step(model, net, batch, "no", "fp32", args.backend, args.device)
                    rows.append({"state": state, "batch": b, "tf32": name, **compare(g, ref), "meta_loss": loss,
                                 "meta_loss_fp64": ref_loss})
                    log(f"{state} batch {b} tf32 {name}: cos {rows[-1]['cos']} rel {rows[-1]['rel']}")
        times: Dict[str, List[float]] = {name: [] for name in SETTINGS}
        model, net = states["init"]
        for _ in range(args.rounds):
            for name in SETTINGS:
                times[name].append(timed_batch(model, net, batches[0], args.backend, args.device, name))
    summary: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for row in rows:
        entry = summary.setdefault(row["state"], {}).setdefault(row["tf32"], {"cos": [], "rel": [], "nonfinite": 0})
        if row["finite"]:
            entry["cos"].append(row["cos"])
            entry["rel"].append(row["rel"])
        else:
            entry["nonfinite"] += 1
    for by_setting in summary.values():
        for entry in by_setting.values():
            cos, rel = entry.pop("cos"), entry.pop("rel")
            if cos:
                entry.update(cos_min=min(cos), cos_median=statistics.median(cos), rel_median=statistics.median(rel))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items() if t}
    safe = all(s.get("on", {}).get("cos_median", -1) >= s.get("off", {}).get("cos_median", 2) - args.tolerance
               for s in summary.values())
    verdict = (f"TF32 {'keeps' if safe else 'does NOT keep'} the fp32 meta gradient within {args.tolerance} median "
               f"cosine of true fp32 (float64 reference) in every state" +
               ("; ms per L2W loader batch: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) if ms else ""))
    return {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "config": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows, "summary": summary, "ms_per_loader_batch": ms, "tf32_safe": safe, "verdict": verdict}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="msdnet_l2w_cifar")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or digits")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--backend", default="func", choices=["higher", "func"])
    p.add_argument("--train-steps", type=int, default=20, help="L2W steps for the 'trained' state (0: init only)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (0: no timing)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="allowed drop of the median cosine under TF32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        print("tf32_precision.py: --batch must be an even number >= 2", file=sys.stderr)
        return 2
    result = run(args)
    print(result["verdict"])
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

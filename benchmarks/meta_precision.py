"""How far the L2W meta gradient is from float64 under each meta-step precision policy, and its cost.

For every state (``init``: a freshly initialised model and predictor; ``trained``: ``--checkpoint``, or a
short L2W training run when none is given), every batch (``--batches`` consecutive batches of
``--batch`` Fashion-MNIST images, or digits with ``--dataset digits``) and every low precision
(``--precisions bf16 fp16``), one meta step of the :class:`timm_l2w.L2W` hook (training half = first half
of the batch, meta half = the rest, as in ``L2W.split``) is compared with the same step computed in
float64 (model, predictor, data and optimizer state in float64, no autocast). Policies:

* ``fp32``: ``L2W(meta_precision='fp32')``: autocast off in the meta step, the real step in low precision;
* ``amp``: ``L2W(meta_precision='amp')``: the meta step under the real step's autocast (fp16: loss scaling);
* ``amp-noscale`` (fp16): the ``amp`` meta step without loss scaling (``meta_step(loss_scale=1)``);
* ``lowp-fwd`` (``--backend func``): low-precision forwards with the second-order part (the forward-mode
  product) in fp32 (the autocast callable is switched off for meta_step's last autocast block);
* ``fp32-notf32`` (CUDA): ``fp32`` with TF32 turned off (torch lets cuDNN convolutions use TF32 by default);
* ``jitter``: float64 again, the parameters moved by a relative 2**-24 (one float32 rounding): the
  meta gradient's own sensitivity, i.e. the best any float32 policy can be expected to do.

Reported per row: cosine and relative error ``|g - g64| / |g64|`` of the predictor's meta gradient,
and both meta losses; per (state, precision, policy) the min / median / max over batches. Then the
time of one L2W loader batch (two updates, forward + meta step + backward + SGD) per policy, alternating
the policies round by round in one process, ``torch.set_num_threads(1)``; ratios to ``amp`` (a loaded
machine makes single timings noisy; the alternating ratios are the number to read).

    python benchmarks/meta_precision.py [--device cpu|cuda] [--precisions bf16 fp16] [--batches 4]
        [--checkpoint RUN_DIR_OR_model.safetensors] [--out benchmarks/results/meta_precision.json]

Accelerate runs fp16 only on GPUs; on the CPU the fp16 rows use ``torch.autocast('cpu', float16)``
around the forwards and ``L2W.loss`` (no accelerator), which the ``amp`` policy follows.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import timm_l2w  # noqa: F401  (registers the models)
from timm_l2w import L2W, WeightPredictor
from timm_l2w.meta import meta_step
from timm_l2w.models.factory import create_multi_exit_model

Batch = Tuple[Tensor, Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4  # timm-l2w train's defaults (timm's 'momentum' SGD, no nesterov)


# ----------------------------------------------------------------------------- set-up


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def load_batches(dataset: str, count: int, batch: int, input_size: int = 32) -> List[Batch]:
    """``count`` consecutive batches of the training split (fixed order), transformed as in training."""
    from timm_l2w.data import create_datasets

    splits = create_datasets(dataset, input_size=input_size)
    n = count * batch
    if n > len(splits.train):
        raise ValueError(f"{count} batches of {batch} need {n} images; {dataset} has {len(splits.train)}")
    images, labels = zip(*(splits.train[i] for i in range(n)))
    x = splits.train_collate_fn.transform(torch.stack(images))
    y = torch.stack(labels)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def build_state(model_name: str, num_classes: int, checkpoint: Optional[str], seed: int = 0
                ) -> Tuple[nn.Module, WeightPredictor]:
    """The model and predictor at initialisation (``checkpoint=None``) or loaded from a run folder / file."""
    from timm_l2w.files import load_state_dict

    torch.manual_seed(seed)
    model = create_multi_exit_model(model_name, num_classes=num_classes)
    net = WeightPredictor(model.num_exits)
    if checkpoint:
        path = Path(checkpoint)
        path = path / "model.safetensors" if path.is_dir() else path
        model.load_state_dict(load_state_dict(str(path)))
        predictor = path.with_name("weight_predictor.safetensors")
        if predictor.is_file():
            net.load_state_dict(load_state_dict(str(predictor)))
    return model.train(), net


def short_training(model_name: str, dataset: str, steps: int, out: str) -> str:
    """Train ``steps`` loader batches of L2W with ``timm-l2w train`` (fp32) and return the run folder."""
    from timm_l2w.cli.train import main

    code = main(["--model", model_name, "--dataset", dataset, "--max-steps", str(steps), "--batch-size", "64",
                 "--lr", str(LR), "--weighting", "l2w", "--backend", "func", "--output", out, "--no-eval",
                 "--no-progress", "--log-with", "none"])
    if code != 0:
        raise RuntimeError(f"the short training run failed (exit code {code})")
    return out


def accelerator_for(precision: str, device: str) -> Tuple[Any, Callable[[], ContextManager]]:
    """(accelerate ``Accelerator`` or None, autocast to put around forward and ``L2W.loss``).

    accelerate runs fp16 only on GPUs: on the CPU fp16 is ``torch.autocast('cpu', float16)`` without an
    accelerator (the ``amp`` policy then follows that autocast)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if precision == "fp16" and not device.startswith("cuda"):
        return None, lambda: torch.autocast("cpu", dtype=torch.float16)
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not device.startswith("cuda")), contextlib.nullcontext


def flat(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.detach().reshape(-1).double().cpu() for g in grads])


def compare(g: Tensor, ref: Tensor) -> Dict[str, Any]:
    """Cosine and relative error of ``g`` against ``ref`` (both flat float64); None for a non-finite ``g``
    (the hook skips such a meta step and counts it in ``L2W.meta_skipped``)."""
    if not bool(torch.isfinite(g).all()):
        return {"cos": None, "rel": None, "finite": False}
    cos = float(g @ ref / (g.norm() * ref.norm()).clamp_min(1e-300))
    return {"cos": cos, "rel": float((g - ref).norm() / ref.norm().clamp_min(1e-300)), "finite": True}


# ----------------------------------------------------------------------------- one meta step per policy


def reference(model: nn.Module, net: WeightPredictor, batch: Batch, backend: str, device: str,
              jitter: float = 0.0, seed: int = 0) -> Tuple[Tensor, float]:
    """The meta gradient of the hook's first meta step on ``batch``, in float64 (``jitter``: relative noise
    added to every parameter first)."""
    m = copy.deepcopy(model).to(device, torch.float64)
    n = copy.deepcopy(net).to(device, torch.float64)
    if jitter:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for t in m.parameters():
                noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
                t.add_(noise * t.abs() * jitter)
    x, y = batch
    half = x.shape[0] // 2
    x = x.to(next(m.parameters()).device, torch.float64)
    y = y.to(x.device)
    probe = L2W(m, sgd(m), weight_net=n, backend=backend)  # the hook's p, eps and constraint
    result = meta_step(m, sgd(m), n, (x[:half], y[:half]), (x[half:], y[half:]), probe.p, eps=probe.eps,
                       constraint=probe.constraint, backend=backend)
    return flat(result.grads), float(result.meta_loss)


def hook_step(model: nn.Module, net: WeightPredictor, batch: Batch, precision: str, policy: str, backend: str,
              device: str) -> Tuple[Tensor, float]:
    """The meta gradient of the first meta step of ``L2W(meta_precision=policy)`` driven as in ``timm-l2w train``."""
    m, n = copy.deepcopy(model).to(device), copy.deepcopy(net).to(device)
    opt = sgd(m)
    acc, outer = accelerator_for(precision, device)
    l2w = L2W(m, opt, weight_net=n, backend=backend, accelerator=acc, meta_precision=policy)
    if acc is not None:  # as timm-l2w train: the hook is built first, then accelerate wraps the model
        m, opt = acc.prepare(m, opt)
        l2w.model, l2w.optimizer = m, opt
    x, y = (t.to(device) for t in batch)
    for xt, yt in l2w.split(x, y):
        with outer():
            outputs = m(xt)
            l2w.loss(outputs, yt)
        break
    return flat(l2w.last_meta_grads), float(l2w.last_meta_loss)


class _LastBlockFp32:
    """Autocast callable for :func:`meta_step`: low precision in every block but the last of a step."""

    def __init__(self, dtype: torch.dtype, device: str, blocks: int):
        self.dtype, self.device, self.blocks, self.calls = dtype, device.split(":")[0], blocks, 0

    def __call__(self) -> ContextManager:
        self.calls += 1
        return torch.autocast(self.device, dtype=self.dtype, enabled=self.calls < self.blocks)


def direct_step(model: nn.Module, net: WeightPredictor, batch: Batch, precision: str, policy: str, backend: str,
                device: str) -> Tuple[Tensor, float]:
    """``amp-noscale`` and ``lowp-fwd``: :func:`meta_step` with the training half's outputs from a
    low-precision forward (shared, as the hook does) and the policy's autocast / loss scale."""
    m, n = copy.deepcopy(model).to(device), copy.deepcopy(net).to(device)
    x, y = (t.to(device) for t in batch)
    half = x.shape[0] // 2
    dtype, dev = DTYPES[precision], device.split(":")[0]
    probe = L2W(m, sgd(m), weight_net=n, backend=backend)
    with torch.autocast(dev, dtype=dtype):
        outputs = m(x[:half])
    if policy == "lowp-fwd":
        if backend != "func":
            raise ValueError("lowp-fwd needs --backend func (its second-order part is a forward-mode product)")
        autocast: Callable[[], ContextManager] = _LastBlockFp32(dtype, device, blocks=2)  # meta forward, JVP
    else:
        autocast = lambda: torch.autocast(dev, dtype=dtype)  # noqa: E731
    result = meta_step(m, sgd(m), n, (x[:half], y[:half]), (x[half:], y[half:]), probe.p, eps=probe.eps,
                       constraint=probe.constraint, backend=backend, train_outputs=outputs, autocast=autocast)
    if policy == "lowp-fwd" and autocast.calls != 2:
        raise RuntimeError(f"meta_step opened {autocast.calls} autocast blocks, expected 2: update lowp-fwd")
    return flat(result.grads), float(result.meta_loss)


@contextlib.contextmanager
def tf32(enabled: bool):
    """cuDNN / matmul TF32 on or off (CUDA only; restored afterwards)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def policies_for(precision: str, backend: str, device: str) -> List[str]:
    names = ["fp32", "amp"]
    if precision == "fp16":
        names.append("amp-noscale")
    if backend == "func":
        names.append("lowp-fwd")
    if device.startswith("cuda"):
        names.append("fp32-notf32")
    return names


def policy_step(model: nn.Module, net: WeightPredictor, batch: Batch, precision: str, policy: str, backend: str,
                device: str) -> Tuple[Tensor, float]:
    """The meta gradient and meta loss of ``policy`` (see the module docstring)."""
    if policy in ("fp32", "amp"):
        return hook_step(model, net, batch, precision, policy, backend, device)
    if policy == "fp32-notf32":
        with tf32(False):
            return hook_step(model, net, batch, precision, "fp32", backend, device)
    return direct_step(model, net, batch, precision, policy, backend, device)


def accuracy(states: Dict[str, Tuple[nn.Module, WeightPredictor]], batches: Sequence[Batch],
             precisions: Sequence[str], backend: str, device: str, log: Callable[[str], None] = print
             ) -> List[Dict[str, Any]]:
    """One row per (state, batch, precision, policy) with cos / rel against float64."""
    rows = []
    for state, (model, net) in states.items():
        for b, batch in enumerate(batches):
            ref, ref_loss = reference(model, net, batch, backend, device)
            jit, jit_loss = reference(model, net, batch, backend, device, jitter=2.0 ** -24, seed=b)
            rows.append({"state": state, "batch": b, "precision": "fp64", "policy": "jitter", **compare(jit, ref),
                         "meta_loss": jit_loss, "meta_loss_fp64": ref_loss})
            for precision in precisions:
                for policy in policies_for(precision, backend, device):
                    g, loss = policy_step(model, net, batch, precision, policy, backend, device)
                    row = {"state": state, "batch": b, "precision": precision, "policy": policy, **compare(g, ref),
                           "meta_loss": loss, "meta_loss_fp64": ref_loss}
                    rows.append(row)
                    err = f"cos {row['cos']:+.4f} rel {row['rel']:.4f}" if row["finite"] else "non-finite meta gradient"
                    log(f"{state:8s} batch {b} {precision} {policy:12s} {err} "
                        f"meta loss {loss:.4f} (fp64 {ref_loss:.4f})")
    return rows


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Dict[str, float]]]]:
    """min / median / max of cos and median / max rel over the finite rows, and the count of non-finite
    ones, per state, precision and policy."""
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["state"], r["precision"], r["policy"]), []).append(r)
    out: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {}
    for (state, precision, policy), rs in groups.items():
        ok = [r for r in rs if r["finite"]]
        cos, rel = [r["cos"] for r in ok], [r["rel"] for r in ok]
        stats: Dict[str, Any] = {"batches": len(rs), "nonfinite": len(rs) - len(ok)}
        if ok:
            stats.update(cos_min=min(cos), cos_median=statistics.median(cos), cos_max=max(cos),
                         rel_median=statistics.median(rel), rel_max=max(rel))
        out.setdefault(state, {}).setdefault(precision, {})[policy] = stats
    return out


# ----------------------------------------------------------------------------- time


def timed_step(model: nn.Module, net: WeightPredictor, batch: Batch, policy: str, backend: str, device: str,
               acc: Any, outer: Callable[[], ContextManager]) -> Callable[[], None]:
    """A closure running one L2W loader batch (two updates) as ``timm-l2w train`` does, with its own copies."""
    m, n = copy.deepcopy(model).to(device), copy.deepcopy(net).to(device)
    opt = sgd(m)
    l2w = L2W(m, opt, weight_net=n, backend=backend, accelerator=acc, meta_precision=policy)
    if acc is not None:
        m, opt = acc.prepare(m, opt)
        l2w.model, l2w.optimizer = m, opt
    x, y = (t.to(device) for t in batch)

    def step() -> None:
        for xt, yt in l2w.split(x, y):
            with outer():
                loss = l2w.loss(m(xt), yt)
            opt.zero_grad(set_to_none=True)
            if acc is not None:
                acc.backward(loss)
            else:
                loss.backward()
            opt.step()
    return step


def timing(model: nn.Module, net: WeightPredictor, batch: Batch, precisions: Sequence[str], backend: str,
           device: str, rounds: int) -> Dict[str, Any]:
    """Median ms per loader batch of each policy, per precision: ``fp32`` and ``amp`` alternating round by
    round with a plain-fp32 L2W run (``no``) as a third column (one accelerator per precision: accelerate's
    ``autocast()`` reads the latest accelerator's settings)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ms: Dict[str, float] = {}
    for precision in precisions:
        acc, outer = accelerator_for(precision, device)
        steps = {f"{precision}/{pol}": timed_step(model, net, batch, pol, backend, device, acc, outer)
                 for pol in ("fp32", "amp")}
        steps[f"{precision}/no"] = timed_step(model, net, batch, "fp32", backend, device, None, contextlib.nullcontext)
        for step in steps.values():  # warm-up
            step()
        times: Dict[str, List[float]] = {k: [] for k in steps}
        for _ in range(rounds):
            for key, step in steps.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                times[key].append(time.perf_counter() - start)
        ms.update({k: 1e3 * statistics.median(v) for k, v in times.items()})
    ratios = {p: ms[f"{p}/fp32"] / ms[f"{p}/amp"] for p in precisions}
    over_no = {k: v / ms[f"{k.split('/')[0]}/no"] for k, v in ms.items()}
    return {"rounds": rounds, "ms_per_loader_batch": ms, "fp32_over_amp": ratios, "over_plain_fp32_run": over_no}


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    batches = load_batches(args.dataset, args.batches, args.batch)
    states: Dict[str, Tuple[nn.Module, WeightPredictor]] = {}
    if "init" in args.states:
        states["init"] = build_state(args.model, 10, None, args.seed)
    checkpoint = args.checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        if "trained" in args.states:
            if checkpoint is None:
                log(f"training {args.train_steps} steps of L2W on {args.dataset} for the 'trained' state ...")
                checkpoint = short_training(args.model, args.dataset, args.train_steps, str(Path(tmp) / "run"))
            states["trained"] = build_state(args.model, 10, checkpoint, args.seed)
        rows = accuracy(states, batches, args.precisions, args.backend, args.device, log)
        first = next(iter(states.values()))
        # accelerate has no fp16 on the CPU (and CPU fp16 kernels are far slower than fp32): bf16 only there
        timed = [p for p in args.precisions if args.device.startswith("cuda") or p == "bf16"]
        times = timing(*first, batches[0], timed, args.backend, args.device, args.rounds) \
            if args.rounds and timed else None
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "threads": args.threads,
        "config": {"model": args.model, "dataset": args.dataset, "batch": args.batch, "batches": args.batches,
                   "backend": args.backend, "precisions": list(args.precisions), "states": list(states),
                   "checkpoint": ("given" if args.checkpoint else f"{args.train_steps} L2W steps, fp32")
                   if "trained" in states else None,
                   "optimizer": f"SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}"},
        "rows": rows, "summary": summarize(rows), "timing": times,
    }
    return result


def report(result: Dict[str, Any]) -> str:
    """The summary table (and timing) as text."""
    lines = [f"device={result['device']} backend={result['config']['backend']} batches={result['config']['batches']}"
             f" x {result['config']['batch']} ({result['config']['dataset']})",
             f"{'state':8s} {'precision':9s} {'policy':12s} {'cos min':>8s} {'median':>8s} {'max':>8s} {'rel med':>8s}"]
    for state, by_prec in result["summary"].items():
        for precision, by_pol in by_prec.items():
            for policy, s in by_pol.items():
                bad = f"  ({s['nonfinite']}/{s['batches']} non-finite)" if s["nonfinite"] else ""
                nums = (f"{s['cos_min']:+8.4f} {s['cos_median']:+8.4f} {s['cos_max']:+8.4f} {s['rel_median']:8.4f}"
                        if "cos_min" in s else f"{'-':>8s} {'-':>8s} {'-':>8s} {'-':>8s}")
                lines.append(f"{state:8s} {precision:9s} {policy:12s} {nums}{bad}")
    if result["timing"]:
        t = result["timing"]
        lines.append("ms per L2W loader batch (median of %d alternating rounds): " % t["rounds"]
                     + ", ".join(f"{k} {v:.0f}" for k, v in t["ms_per_loader_batch"].items()))
        lines.append("time fp32 meta step / amp meta step: "
                     + ", ".join(f"{p} {r:.2f}" for p, r in t["fp32_over_amp"].items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="msdnet_l2w_cifar_tiny")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or digits")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    p.add_argument("--states", nargs="+", default=["init", "trained"], choices=["init", "trained"])
    p.add_argument("--backend", default="higher", choices=["higher", "func"])
    p.add_argument("--checkpoint", default=None, help="run folder or model.safetensors for the 'trained' state")
    p.add_argument("--train-steps", type=int, default=60, help="L2W steps for 'trained' without --checkpoint")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (0: no timing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        print("meta_precision.py: --batch must be an even number >= 2 (training half + meta half)", file=sys.stderr)
        return 2
    result = run(args)
    print(report(result))
    write_result(args.out, result)
    return 0


def write_result(out: Optional[str], result: Dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``out`` (atomically; nothing without ``out``)."""
    if out:
        from timm_l2w.files import write_json_atomic

        write_json_atomic(Path(out), result)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

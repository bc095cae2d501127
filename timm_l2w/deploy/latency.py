"""Latency tables on the deployment target, and ``timm-l2w eval --latency-budget``'s share of the work.

:func:`measure_target_latency` times a model's stages on one of two targets: ``'torch'``
(:func:`timm_l2w.inference.measure_latency_table`: :class:`~timm_l2w.EarlyExitPredictor` in eager PyTorch
on the model's device) or ``'onnx'`` (the model exported to a temporary package with
:func:`~timm_l2w.deploy.export_package` and timed by :meth:`timm_l2w_runtime.EarlyExitRuntime.stage_latency`
in onnxruntime on the CPU). :func:`eval_latency_table` measures (or reads) the table for
``timm-l2w eval --latency-budget`` and adds the expected milliseconds of every budget to its tables.
The model of expected latency per image is :mod:`timm_l2w_runtime.latency`.
"""
from __future__ import annotations

import copy
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from timm_l2w_runtime.latency import latency_batch_sizes, latency_table_text, read_latency_table

from ..evaluation.results import save_results
from ..inference.latency import latency_columns, measure_latency_table, placeholder_predictor
from ..models.base import unwrap_model
from .export import export_package

__all__ = ["LATENCY_TARGET_CHOICES", "measure_target_latency", "eval_latency_table"]

LATENCY_TARGET_CHOICES = ("torch", "onnx")


@contextmanager
def _torch_threads(threads: Optional[int]) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_target_latency(model: nn.Module, input_size: Sequence[int], batch_sizes: Sequence[int],
                           target: str = "torch", rule: str = "confidence", repeats: int = 10, warmup: int = 3,
                           threads: Optional[int] = None, clock: str = "wall", rounds: int = 3) -> Dict[str, Any]:
    """The latency table of ``model`` on ``target`` (``'torch'``: eager PyTorch on the model's device, with
    ``threads`` CPU threads when given; ``'onnx'``: onnxruntime's CPU provider, ``threads`` intra-op threads,
    from a temporary export at ``input_size``)."""
    if target not in LATENCY_TARGET_CHOICES:
        raise ValueError(f"latency target must be one of {LATENCY_TARGET_CHOICES}, got {target!r}")
    size = tuple(int(v) for v in input_size)
    if target == "torch":
        with _torch_threads(threads):
            return measure_latency_table(model, size, batch_sizes, rule=rule, repeats=repeats, warmup=warmup,
                                         clock=clock, rounds=rounds)
    from timm_l2w_runtime import EarlyExitRuntime

    net = unwrap_model(model)
    if next(net.parameters()).device.type != "cpu":
        net = copy.deepcopy(net).cpu()  # the export traces on the CPU; the caller's model stays where it is
    with tempfile.TemporaryDirectory(prefix="timm_l2w_latency_") as tmp:
        package = export_package(net, Path(tmp) / "package", placeholder_predictor(net, rule), input_size=size,
                                 pt2=False, verify=False)
        runtime = EarlyExitRuntime(package, threads=threads)
        return runtime.stage_latency(batch_sizes, repeats=repeats, warmup=warmup, clock=clock, rounds=rounds)


def eval_latency_table(args: Any, model: nn.Module, result: Dict[str, Any], input_size: Sequence[int],
                       name: str) -> Dict[str, Any]:
    """``timm-l2w eval --latency-budget``: the table (read from ``--latency-table``, else measured on
    ``--latency-target``), printed; ``expected_ms`` / ``heldout_expected_ms`` columns (at
    ``--latency-batch-size``) added to ``<name>_budgeted.csv`` and ``<name>.json``."""
    batch = int(args.latency_batch_size)
    num_exits = int(model.num_exits)
    if args.latency_table:
        table = read_latency_table(args.latency_table, num_exits)
    else:
        print(f"timm-l2w eval: timing every stage on {args.latency_target} at batch sizes "
              f"{latency_batch_sizes(batch)} ({args.latency_rounds} rounds of {args.latency_repeats} runs each)",
              flush=True)
        table = measure_target_latency(model, input_size, latency_batch_sizes(batch), args.latency_target,
                                       args.exit_rule, repeats=args.latency_repeats, threads=args.latency_threads,
                                       rounds=args.latency_rounds)
    print(latency_table_text(table))
    rows = latency_columns(result["budgeted"], table, batch)
    best = max(rows, key=lambda r: r["test_top1"])
    cheapest = min(rows, key=lambda r: r["expected_ms"])
    print(f"budgeted, expected ms per image at batch {batch}: best test top1 {best['test_top1']:.2f}% at "
          f"{best['expected_ms']:.4g} ms ({best['expected_flops'] / 1e6:.2f} MFLOPs); the cheapest budget "
          f"{cheapest['expected_ms']:.4g} ms ({cheapest['expected_flops'] / 1e6:.2f} MFLOPs)")
    files = result.get("files") or {}
    if "json" in files:
        saved: Mapping[str, Any] = json.loads(Path(files["json"]).read_text(encoding="utf-8"))
        extra = {k: v for k, v in saved.items() if k not in ("anytime", "budgeted")}
        extra.update(latency=table, latency_batch_size=batch)
        files.update(save_results(Path(files["json"]).parent, saved.get("anytime"), rows, name=name, extra=extra))
    result["latency_table"] = table
    return table

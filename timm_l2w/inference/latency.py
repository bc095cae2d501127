"""Latency budgets on PyTorch: time every stage of :class:`~timm_l2w.EarlyExitPredictor`'s own loop.

:func:`measure_latency_table` gives the latency table (format and the model of expected latency per image:
:mod:`timm_l2w_runtime.latency`) of a model in eager PyTorch on the device its parameters are on, CPU or
GPU; :meth:`timm_l2w.EarlyExitPredictor.from_latency_budget` chooses a policy with it, and
:func:`latency_columns` puts the expected milliseconds of every budget of a budgeted evaluation beside its
FLOPs. The onnxruntime side is :meth:`timm_l2w_runtime.EarlyExitRuntime.stage_latency`.
"""
from __future__ import annotations

import math
import platform
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from timm_l2w_runtime.latency import (
    CLOCKS,
    StageClock,
    TimingRule,
    check_timing_settings,
    expected_latency_ms,
    latency_table,
    measure_stages,
    processor_name,
)

from ..evaluation.metrics import BudgetedResults
from ..exits import ExitRule, exit_rule
from ..models.base import select_samples, unwrap_model
from ..preprocessing import model_name
from .predictor import EarlyExitPredictor

__all__ = ["measure_latency_table", "latency_columns", "torch_device_info", "placeholder_predictor"]


class _TimedStages:
    """The model as the predictor sees it in a timed call: marks every stage's start on a
    :class:`StageClock` and, after stage 0, first copies the rows of the state it received (as the predictor
    does when samples left) and runs the stage on the copy."""

    def __init__(self, model: nn.Module, stage_clock: StageClock):
        self.model, self.stage_clock = model, stage_clock

    def forward_stage(self, index: int, state: Any) -> Any:
        start = self.stage_clock.mark()
        if index > 0:
            first = next(t for t in tree_leaves(state) if isinstance(t, torch.Tensor))
            rows = torch.ones(len(first), dtype=torch.bool, device=first.device)
            state, _ = select_samples(state, rows), rows[rows]
            self.stage_clock.gathered(index, start)
        return self.model.forward_stage(index, state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def torch_device_info(device: torch.device) -> Dict[str, Any]:
    """Where a measurement ran: the processor or GPU name, threads, torch's version."""
    if device.type == "cuda":
        return {"name": torch.cuda.get_device_name(device), "device": str(device), "torch": torch.__version__}
    return {"name": processor_name(), "device": str(device), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def placeholder_predictor(model: nn.Module, rule: str | ExitRule = "confidence") -> EarlyExitPredictor:
    """A predictor of ``rule`` with placeholder parameters (infinite thresholds, patience 1): what a timing
    run decides with, behind :class:`~timm_l2w_runtime.latency.TimingRule`."""
    rule = exit_rule(rule)
    if rule.calibrated:
        return EarlyExitPredictor(model, [math.inf] * int(unwrap_model(model).num_exits), rule=rule)
    return EarlyExitPredictor(model, rule=rule, patience=1)


@torch.inference_mode()
def measure_latency_table(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                          batch_sizes: Sequence[int] = (1, 8, 64), rule: str | ExitRule = "confidence",
                          repeats: int = 10, warmup: int = 3, clock: str = "wall", rounds: int = 3) -> Dict[str, Any]:
    """The latency table of ``model`` in eager PyTorch, on the device its parameters are on.

    Every timed call is :meth:`EarlyExitPredictor.predict` itself on random images of ``input_size``
    (default: the model's configured size) with ``rule`` deciding at every exit but nobody leaving (or
    everybody at one exit: :func:`timm_l2w_runtime.latency.measure_stages`), so each stage's time holds what
    the predictor does there (the stage, the softmax, the rule, the host sync of its decision); per stage
    and batch size, the slowest of ``rounds`` rounds' medians of ``repeats`` calls (after ``warmup``),
    the rounds one after another over the whole measurement.
    ``clock='process'`` times CPU time of this process (steadier on a shared CPU with one thread).
    """
    sizes = check_timing_settings(repeats, warmup, clock, batch_sizes, rounds)
    net = unwrap_model(model)
    rule = exit_rule(rule)
    num_exits = int(net.num_exits)
    if input_size is None:
        from timm.models import get_model_input_config

        if "input_size" not in (getattr(net, "pretrained_cfg", None) or {}):
            raise ValueError("pass input_size=(C, H, W): the model has no pretrained_cfg['input_size']")
        input_size = get_model_input_config(net)["input_size"]
    size = tuple(int(v) for v in input_size)
    device = next(net.parameters()).device
    stage_clock = StageClock(CLOCKS[clock], torch.cuda.synchronize if device.type == "cuda" else None)
    predictor = placeholder_predictor(net, rule)
    timing_rule = TimingRule(predictor.exit_rule)
    predictor.model, predictor.exit_rule = _TimedStages(net, stage_clock), timing_rule
    generator = torch.Generator(device=device).manual_seed(0)
    timings = measure_stages(predictor.predict, lambda b: torch.randn(b, *size, device=device, generator=generator),
                             stage_clock, timing_rule, sizes, num_exits, repeats, warmup, rounds)
    return latency_table("torch", torch_device_info(device), model_name(net), num_exits, size, rule.name, timings,
                         repeats, warmup, clock)


def latency_columns(budgeted: BudgetedResults, table: Mapping[str, Any], batch_size: int) -> List[Dict[str, Any]]:
    """The rows of a budgeted evaluation with ``expected_ms`` (test exit fractions) and ``heldout_expected_ms``:
    the expected milliseconds per image of every budget at ``batch_size`` on the table's device."""
    test = expected_latency_ms(table, budgeted.test_exit_fractions.numpy(), batch_size)
    held = expected_latency_ms(table, budgeted.heldout_exit_fractions.numpy(), batch_size)
    rows = budgeted.rows()
    for row, t, h in zip(rows, test.tolist(), held.tolist()):
        row.update(expected_ms=t, heldout_expected_ms=h)
    return rows

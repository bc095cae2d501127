"""The exit policy's PyTorch side: the policy ``timm-l2w eval --q`` / ``--flops-budget`` calibrates.

The file format itself (reading, writing, validation) lives in :mod:`timm_l2w_runtime.policy`, which
needs no PyTorch; how a model's images are prepared, in that format, is :mod:`timm_l2w.preprocessing`.
The predictor that saves and loads a policy is :class:`~timm_l2w.inference.EarlyExitPredictor`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Tuple

from torch import nn

from ..exits import ExitRule, exit_rule
from ..preprocessing import preprocess_from_loader
from ..validation import Range, check_number
from .predictor import EarlyExitPredictor

__all__ = ["check_policy_request", "eval_policy_file", "policy_from_eval"]


def check_policy_request(q: Optional[float], flops_budget: Optional[float], rule: str | ExitRule,
                         latency_budget: Optional[float] = None) -> Tuple[Optional[float], Optional[float]]:
    """Check that exactly one budget is given, in range, and that it fits the exit rule."""
    if sum(v is not None for v in (q, flops_budget, latency_budget)) != 1:
        raise ValueError("pass exactly one of --q (the paper's exit distribution p_k ∝ q**k), --flops-budget "
                         "and --latency-budget")
    if latency_budget is not None:
        check_number(latency_budget, "latency_budget", Range(0, low_open=True, hint="milliseconds per image"))
    elif q is not None:
        q = check_number(q, "q", Range(0, low_open=True, hint="q < 1 front-loads, q > 1 back-loads the exits"))
        if not exit_rule(rule).calibrated:
            raise ValueError(f"the {exit_rule(rule).name} rule has no exit distribution to calibrate for q: "
                             "pass --flops-budget F (the most accurate patience within the budget) instead of --q")
    else:
        flops_budget = check_number(flops_budget, "flops_budget", Range(0, low_open=True, hint="FLOPs per image"))
    return q, flops_budget


def eval_policy_file(args: Any, model: nn.Module, result: Mapping[str, Any], test_loader: Any,
                     info: Mapping[str, Any], name: str) -> Path:
    """``timm-l2w eval --q`` / ``--flops-budget``: write ``OUTPUT/<name>_policy.json``; class names from the
    checkpoint's metadata, else the data set's; preprocessing as the eval loader prepares images."""
    from timm_l2w_runtime.policy import read_policy

    from ..files import read_metadata

    saved = read_metadata(args.checkpoint).get("class_names") if args.checkpoint else None
    path = Path(args.output) / f"{name}_policy.json"
    predictor = policy_from_eval(model, result, path, q=args.q, flops_budget=args.flops_budget, rule=args.exit_rule,
                                 preprocess=preprocess_from_loader(test_loader, info["input_size"]),
                                 class_names=json.loads(saved) if saved else info.get("class_names"),
                                 latency_budget=getattr(args, "latency_budget", None),
                                 latency_table=result.get("latency_table"),
                                 latency_batch_size=getattr(args, "latency_batch_size", 1))
    shares = ", ".join(f"{100 * p:.0f}%" for p in predictor.calibration_fractions or [])
    expected = read_policy(path).get("expected_latency_ms")
    print(f"exit policy ({predictor.rule}, {predictor.budget}): held-out exits {shares}"
          + (f"; expected {expected:.4g} ms per image" if expected is not None else ""))
    return path


def policy_from_eval(model: nn.Module, result: Mapping[str, Any], path: Path | str, *, q: Optional[float] = None,
                     flops_budget: Optional[float] = None, rule: str = "confidence",
                     preprocess: Optional[Mapping[str, Any]] = None,
                     class_names: Optional[Iterable[str]] = None, latency_budget: Optional[float] = None,
                     latency_table: Optional[Mapping[str, Any]] = None,
                     latency_batch_size: int = 1) -> EarlyExitPredictor:
    """Calibrate on the held-out outputs of :func:`timm_l2w.evaluation.evaluate_checkpoint` (``result``) for the
    paper's exit distribution ``q``, an expected-FLOPs budget or a latency budget (ms per image at
    ``latency_batch_size`` by ``latency_table``: :meth:`EarlyExitPredictor.from_latency_budget`), and save the
    policy to ``path``.

    Returns the :class:`timm_l2w.EarlyExitPredictor`.
    """
    q, flops_budget = check_policy_request(q, flops_budget, rule, latency_budget)
    heldout, flops = result["heldout"], result["flops"]
    if q is not None:
        predictor = EarlyExitPredictor.from_distribution(model, heldout, q, rule=rule)
        predictor.record_flops(flops, heldout.input_size)
    elif latency_budget is not None:
        if latency_table is None:
            raise ValueError("a latency budget needs a latency table: measure one with "
                             "timm_l2w.inference.measure_latency_table (or pass --latency-budget to timm-l2w eval)")
        predictor = EarlyExitPredictor.from_latency_budget(model, heldout, latency_table, latency_budget,
                                                           batch_size=latency_batch_size, rule=rule, flops=flops)
    else:
        predictor = EarlyExitPredictor.from_flops_budget(model, heldout, flops, flops_budget, rule=rule)
    predictor.preprocess = dict(preprocess) if preprocess is not None else None
    predictor.class_names = list(class_names) if class_names is not None else None
    predictor.save(path)
    return predictor

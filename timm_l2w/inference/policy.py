"""The exit policy's PyTorch side: the policy ``timm-l2w eval --q`` / ``--flops-budget`` / ``--max-risk`` calibrates.

The file format itself (reading, writing, validation) lives in :mod:`timm_l2w_runtime.policy`, which
needs no PyTorch; how a model's images are prepared, in that format, is :mod:`timm_l2w.preprocessing`.
The predictor that saves and loads a policy is :class:`~timm_l2w.inference.EarlyExitPredictor`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from torch import nn

from ..evaluation.risk import RISKS, check_risk_request
from ..exits import ExitRule, exit_rule
from ..preprocessing import preprocess_from_loader
from ..validation import Range, check_number
from .predictor import EarlyExitPredictor

__all__ = ["check_policy_request", "eval_policy_file", "policy_from_eval", "policy_file_name", "requested_budget",
           "eval_policy_path", "BUDGET_LABELS"]


def _count(value: float) -> str:
    """``3000000`` -> ``3M``, ``2.5e9`` -> ``2.5G`` (as ``--flops-budget`` takes it back)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


# how each budget of a policy (its ``budget`` entry) reads in a file name: a new budget adds its key here
BUDGET_LABELS: Dict[str, Callable[[Any], str]] = {
    "q": lambda q: f"q{q:g}",
    "flops": lambda flops: f"flops{_count(flops)}",
    "risk": str,  # disagreement / top1-drop, followed by its max_risk and confidence
    "max_risk": lambda eps: f"{eps:g}",
    "confidence": lambda c: f"conf{c:g}",
    "latency_ms": lambda ms: f"latency{ms:g}ms",
    "batch_size": lambda b: f"batch{b}",
}


def policy_file_name(name: str, rule: str, budget: Mapping[str, Any]) -> str:
    """``<name>_<rule>_<budget>_policy.json``: ``msdnet_confidence_q0.5_policy.json``,
    ``msdnet_patience_flops3M_policy.json`` (one part per budget entry, :data:`BUDGET_LABELS`; a key without a
    label reads ``<key><value>``), so policies of other rules or budgets do not overwrite each other."""
    parts = [BUDGET_LABELS[key](value) if key in BUDGET_LABELS
             else f"{key}{value:g}" if isinstance(value, (int, float)) else key for key, value in budget.items()]
    return "_".join([name, rule, *parts, "policy.json"])


def requested_budget(args: Any) -> Dict[str, Any]:
    """The budget ``timm-l2w eval`` was asked for, as the policy records it (``{"q": 0.5}``, ``{"flops": 3e6}``,
    ``{"risk": "disagreement", "max_risk": 0.05, "confidence": 0.9}``, ``{"latency_ms": 2.5, "batch_size": 1}``)."""
    if getattr(args, "latency_budget", None) is not None:
        return {"latency_ms": args.latency_budget, "batch_size": args.latency_batch_size}
    if getattr(args, "max_risk", None) is not None:
        return {"risk": args.risk or RISKS[0], "max_risk": args.max_risk,
                "confidence": 0.9 if args.confidence is None else args.confidence}
    return {"q": args.q} if args.q is not None else {"flops": args.flops_budget}


def eval_policy_path(args: Any, name: str) -> Path:
    """Where ``timm-l2w eval`` writes its policy: ``OUTPUT/`` :func:`policy_file_name`; a file already there is a
    ``FileExistsError`` unless ``args.overwrite``."""
    path = Path(args.output) / policy_file_name(name, args.exit_rule, requested_budget(args))
    if path.exists() and not getattr(args, "overwrite", False):
        raise FileExistsError(f"{path} exists (the policy of an earlier eval): pass --overwrite to replace it, or "
                              "--output / --name for another file")
    return path


def check_policy_request(q: Optional[float], flops_budget: Optional[float], rule: str | ExitRule,
                         max_risk: Optional[float] = None, confidence: Optional[float] = None,
                         risk: Optional[str] = None, latency_budget: Optional[float] = None,
                         ) -> Tuple[Optional[float], Optional[float]]:
    """Check that exactly one budget is given, in range, and that it fits the exit rule; returns ``(q, flops_budget)``
    checked (``--max-risk`` and ``--latency-budget`` are checked here and used by :func:`policy_from_eval`)."""
    if max_risk is None and (confidence is not None or risk is not None):
        raise ValueError("--confidence and --risk go with --max-risk EPS: pass it, or drop them")
    budgets = {"--q": q, "--flops-budget": flops_budget, "--max-risk": max_risk,  # flag -> value; one is given
               "--latency-budget": latency_budget}
    if sum(value is not None for value in budgets.values()) != 1:
        raise ValueError("pass exactly one of --q (the paper's exit distribution p_k ∝ q**k), --flops-budget F "
                         "(FLOPs per image), --max-risk EPS (a risk guarantee) and --latency-budget MS (milliseconds "
                         "per image)")
    if latency_budget is not None:
        check_number(latency_budget, "latency_budget", Range(0, low_open=True, hint="milliseconds per image"))
    elif max_risk is not None:  # what is not given takes from_risk's defaults
        check_risk_request(max_risk, 0.9 if confidence is None else confidence, risk or RISKS[0])
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
    """``timm-l2w eval --q`` / ``--flops-budget``: write the policy to :func:`eval_policy_path`; class names from
    the checkpoint's metadata, else the data set's; preprocessing as the eval loader prepares images; the digest
    of the model's weights (the checkpoint's, loaded)."""
    from ..files import read_metadata

    saved = read_metadata(args.checkpoint).get("class_names") if args.checkpoint else None
    path = eval_policy_path(args, name)
    risk = {k: getattr(args, k) for k in ("max_risk", "confidence", "risk") if getattr(args, k, None) is not None}
    predictor = policy_from_eval(model, result, path, q=args.q, flops_budget=args.flops_budget, rule=args.exit_rule,
                                 **risk, preprocess=preprocess_from_loader(test_loader, info["input_size"]),
                                 class_names=json.loads(saved) if saved else info.get("class_names"),
                                 latency_budget=getattr(args, "latency_budget", None),
                                 latency_table=result.get("latency_table"),
                                 latency_batch_size=getattr(args, "latency_batch_size", 1))
    shares = ", ".join(f"{100 * p:.0f}%" for p in predictor.calibration_fractions or [])
    expected = predictor.expected_latency_ms
    print(f"exit policy ({predictor.rule}, {predictor.budget}): held-out exits {shares}"
          + (f"; expected {expected:.4g} ms per image" if expected is not None else ""))
    if "max_risk" in risk:
        b = predictor.budget
        print(f"risk guarantee: {b['risk']} <= {b['max_risk']:g} with probability >= {b['confidence']:g} "
              f"(upper bound {b['risk_upper_bound']:.4g}, held-out {b['heldout_risk']:.4g} on {b['n']} images)")
    return path


def policy_from_eval(model: nn.Module, result: Mapping[str, Any], path: Path | str, *, q: Optional[float] = None,
                     flops_budget: Optional[float] = None, rule: str = "confidence", max_risk: Optional[float] = None,
                     confidence: float = 0.9, risk: str = "disagreement",
                     preprocess: Optional[Mapping[str, Any]] = None,
                     class_names: Optional[Iterable[str]] = None, latency_budget: Optional[float] = None,
                     latency_table: Optional[Mapping[str, Any]] = None,
                     latency_batch_size: int = 1) -> EarlyExitPredictor:
    """Calibrate on the held-out outputs of :func:`timm_l2w.evaluation.evaluate_checkpoint` (``result``) for the
    paper's exit distribution ``q``, an expected-FLOPs budget, a risk guarantee (``max_risk``, ``confidence``,
    ``risk``: :meth:`~timm_l2w.EarlyExitPredictor.from_risk`) or a latency budget (ms per image at
    ``latency_batch_size`` by ``latency_table``: :meth:`EarlyExitPredictor.from_latency_budget`), and save the
    policy to ``path``.

    Returns the :class:`timm_l2w.EarlyExitPredictor`.
    """
    q, flops_budget = check_policy_request(q, flops_budget, rule, max_risk,  # from_risk checks confidence and risk
                                           latency_budget=latency_budget)
    heldout, flops = result["heldout"], result["flops"]
    if max_risk is not None:
        predictor = EarlyExitPredictor.from_risk(model, heldout, flops, max_risk, confidence, risk, rule=rule)
    elif q is not None:
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

"""Anytime and budgeted evaluation of a multi-exit model (docs/method.md §6), computed on exit outputs.

Anytime metrics (:func:`anytime_metrics`) and the budgeted accuracy-vs-FLOPs curve
(:func:`budgeted_evaluation`) are pure tensor computations on :class:`~timm_l2w.ExitOutputs`. The
exit rule (:mod:`timm_l2w.exits.rules`) calibrates its thresholds on a held-out set and assigns the
test samples to exits, the same code the L2W meta loss and the predictor build on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..exits import ExitRule, check_distributions, exit_rule, paper_distributions, paper_qs
from .outputs import ExitOutputs

__all__ = ["BudgetedResults", "anytime_metrics", "budgeted_evaluation", "check_flops", "check_flops_input_size"]


def check_flops(flops: Sequence[float] | Tensor, num_exits: int) -> Tensor:
    """Return per-exit cumulative FLOPs as float64 ``[K]`` after checking length and order."""
    f = torch.as_tensor(flops, dtype=torch.float64).detach().cpu()
    if f.ndim != 1 or f.numel() != num_exits:
        raise ValueError(
            f"flops must have one cumulative value per exit ({num_exits}), got shape {tuple(f.shape)}: "
            "use timm_l2w.exit_flops(model, input_size)"
        )
    if not torch.isfinite(f).all() or (f <= 0).any() or (f[1:] <= f[:-1]).any():
        raise ValueError(
            f"flops must be positive and strictly increasing (cumulative to each exit), got {f.tolist()}"
        )
    return f


def check_flops_input_size(flops: Any, *outputs: ExitOutputs) -> None:
    """Raise a ``ValueError`` when ``flops`` (from :func:`timm_l2w.exit_flops`) were counted at another
    image size than the ``outputs`` were collected at (plain lists carry no size and are not checked)."""
    counted = getattr(flops, "input_size", None)
    for out in outputs:
        seen = out.input_size
        if counted is not None and seen is not None and tuple(counted) != tuple(seen):
            ratio = (counted[-1] * counted[-2]) / (seen[-1] * seen[-2])
            raise ValueError(
                f"the FLOPs were counted for {'x'.join(map(str, counted))} images but the outputs come from "
                f"{'x'.join(map(str, seen))} images (the FLOPs axis would be off by about {ratio:.3g}x): use "
                f"timm_l2w.exit_flops(model, input_size={tuple(seen)})")


def anytime_metrics(outputs: ExitOutputs, flops: Sequence[float] | Tensor | None = None) -> List[Dict[str, float]]:
    """One row per exit: ``exit`` (1-based), ``top1`` and ``top5`` (%), mean ``loss`` and ``flops``."""
    check_flops_input_size(flops, outputs)
    top1 = outputs.correct.double().mean(0) * 100
    top5 = outputs.top5.double().mean(0) * 100
    loss = outputs.losses.double().mean(0)
    f = check_flops(flops, outputs.num_exits) if flops is not None else None
    rows = []
    for k in range(outputs.num_exits):
        row = {"exit": k + 1, "top1": float(top1[k]), "top5": float(top5[k]), "loss": float(loss[k])}
        if f is not None:
            row["flops"] = float(f[k])
        rows.append(row)
    return rows


@dataclass
class BudgetedResults:
    """Budgeted evaluation, one entry per budget b (exit distribution) and exit k.

    Accuracies in %, FLOPs in the unit of the ``flops`` given. ``q`` is NaN for user distributions.
    ``rule`` is the exit rule: ``thresholds`` are max-softmax thresholds (``'confidence'``, exit when
    ``c >= T_k``) or entropy thresholds (``'entropy'``, exit when ``H <= T_k``). For ``'patience'``
    every budget is one patience value (``patience`` [B]); ``thresholds`` are NaN, ``q`` is NaN and
    ``distributions`` are the exit fractions the patience gives on the held-out set.
    """

    q: Tensor  # [B]
    distributions: Tensor  # [B, K]
    thresholds: Tensor  # [B, K]
    test_top1: Tensor  # [B]
    expected_flops: Tensor  # [B], on the test set
    test_exit_fractions: Tensor  # [B, K]
    heldout_top1: Tensor  # [B]
    heldout_expected_flops: Tensor  # [B]
    heldout_exit_fractions: Tensor  # [B, K]
    rule: str = "confidence"
    patience: Optional[Tensor] = None  # [B] long, rule 'patience' only

    def __len__(self) -> int:
        return self.q.shape[0]

    def rows(self) -> List[Dict[str, Any]]:
        """The results as a tidy table: one flat dict per budget (lists spread over ``_k`` columns)."""
        rows = []
        for b in range(len(self)):
            q = float(self.q[b])
            row: Dict[str, Any] = {
                "budget": b + 1,
                "rule": self.rule,
                "q": None if math.isnan(q) else q,
                "test_top1": float(self.test_top1[b]),
                "expected_flops": float(self.expected_flops[b]),
                "heldout_top1": float(self.heldout_top1[b]),
                "heldout_expected_flops": float(self.heldout_expected_flops[b]),
            }
            if self.patience is not None:
                row["patience"] = int(self.patience[b])
            for name, table in (
                ("p", self.distributions),
                ("threshold", self.thresholds),
                ("test_fraction", self.test_exit_fractions),
                ("heldout_fraction", self.heldout_exit_fractions),
            ):
                row.update({f"{name}_{k + 1}": float(v) for k, v in enumerate(table[b])})
            rows.append(row)
        return rows


def _apply(outputs: ExitOutputs, exits: Tensor, flops: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-1 (%), expected FLOPs and exit fractions of every budget row of ``exits`` ``[B, N]``."""
    correct = outputs.correct.T.contiguous().gather(0, exits)  # [B, N]: correctness at each sample's exit
    num_budgets, num_exits = exits.shape[0], outputs.num_exits
    offsets = torch.arange(num_budgets, device=exits.device)[:, None] * num_exits
    counts = torch.bincount((exits + offsets).flatten(), minlength=num_budgets * num_exits)
    fractions = counts.view(num_budgets, num_exits).double() / exits.shape[1]  # [B, K]
    return correct.double().mean(dim=1) * 100, fractions @ flops, fractions


def budgeted_evaluation(
    heldout: ExitOutputs,
    test: ExitOutputs,
    flops: Sequence[float] | Tensor,
    distributions: Tensor | Sequence[Sequence[float]] | None = None,
    rule: str | ExitRule = "confidence",
    patience: Sequence[int] | Tensor | None = None,
) -> BudgetedResults:
    """The paper's budgeted (dynamic) evaluation for every distribution at once, vectorised.

    Thresholds are calibrated on ``heldout`` for each exit distribution (default: the paper's 39,
    q = j/20) and applied on ``test``; expected FLOPs are ``sum_k fraction_k * flops_k``. ``flops``
    from ``timm_l2w.exit_flops(model, test.input_size)``: FLOPs counted at another image size are refused.

    ``rule`` (a name of :data:`timm_l2w.exits.EXIT_RULES` or an :class:`~timm_l2w.exits.ExitRule`):
    ``'confidence'`` (max softmax, the paper's), ``'entropy'`` (thresholds on the predictive entropy,
    calibrated the same way) or ``'patience'`` (no calibration: one budget per patience value, default
    ``1..K``; ``distributions`` not allowed).
    """
    rule = exit_rule(rule)
    for name, value in (("heldout", heldout), ("test", test)):
        if not isinstance(value, ExitOutputs):
            raise TypeError(f"{name} must be ExitOutputs (from collect_exit_outputs), got {type(value).__name__}")
    if heldout.num_exits != test.num_exits:
        raise ValueError(
            f"held-out outputs have {heldout.num_exits} exits but test outputs have {test.num_exits}: "
            "collect both with the same model"
        )
    num_exits = test.num_exits
    check_flops_input_size(flops, heldout, test)
    f = check_flops(flops, num_exits)
    if not rule.calibrated:
        if distributions is not None:
            raise ValueError(f"the {rule.name!r} exit rule has no thresholds to calibrate for exit distributions: "
                             "pass patience=[...] (budgets are patience values) instead of distributions")
        ps = torch.arange(1, num_exits + 1) if patience is None else torch.as_tensor(patience).reshape(-1)
        test_top1, test_flops, test_frac = _apply(test, rule.exits(test.signal(rule, "test"), ps), f)
        held_top1, held_flops, held_frac = _apply(heldout, rule.exits(heldout.signal(rule, "held-out"), ps), f)
        nan = torch.full((len(ps),), math.nan, dtype=torch.float64)
        return BudgetedResults(nan, held_frac, torch.full((len(ps), num_exits), math.nan, dtype=torch.float64),
                               test_top1, test_flops, test_frac, held_top1, held_flops, held_frac,
                               rule=rule.name, patience=ps.long())
    if patience is not None:
        raise ValueError(f"patience= is for the 'patience' exit rule, not {rule.name!r}")
    if distributions is None:
        dist = paper_distributions(num_exits)
        q = torch.tensor(paper_qs(dist.shape[0]), dtype=torch.float64)
    else:
        dist = check_distributions(distributions, num_exits)
        q = torch.full((dist.shape[0],), math.nan, dtype=torch.float64)
    thresholds = rule.calibrate(heldout.signal(rule, "held-out"), dist)
    test_top1, test_flops, test_frac = _apply(test, rule.exits(test.signal(rule, "test"), thresholds), f)
    held_top1, held_flops, held_frac = _apply(heldout, rule.exits(heldout.signal(rule, "held-out"), thresholds), f)
    return BudgetedResults(q, dist, thresholds, test_top1, test_flops, test_frac, held_top1, held_flops, held_frac,
                           rule=rule.name)

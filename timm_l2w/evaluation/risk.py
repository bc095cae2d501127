"""Risk-controlled exit policies: the cheapest candidate whose risk is at most ``max_risk`` with probability at
least ``confidence`` over the draw of the calibration data (Learn then Test; the method is docs/risk.md).

Both risks compare a policy's early exit with the model's last exit, sample by sample:

* ``'disagreement'``: loss ``1[early prediction != last exit's prediction]`` (needs no labels), bounded with the
  exact binomial (Clopper-Pearson) bound;
* ``'top1-drop'``: loss ``1[early wrong] - 1[last wrong]`` in ``{-1, 0, 1}``, bounded by the exact upper bound on
  the share it is 1 minus the exact lower bound on the share it is -1, each at ``delta / 2``.

The candidates are tested from the most expensive to the cheapest (fixed-sequence testing), each at level
``delta = 1 - confidence`` (a candidate passes when its upper bound is within ``max_risk``); the choice is the
last candidate before the first one that fails. The compute functions are pure and vectorised over any leading
dimensions (the coverage tests run thousands of calibration draws at once); :func:`risk_controlled_choice`
applies them to held-out :class:`~timm_l2w.ExitOutputs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..exits import ExitRule, exit_rule
from ..validation import Range, check_choice, check_number
from .metrics import budgeted_evaluation
from .outputs import ExitOutputs

__all__ = [
    "RISKS", "RiskChoice", "check_risk_request", "risk_losses", "clopper_pearson_upper", "clopper_pearson_lower",
    "top1_drop_upper", "risk_upper_bounds", "fixed_sequence_choice", "risk_controlled_choice",
]

RISKS = ("disagreement", "top1-drop")


def check_risk_request(max_risk: Any, confidence: Any, risk: str) -> Tuple[float, float, str]:
    """``(max_risk, confidence, risk)`` checked: both numbers in (0, 1), the risk one of :data:`RISKS`."""
    max_risk = check_number(max_risk, "max_risk", Range(0, 1, low_open=True, high_open=True,
                                                        hint="a fraction of the images: 0.05 is 5%"))
    confidence = check_number(confidence, "confidence", Range(0, 1, low_open=True, high_open=True,
                                                              hint="1 - delta, e.g. 0.9"))
    return max_risk, confidence, check_choice(risk, RISKS, "risk")


def risk_losses(outputs: ExitOutputs, exits: Tensor, risk: str = "disagreement") -> Tensor:
    """Per-sample loss ``[N]`` (``exits`` ``[N]``) or ``[B, N]`` (``exits`` ``[B, N]``), float64, of leaving at
    ``exits`` instead of the last exit: disagreement in {0, 1}, top-1 drop in {-1, 0, 1}."""
    check_choice(risk, RISKS, "risk")
    batched = exits.ndim == 2
    rows = exits if batched else exits[None]
    if risk == "disagreement":
        early = outputs.predictions.T.contiguous().gather(0, rows)  # [B, N]
        loss = (early != outputs.predictions[:, -1]).double()
    else:
        wrong = (~outputs.correct).T.contiguous()
        loss = wrong.gather(0, rows).double() - wrong[-1].double()
    return loss if batched else loss[0]


def _np(value: Any) -> np.ndarray:
    return np.asarray(value.detach().cpu().numpy() if isinstance(value, Tensor) else value, dtype=np.float64)


def clopper_pearson_upper(failures: Any, n: Any, delta: Any) -> Tensor:
    """The one-sided exact (Clopper-Pearson) upper bound on a rate from ``failures`` of ``n``: the ``u`` with
    ``P(Binomial(n, u) <= failures) = delta`` (1 when all failed); any shapes that broadcast, float64."""
    from scipy.special import betaincinv

    k, n = np.broadcast_arrays(np.floor(_np(failures) + 1e-9), _np(n))
    all_failed = k >= n
    upper = betaincinv(k + 1, np.where(all_failed, 1.0, n - k), 1 - _np(delta))
    return torch.from_numpy(np.asarray(np.where(all_failed, 1.0, upper), np.float64))


def clopper_pearson_lower(successes: Any, n: Any, delta: Any) -> Tensor:
    """The one-sided exact lower bound on a rate from ``successes`` of ``n`` (0 when there are none)."""
    return 1 - clopper_pearson_upper(_np(n) - _np(successes), n, delta)


def top1_drop_upper(worse: Any, better: Any, n: Any, delta: Any) -> Tensor:
    """Upper bound on the top-1 drop ``P(worse) - P(better)`` from the counts of images the early exit gets wrong
    and the last exit right (``worse``) and the other way round (``better``): the exact upper bound on the first
    rate minus the exact lower bound on the second, each at ``delta / 2``."""
    return clopper_pearson_upper(worse, n, _np(delta) / 2) - clopper_pearson_lower(better, n, _np(delta) / 2)


def risk_upper_bounds(risk: str, losses: Tensor, delta: float) -> Tensor:
    """Upper confidence bounds (level ``1 - delta``) on the risk from the per-sample losses ``[..., N]`` of
    :func:`risk_losses`: Clopper-Pearson for the disagreement, :func:`top1_drop_upper` for the top-1 drop."""
    n = losses.shape[-1]
    if check_choice(risk, RISKS, "risk") == "disagreement":
        return clopper_pearson_upper(losses.sum(dim=-1), n, delta)
    return top1_drop_upper((losses > 0).sum(dim=-1), (losses < 0).sum(dim=-1), n, delta)


def fixed_sequence_choice(passed: Tensor) -> Tensor:
    """Fixed-sequence testing along the last dimension (the candidates in their fixed order; ``passed``: bool, the
    bound within the budget): the index of the last candidate before the first failure, ``-1`` when the first
    one fails. Long."""
    return torch.as_tensor(passed).bool().long().cumprod(dim=-1).sum(dim=-1) - 1


def _round_up(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits (a limit that passes, said briefly)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(abs(value)))) if value else 1.0
    return math.ceil(value * scale) / scale


@dataclass
class RiskChoice:
    """The candidates of a risk-controlled choice, in test order (most expensive first), and the one chosen.

    ``thresholds`` [B, K] (NaN for the patience rule), ``patience`` [B] (patience rule only), ``q`` [B] (NaN
    when not the paper's distributions); ``exit_fractions`` [B, K] and ``expected_flops`` [B] on the whole
    calibration set; ``empirical_risk`` and ``upper_bound`` [B] on the ``num_bound`` samples the bound used (the
    others, ``num_fit``, calibrated the thresholds); ``chosen`` indexes the candidates.
    """

    risk: str
    max_risk: float
    confidence: float
    rule: str
    thresholds: Tensor
    patience: Optional[Tensor]
    q: Tensor
    exit_fractions: Tensor
    expected_flops: Tensor
    empirical_risk: Tensor
    upper_bound: Tensor
    num_bound: int
    num_fit: int
    chosen: int

    def budget(self) -> Dict[str, Any]:
        """The policy file's ``budget``: the risk, its limit, the confidence and what the chosen policy showed."""
        j = self.chosen
        return {"risk": self.risk, "max_risk": self.max_risk, "confidence": self.confidence,
                "risk_upper_bound": float(self.upper_bound[j]), "heldout_risk": float(self.empirical_risk[j]),
                "n": self.num_bound}


def risk_controlled_choice(
    calibration: ExitOutputs,
    flops: Sequence[float] | Tensor,
    max_risk: float,
    confidence: float = 0.9,
    risk: str = "disagreement",
    rule: str | ExitRule = "confidence",
    fit_fraction: float = 0.5,
    seed: int = 0,
) -> RiskChoice:
    """The cheapest candidate policy whose risk is at most ``max_risk`` with probability ``>= confidence``.

    Candidates: the paper's 39 exit distributions (thresholds calibrated as :func:`budgeted_evaluation` does)
    or, for the patience rule, ``p = K .. 1``. A calibrated rule's thresholds are fitted on a random
    ``fit_fraction`` of ``calibration`` (``seed``) and the risk is bounded on the rest, so the candidates and
    their order (expected FLOPs on the fitted part, most expensive first) are fixed before the bound sees its
    samples; the patience candidates need no fitting and use every sample. A ``ValueError`` when even the first
    candidate fails.
    """
    max_risk, confidence, risk = check_risk_request(max_risk, confidence, risk)
    rule = exit_rule(rule)
    n_all = calibration.num_samples
    if rule.calibrated:
        fit_fraction = check_number(fit_fraction, "fit_fraction", Range(0, 1, low_open=True, high_open=True))
        if n_all < 2:
            raise ValueError(f"{n_all} held-out sample: a risk bound needs at least 2 (some fit the thresholds, "
                             "the rest bound the risk); pass more held-out images")
        rows = torch.randperm(n_all, generator=torch.Generator().manual_seed(int(seed)))
        n_fit = min(max(int(round(n_all * fit_fraction)), 1), n_all - 1)
        fit, bound = calibration.subset(rows[:n_fit]), calibration.subset(rows[n_fit:])
        # thresholds fitted on `fit`, applied to every calibration sample (`test_*`: the exit shares of the policy)
        res = budgeted_evaluation(fit, calibration, flops, rule=rule)
        order = torch.sort(res.heldout_expected_flops, descending=True, stable=True).indices  # on `fit` only
        params = res.thresholds[order]
    else:
        n_fit, bound = 0, calibration
        res = budgeted_evaluation(calibration, calibration, flops, rule=rule)
        order = torch.sort(res.patience, descending=True, stable=True).indices  # larger patience, later exits
        params = res.patience[order]
    n = bound.num_samples
    losses = risk_losses(bound, rule.exits(bound.signal(rule, "held-out"), params), risk)  # [B, n]
    upper, empirical = risk_upper_bounds(risk, losses, 1 - confidence), losses.mean(dim=1)
    chosen = int(fixed_sequence_choice(upper <= max_risk))
    if chosen < 0:
        raise ValueError(
            f"no exit policy keeps the {risk} risk within {max_risk:g} at confidence {confidence:g}: the most "
            f"conservative candidate's upper bound is {float(upper[0]):.4g} (held-out {float(empirical[0]):.4g} on "
            f"{n} images); raise --max-risk / max_risk to at least {_round_up(float(upper[0])):g}, lower the "
            "confidence, or calibrate on more held-out images")
    return RiskChoice(risk, max_risk, confidence, rule.name, res.thresholds[order],
                      None if res.patience is None else res.patience[order], res.q[order],
                      res.test_exit_fractions[order], res.expected_flops[order], empirical, upper, n, n_fit, chosen)

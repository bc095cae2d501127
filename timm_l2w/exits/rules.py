"""The exit rules: when a sample leaves a multi-exit model, as objects with one small interface.

Every rule is an :class:`ExitRule` registered by name in :data:`RULES` (:data:`EXIT_RULES` are the
names, :func:`exit_rule` looks one up). Evaluation, :class:`timm_l2w.EarlyExitPredictor` and the exit
policy file speak only this interface; :mod:`timm_l2w_runtime.rules` is the numpy twin the exported
runtime uses (same names, same decisions).

* ``'confidence'``: leave at exit k when the max softmax reaches ``thresholds[k]`` (the paper's).
* ``'entropy'``: leave when the predictive entropy is at most ``thresholds[k]``; calibrated like
  confidence with the negative entropy as the score.
* ``'patience'``: leave when the argmax prediction has been the same at ``patience`` consecutive
  exits; no thresholds, the budget is the patience.

The interface (``signal`` is the ``[N, K]`` table a rule reads, the :class:`timm_l2w.ExitOutputs`
field named by :attr:`ExitRule.signal`; ``params`` are the thresholds ``[K]`` / ``[B, K]`` or the
patience):

* :attr:`~ExitRule.name`: its name in the registry, the ``--exit-rule`` flag and the policy file;
  :attr:`~ExitRule.parameter`: ``'thresholds'`` (calibrated for exit distributions) or ``'patience'``.
* :meth:`~ExitRule.score`: its signal for one exit's logits (how :class:`timm_l2w.ExitOutputs` fills
  the table of a rule whose signal is none of its fields).
* :meth:`~ExitRule.calibrate`: thresholds ``[B, K]`` on held-out signals for a batch of distributions.
* :meth:`~ExitRule.exits`: the exit of every sample (``[N]``, or ``[B, N]`` for a batch of params).
* :meth:`~ExitRule.check_params`: the predictor's parameters, checked.
* :meth:`~ExitRule.leave` / :meth:`~ExitRule.keep`: the streaming decision at exit k, stage by stage,
  with the rule's memory of the earlier exits cut down to the samples still running.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributions import calibrate_thresholds_batch, check_scores, exit_by_threshold

__all__ = [
    "ExitRule", "ConfidenceRule", "EntropyRule", "PatienceRule", "RULES", "EXIT_RULES", "exit_rule",
    "exit_confidence", "predictive_entropy", "calibrate_entropy_thresholds_batch",
    "exit_by_entropy", "agreement_run_lengths", "check_patience", "exit_by_patience",
]


# ----------------------------------------------------------------------------- the rules' functions


def exit_confidence(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Max softmax probability (float32) and predicted class of one exit's ``[B, C]`` logits."""
    return F.softmax(logits.detach().float(), dim=1).max(dim=1)


def predictive_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats, float32) of the softmax of ``[..., C]`` logits, over the last dimension."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    return (-(logp.exp() * logp).sum(dim=-1)).clamp_(min=0)


def calibrate_entropy_thresholds_batch(entropies: Tensor, distributions: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """Entropy thresholds ``[B, K]`` for the exit distributions (exit k takes samples with ``H <= T_k``).

    :func:`~timm_l2w.exits.calibrate_thresholds_batch` on the score ``-H``: the ``floor(n * p_k)``
    not-yet-exited held-out samples with the lowest entropy at exit k leave there. ``-inf``: nobody
    leaves; ``T_K = +inf``.
    """
    check_scores(entropies, "held-out entropies")
    return -calibrate_thresholds_batch(-entropies, distributions)


def exit_by_entropy(entropies: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """Exit of every sample: the first k with ``entropies[i, k] <= T_k``
    (``[K]`` -> ``[N]``, ``[B, K]`` -> ``[B, N]``)."""
    check_scores(entropies, "entropies")
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    return exit_by_threshold(-entropies, -thresholds)


def agreement_run_lengths(predictions: Tensor) -> Tensor:
    """``[N, K]`` long: how many consecutive exits up to and including k predict what exit k predicts."""
    if not isinstance(predictions, Tensor) or predictions.ndim != 2 or predictions.shape[0] == 0:
        shape = tuple(predictions.shape) if isinstance(predictions, Tensor) else type(predictions).__name__
        raise ValueError(f"predictions must be a non-empty [num_samples, num_exits] tensor, got {shape}")
    runs = torch.ones(predictions.shape, dtype=torch.long, device=predictions.device)
    for k in range(1, predictions.shape[1]):
        runs[:, k] += (predictions[:, k] == predictions[:, k - 1]) * runs[:, k - 1]
    return runs


def check_patience(patience: int | Sequence[int] | Tensor) -> Tensor:
    """``patience`` as a long tensor (0-d or ``[B]``) after checking every value is an integer >= 1."""
    p = torch.as_tensor(patience)
    if p.is_floating_point() or p.dtype == torch.bool or p.ndim > 1 or p.numel() == 0 or (p < 1).any():
        raise ValueError(f"patience must be an integer >= 1 (or a list of them), got {patience!r}")
    return p.long()


def exit_by_patience(predictions: Tensor, patience: int | Sequence[int] | Tensor) -> Tensor:
    """Exit of every sample: the first k where the argmax has been the same at ``patience`` consecutive
    exits (``patience=1``: the first exit); the last exit takes the rest.

    ``predictions`` is ``[N, K]`` (argmax per exit). An int ``patience`` returns ``[N]`` long, a list
    of ``B`` values ``[B, N]``.
    """
    p = check_patience(patience)
    runs = agreement_run_lengths(predictions).T  # [K, N]
    num_exits = runs.shape[0]
    ps = p.reshape(-1).to(runs.device)
    running = torch.ones(ps.shape[0], runs.shape[1], dtype=torch.bool, device=runs.device)
    exits = torch.zeros(running.shape, dtype=torch.long, device=runs.device)
    for k in range(num_exits - 1):
        running &= runs[k][None] < ps[:, None]
        exits += running
    return exits[0] if p.ndim == 0 else exits


# ----------------------------------------------------------------------------- the rules as objects


class ExitRule:
    """One exit rule (see the module docstring for the interface)."""

    name: ClassVar[str]
    signal: ClassVar[str]  # the ExitOutputs field it reads: 'confidences', 'entropies' or 'predictions'
    parameter: ClassVar[str] = "thresholds"  # what the predictor and the policy file carry: 'thresholds' | 'patience'

    @property
    def calibrated(self) -> bool:
        """Whether its thresholds are calibrated for exit distributions (else its parameter is the budget)."""
        return self.parameter == "thresholds"

    def score(self, logits: Tensor) -> Tensor:
        """Its signal for one exit: ``[B]`` from that exit's ``[B, C]`` logits (a column of the ``[N, K]`` table)."""
        raise NotImplementedError

    def calibrate(self, signal: Tensor, distributions: Tensor | Sequence[Sequence[float]]) -> Tensor:
        """Thresholds ``[B, K]`` calibrated on the held-out ``signal`` ``[N, K]`` for every distribution."""
        raise ValueError(f"the {self.name!r} exit rule has no thresholds to calibrate")

    def exits(self, signal: Tensor, params: Any) -> Tensor:
        """The exit of every sample of ``signal`` ``[N, K]``: ``[N]`` for one set of params, ``[B, N]`` for ``B``."""
        raise NotImplementedError

    def check_params(self, thresholds: Any, patience: Any, num_exits: int) -> Tuple[Optional[Tensor], Optional[int]]:
        """The predictor's ``(thresholds [K] float64, None)`` or ``(None, patience)``, checked."""
        if patience is not None:
            raise ValueError(f"patience= is for rule='patience', not {self.name!r}")
        if thresholds is None:
            raise ValueError(f"rule={self.name!r} needs one threshold per exit: "
                             "use EarlyExitPredictor.from_distribution")
        t = torch.as_tensor(thresholds, dtype=torch.float64).detach().cpu()
        if t.ndim != 1 or t.numel() != num_exits:
            raise ValueError(
                f"need one threshold per exit ({num_exits}), got shape {tuple(t.shape)}: "
                "use timm_l2w.exits.calibrate_thresholds or EarlyExitPredictor.from_distribution"
            )
        if torch.isnan(t).any():
            raise ValueError(f"thresholds contain NaN: {t.tolist()}")
        return t, None

    def leave(self, k: int, logits: Tensor, conf: Tensor, pred: Tensor, params: Any,
              memory: Any = None) -> Tuple[Tensor, Any]:
        """Which running samples leave at exit ``k`` (``[B]`` bool) and the rule's memory for the next exit.

        ``logits`` ``[B, C]``, ``conf`` / ``pred`` their max softmax and argmax (:func:`exit_confidence`);
        ``params`` the thresholds as a list, or the patience; ``memory`` what this returned at ``k - 1``.
        """
        raise NotImplementedError

    def keep(self, memory: Any, rows: Tensor) -> Any:
        """The memory of the samples ``rows`` (a bool mask or indices) that keep running."""
        return memory

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ConfidenceRule(ExitRule):
    """Leave at exit k when the max softmax is ``>= thresholds[k]`` (the paper's rule)."""

    name = "confidence"
    signal = "confidences"

    def score(self, logits: Tensor) -> Tensor:
        return exit_confidence(logits)[0]

    def calibrate(self, signal: Tensor, distributions: Tensor | Sequence[Sequence[float]]) -> Tensor:
        return calibrate_thresholds_batch(signal, distributions)

    def exits(self, signal: Tensor, params: Any) -> Tensor:
        return exit_by_threshold(signal, params)

    def leave(self, k: int, logits: Tensor, conf: Tensor, pred: Tensor, params: Any,
              memory: Any = None) -> Tuple[Tensor, Any]:
        return conf.double() >= params[k], None


class EntropyRule(ExitRule):
    """Leave at exit k when the predictive entropy is ``<= thresholds[k]`` (``-inf``: nobody leaves)."""

    name = "entropy"
    signal = "entropies"

    def score(self, logits: Tensor) -> Tensor:
        return predictive_entropy(logits)

    def calibrate(self, signal: Tensor, distributions: Tensor | Sequence[Sequence[float]]) -> Tensor:
        return calibrate_entropy_thresholds_batch(signal, distributions)

    def exits(self, signal: Tensor, params: Any) -> Tensor:
        return exit_by_entropy(signal, params)

    def leave(self, k: int, logits: Tensor, conf: Tensor, pred: Tensor, params: Any,
              memory: Any = None) -> Tuple[Tensor, Any]:
        return predictive_entropy(logits).double() <= params[k], None


class PatienceRule(ExitRule):
    """Leave once ``patience`` consecutive exits predict the same class; its memory is each running
    sample's previous prediction and agreement run length."""

    name = "patience"
    signal = "predictions"
    parameter = "patience"

    def score(self, logits: Tensor) -> Tensor:
        return exit_confidence(logits)[1]

    def exits(self, signal: Tensor, params: Any) -> Tensor:
        return exit_by_patience(signal, params)

    def check_params(self, thresholds: Any, patience: Any, num_exits: int) -> Tuple[Optional[Tensor], Optional[int]]:
        if patience is None or thresholds is not None:
            raise ValueError("rule='patience' takes patience=p (consecutive agreeing exits) and no thresholds")
        p = check_patience(patience)
        if p.ndim != 0:
            raise ValueError(f"patience must be one integer >= 1, got {patience!r}")
        return None, int(p)

    def leave(self, k: int, logits: Tensor, conf: Tensor, pred: Tensor, params: Any,
              memory: Any = None) -> Tuple[Tensor, Any]:
        previous, run = memory if memory is not None else (None, None)
        run = torch.ones_like(pred) if previous is None else 1 + (pred == previous) * run
        return run >= params, (pred, run)

    def keep(self, memory: Any, rows: Tensor) -> Any:
        return None if memory is None else (memory[0][rows], memory[1][rows])


RULES: Dict[str, ExitRule] = {rule.name: rule for rule in (ConfidenceRule(), EntropyRule(), PatienceRule())}
EXIT_RULES = tuple(RULES)


def exit_rule(rule: str | ExitRule) -> ExitRule:
    """The registered rule of that name (an :class:`ExitRule` is returned as it is)."""
    if isinstance(rule, ExitRule):
        return rule
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"unknown exit rule {rule!r}: use one of {', '.join(map(repr, EXIT_RULES))}")
    return RULES[rule]

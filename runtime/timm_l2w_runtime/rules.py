"""The exit rules in numpy: the twin of :mod:`timm_l2w.exits.rules` for the exported runtime.

Same names, same registry, same decisions as the PyTorch rules (``tests/deploy/test_deploy.py`` checks them
side by side); only what the runtime needs: the streaming decision at exit k (:meth:`ExitRule.leave`,
with the rule's memory of the earlier exits cut down by :meth:`ExitRule.keep`) and the parameter the
policy file carries for the rule (:attr:`ExitRule.parameter`). Uses numpy only.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Tuple

import numpy as np

__all__ = [
    "ExitRule", "ConfidenceRule", "EntropyRule", "PatienceRule", "RULES", "EXIT_RULES", "exit_rule",
    "exit_confidence", "predictive_entropy",
]


def exit_confidence(logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Max softmax probability (float32) and predicted class of ``[B, C]`` logits."""
    z = logits.astype(np.float32, copy=False)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return p.max(axis=1), p.argmax(axis=1).astype(np.int64, copy=False)


def predictive_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats, float32) of the softmax of ``[B, C]`` logits."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.maximum(-(np.exp(logp) * logp).sum(axis=1), 0).astype(np.float32)


class ExitRule:
    """One exit rule: its policy-file name, its parameter, and the decision at exit k."""

    name: ClassVar[str]
    parameter: ClassVar[str] = "thresholds"  # what the policy file carries: 'thresholds' (one per exit) | 'patience'

    def leave(self, k: int, logits: np.ndarray, conf: np.ndarray, pred: np.ndarray, params: Any,
              memory: Any = None) -> Tuple[np.ndarray, Any]:
        """Which running samples leave at exit ``k`` (``[B]`` bool) and the memory for the next exit.

        ``conf`` / ``pred``: the max softmax and argmax of ``logits`` (:func:`exit_confidence`); ``params``:
        the policy's thresholds or patience; ``memory``: what this returned at exit ``k - 1``.
        """
        raise NotImplementedError

    def keep(self, memory: Any, rows: np.ndarray) -> Any:
        """The memory of the samples ``rows`` (indices) that keep running."""
        return memory

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ConfidenceRule(ExitRule):
    """Leave at exit k when the max softmax is ``>= thresholds[k]``."""

    name = "confidence"

    def leave(self, k: int, logits: np.ndarray, conf: np.ndarray, pred: np.ndarray, params: Any,
              memory: Any = None) -> Tuple[np.ndarray, Any]:
        return conf.astype(np.float64) >= params[k], None


class EntropyRule(ExitRule):
    """Leave at exit k when the predictive entropy is ``<= thresholds[k]``."""

    name = "entropy"

    def leave(self, k: int, logits: np.ndarray, conf: np.ndarray, pred: np.ndarray, params: Any,
              memory: Any = None) -> Tuple[np.ndarray, Any]:
        return predictive_entropy(logits).astype(np.float64) <= params[k], None


class PatienceRule(ExitRule):
    """Leave once ``patience`` consecutive exits predict the same class (memory: the previous prediction
    and the agreement run length of every running sample)."""

    name = "patience"
    parameter = "patience"

    def leave(self, k: int, logits: np.ndarray, conf: np.ndarray, pred: np.ndarray, params: Any,
              memory: Any = None) -> Tuple[np.ndarray, Any]:
        previous, agree = memory if memory is not None else (None, None)
        agree = np.ones_like(pred) if previous is None else 1 + (pred == previous) * agree
        return agree >= params, (pred, agree)

    def keep(self, memory: Any, rows: np.ndarray) -> Any:
        return None if memory is None else (memory[0][rows], memory[1][rows])


RULES: Dict[str, ExitRule] = {rule.name: rule for rule in (ConfidenceRule(), EntropyRule(), PatienceRule())}
EXIT_RULES = tuple(RULES)


def exit_rule(name: str) -> ExitRule:
    """The registered rule of that name (a ``ValueError`` names the known ones)."""
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"unknown exit rule {name!r}: use one of {', '.join(map(repr, EXIT_RULES))}")
    return RULES[name]

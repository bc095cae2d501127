"""Early-exit inference: run a multi-exit model stage by stage and stop for the samples that left.

* :mod:`~timm_l2w.inference.predictor`: :class:`EarlyExitPredictor` (any exit rule of
  :mod:`timm_l2w.exits.rules`) and its :class:`EarlyExitPrediction`.
* :mod:`~timm_l2w.inference.policy`: the exit policy file ``timm-l2w eval --q`` / ``--flops-budget``
  writes and ``timm-l2w export`` ships (:func:`policy_from_eval`).

Inference builds on evaluation and the exit rules; nothing below it imports it.
"""
from .policy import check_policy_request, eval_policy_file, policy_from_eval
from .predictor import EarlyExitPrediction, EarlyExitPredictor

__all__ = ["EarlyExitPredictor", "EarlyExitPrediction", "policy_from_eval", "eval_policy_file", "check_policy_request"]

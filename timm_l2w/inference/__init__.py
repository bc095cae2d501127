"""Early-exit inference: run a multi-exit model stage by stage and stop for the samples that left.

* :mod:`~timm_l2w.inference.predictor`: :class:`EarlyExitPredictor` (any exit rule of
  :mod:`timm_l2w.exits.rules`) and its :class:`EarlyExitPrediction`.
* :mod:`~timm_l2w.inference.policy`: the exit policy file ``timm-l2w eval --q`` / ``--flops-budget``
  writes and ``timm-l2w export`` ships (:func:`policy_from_eval`).
* :mod:`~timm_l2w.inference.latency`: :func:`measure_latency_table`, every stage of the predictor's loop timed
  on this device (``EarlyExitPredictor.from_latency_budget`` chooses a policy with it).

Inference builds on evaluation and the exit rules; nothing below it imports it.
"""
from .latency import measure_latency_table
from .policy import check_policy_request, eval_policy_file, policy_from_eval
from .predictor import EarlyExitPrediction, EarlyExitPredictor

__all__ = ["EarlyExitPredictor", "EarlyExitPrediction", "policy_from_eval", "eval_policy_file", "check_policy_request",
           "measure_latency_table"]

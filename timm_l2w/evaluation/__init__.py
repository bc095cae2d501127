"""Evaluation of a multi-exit model: collect the exit outputs once, then anytime and budgeted metrics.

* :mod:`~timm_l2w.evaluation.outputs`: :class:`ExitOutputs`, :func:`collect_exit_outputs`.
* :mod:`~timm_l2w.evaluation.metrics`: :func:`anytime_metrics`, :func:`budgeted_evaluation`
  (:class:`BudgetedResults`), the FLOPs checks.
* :mod:`~timm_l2w.evaluation.risk`: risk-controlled exit policies (:func:`risk_controlled_choice`: the
  cheapest policy whose risk is bounded with a guarantee; docs/risk.md).
* :mod:`~timm_l2w.evaluation.results`: :func:`evaluate_checkpoint` and the result files.
* :mod:`~timm_l2w.evaluation.plots`: accuracy vs FLOPs (or latency) plots.

Evaluation sits below inference: it never imports :mod:`timm_l2w.inference`.
"""
from .metrics import BudgetedResults, anytime_metrics, budgeted_evaluation, check_flops, check_flops_input_size
from .outputs import ExitOutputs, batch_xy, collect_exit_outputs
from .plots import plot_budgeted, plot_curves
from .results import evaluate_checkpoint, load_weights, save_results
from .risk import RiskChoice, risk_controlled_choice

__all__ = [
    "ExitOutputs", "collect_exit_outputs", "batch_xy", "BudgetedResults", "anytime_metrics", "budgeted_evaluation",
    "check_flops", "check_flops_input_size", "save_results", "load_weights", "evaluate_checkpoint",
    "plot_budgeted", "plot_curves", "RiskChoice", "risk_controlled_choice",
]

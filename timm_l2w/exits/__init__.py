"""When samples leave a multi-exit model: the budgets and the exit rules.

* :mod:`~timm_l2w.exits.distributions`: exit distributions (the paper's ``p_k ∝ q**k`` budgets),
  confidence-based exit assignment (the L2W meta loss) and threshold calibration.
* :mod:`~timm_l2w.exits.rules`: the exit rules (confidence, entropy, patience) as :class:`ExitRule`
  objects, registered by name.
"""
from .distributions import (
    assign_exits,
    assign_exits_static,
    calibrate_thresholds,
    calibrate_thresholds_batch,
    check_distribution,
    check_distributions,
    check_scores,
    distribution_values,
    exit_by_threshold,
    exit_counts,
    exit_distribution,
    paper_distributions,
    paper_qs,
)
from .rules import (
    EXIT_RULES,
    RULES,
    ConfidenceRule,
    EntropyRule,
    ExitRule,
    PatienceRule,
    agreement_run_lengths,
    calibrate_entropy_thresholds_batch,
    check_patience,
    exit_by_entropy,
    exit_by_patience,
    exit_confidence,
    exit_rule,
    predictive_entropy,
)

__all__ = [
    "exit_distribution", "paper_distributions", "paper_qs", "check_distribution", "check_distributions",
    "distribution_values", "exit_counts", "assign_exits", "assign_exits_static", "calibrate_thresholds",
    "calibrate_thresholds_batch", "exit_by_threshold", "check_scores",
    "ExitRule", "ConfidenceRule", "EntropyRule", "PatienceRule", "RULES", "EXIT_RULES", "exit_rule",
    "exit_confidence", "predictive_entropy", "calibrate_entropy_thresholds_batch",
    "exit_by_entropy", "agreement_run_lengths", "check_patience", "exit_by_patience",
]

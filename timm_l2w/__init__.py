"""timm_l2w: Learning to Weight Samples for Dynamic Early-exiting Networks (L2W) as a timm plugin.

``import timm_l2w`` registers the multi-exit models in timm's registry, so
``timm.create_model('msdnet_l2w_cifar')`` works.
"""
from .models import *  # noqa: F401,F403  (registers the models in timm)
from .models import MultiExitModel, check_multi_exit_output, select_samples, unwrap_model
from .flops import exit_flops, register_flop_counter
from .exits import (
    assign_exits,
    calibrate_thresholds,
    check_distribution,
    exit_by_threshold,
    exit_distribution,
    paper_distributions,
    paper_qs,
)

# Each part adds its public names below (one import line per module).
from .weighting import ExitCriterion, WeightPredictor, WeightedMultiExitLoss, check_targets, exit_confidences, exit_losses, normalize_weights, predictor_inputs, sample_weights, weighted_multi_exit_loss  # weighting / meta (issue 3)
from .meta import L2W, MetaStepResult, meta_loss, meta_step  # weighting / meta (issue 3)
from .optim_step import clip_gradients, virtual_step  # the virtual step of any supported optimizer (issue 21)
from .evaluation import ExitOutputs, BudgetedResults, collect_exit_outputs, anytime_metrics, budgeted_evaluation, save_results, evaluate_checkpoint
from .exits import calibrate_thresholds_batch  # evaluate / inference (issue 4)
from .inference import EarlyExitPredictor, EarlyExitPrediction  # evaluate / inference (issue 4)
from .exits import EXIT_RULES, exit_by_entropy, exit_by_patience, predictive_entropy  # exit rules (issue 15)
from .weighting import Distillation, distillation_losses, training_losses  # IMTA's methods (issue 15)
from .models.base import equilibrium_split  # IMTA's methods (issue 15)
from .evaluation import plot_budgeted, plot_curves
from .checkpoint import convert_release_checkpoint, load_state_dict, save_safetensors
from .state_checks import check_state_dict
from .errors import CheckpointError, LabelError, ResumeError, SettingError, SplitError, StateDictMismatchError

__version__ = "0.1.0"

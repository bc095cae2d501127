"""timm_l2w: Learning to Weight Samples for Dynamic Early-exiting Networks (L2W) as a timm plugin.

``import timm_l2w`` registers the multi-exit models in timm's registry, so
``timm.create_model('msdnet_l2w_cifar')`` works. The names below are what a timm user needs in their own
loop; everything else is reached through its submodule (docs/architecture.md shows the layers).
"""
from .checkpoint import convert_release_checkpoint, save_safetensors
from .errors import CheckpointError, LabelError, ResumeError, SettingError, SplitError, StateDictMismatchError
from .evaluation import BudgetedResults, ExitOutputs, anytime_metrics, budgeted_evaluation, collect_exit_outputs
from .exits import RULES, ConfidenceRule, EntropyRule, ExitRule, PatienceRule
from .files import load_state_dict
from .flops import count_flops, exit_flops
from .inference import EarlyExitPrediction, EarlyExitPredictor
from .meta import L2W, L2WClassificationTask, MetaStepResult, meta_step
from .models import MSDNet, MultiExitModel, MultiExitWrapper, RANet, create_multi_exit_model
from .version import __version__
from .weighting import Distillation, ExitCriterion, WeightedMultiExitLoss, WeightPredictor

__all__ = [
    # models (registered in timm on import)
    "MultiExitModel", "MultiExitWrapper", "MSDNet", "RANet", "create_multi_exit_model",
    # L2W in a training loop
    "L2W", "L2WClassificationTask", "meta_step", "MetaStepResult", "WeightPredictor", "WeightedMultiExitLoss",
    "ExitCriterion", "Distillation",
    # evaluation and early exit
    "collect_exit_outputs", "ExitOutputs", "anytime_metrics", "budgeted_evaluation", "BudgetedResults",
    "exit_flops", "count_flops", "EarlyExitPredictor", "EarlyExitPrediction",
    "ExitRule", "ConfidenceRule", "EntropyRule", "PatienceRule", "RULES",
    # weights files
    "save_safetensors", "load_state_dict", "convert_release_checkpoint",
    # errors
    "SettingError", "LabelError", "CheckpointError", "ResumeError", "StateDictMismatchError", "SplitError",
    "__version__",
]

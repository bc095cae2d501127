"""Multi-exit backbones; importing this package registers them in timm."""
from .base import MultiExitModel, check_multi_exit_output, select_samples, unwrap_model
from .factory import create_multi_exit_model

# Each backbone family registers its models in timm when imported.
from .msdnet import MSDNet
from .ranet import RANet
from .wrapper import MultiExitWrapper

__all__ = ["MultiExitModel", "check_multi_exit_output", "select_samples", "unwrap_model", "create_multi_exit_model",
           "MSDNet", "RANet", "MultiExitWrapper"]

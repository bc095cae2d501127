"""Multi-exit backbones; importing this package registers them in timm."""
from .base import MultiExitModel, check_multi_exit_output, select_samples, unwrap_model

# Each backbone family registers its models in timm when imported.
from .msdnet import MSDNet
from .ranet import RANet
from .wrapper import MultiExitWrapper
from .factory import create_multi_exit_model

"""Multi-exit backbones; importing this package registers them in timm."""
from .base import MultiExitModel, check_multi_exit_output, select_samples, unwrap_model

# Each backbone family registers its models in timm when imported.
from .msdnet import MSDNet  # (issue 2: MSDNet)
from .ranet import RANet  # (issue 6: RANet)
from .multi_exit import MultiExitWrapper, SplitError, multi_exit_model  # (issue 6, 20: any timm backbone)

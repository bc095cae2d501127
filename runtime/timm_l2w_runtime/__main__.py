"""``python -m timm_l2w_runtime DIR IMAGES... --output predictions.csv``: ``timm-l2w predict`` without PyTorch
(also the ``timm-l2w-predict`` command)."""
import sys

from .predict import main

sys.exit(main(prog="python -m timm_l2w_runtime"))

"""``python -m timm_l2w_runtime DIR IMAGES... --output predictions.csv``: ``timm-l2w predict`` without PyTorch."""
import sys

from .predict import main

sys.exit(main())

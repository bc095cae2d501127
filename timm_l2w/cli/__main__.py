"""``python -m timm_l2w.cli``: the ``timm-l2w`` command."""
import sys

from . import main

sys.exit(main())

"""``timm-l2w run SCRIPT [ARGS...]``: one of timm's own scripts (``validate.py``, ``benchmark.py``,
``inference.py``, ``train.py``) with the multi-exit models registered: ``import timm_l2w``, then ``SCRIPT``
run as ``python SCRIPT ARGS...`` would run it (README, "With timm's scripts")."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

USAGE = """usage: timm-l2w run SCRIPT [ARGS...]

Run one of timm's scripts (validate.py, benchmark.py, inference.py, train.py from
huggingface/pytorch-image-models) with timm_l2w imported first, so --model msdnet_l2w_cifar, resnet18_l2w,
multi_exit_l2w, ... are registered. ARGS go to the script unchanged; its exit status is this command's."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-l2w run SCRIPT [ARGS...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"timm-l2w run: error: no script {str(script)!r}: pass the path of one of timm's scripts, e.g. "
              "validate.py from a clone of huggingface/pytorch-image-models", file=sys.stderr)
        return 2
    import timm_l2w  # noqa: F401  (registers the models)

    saved = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` puts the script's folder first
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # the script's own exit status
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
    return 0

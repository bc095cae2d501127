"""``timm-l2w convert IN.pth.tar OUT.safetensors --model msdnet_l2w [--num-classes N]``: a released
checkpoint as ``.safetensors`` (:func:`timm_l2w.checkpoint.convert_release_checkpoint`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..checkpoint import convert_release_checkpoint
from ..validation import CONVERT_SETTINGS, check_settings

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-l2w convert IN OUT --model NAME [--num-classes N]``."""
    parser = argparse.ArgumentParser(
        prog="timm-l2w convert",
        description="Convert a released .pth/.pth.tar checkpoint to .safetensors, checking keys and shapes.")
    parser.add_argument("input", help="released checkpoint (.pth.tar, .pth or .safetensors)")
    parser.add_argument("output", help="file to write (.safetensors)")
    parser.add_argument("--model", default="msdnet_l2w", help="timm model name (default: msdnet_l2w)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the checkpoint (default: read from its classifier)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error(f"output {args.output!r} must end in .safetensors")
    import timm

    import timm_l2w  # noqa: F401  (registers the models)

    if not timm.is_model(args.model):
        print(f"timm-l2w convert: error: unknown model '{args.model}': pass --model with a registered multi-exit "
              f"model ({', '.join(timm.list_models('*l2w*'))})", file=sys.stderr)
        return 2
    try:
        check_settings(args, CONVERT_SETTINGS)
        out = convert_release_checkpoint(args.input, args.output, args.model, num_classes=args.num_classes)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"timm-l2w convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.model})")
    return 0

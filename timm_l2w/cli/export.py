"""``timm-l2w export CHECKPOINT --policy POLICY.json --output DIR``: an early-exit package
(:func:`timm_l2w.deploy.export_package`), run with ``timm-l2w predict``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from timm_l2w_runtime.policy import print_policy_warnings, read_policy

from ..deploy.export import export_package

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="timm-l2w export",
        description="Export a multi-exit checkpoint as an early-exit package: one ONNX graph (with --pt2 also a "
                    "torch.export program) per stage, a manifest and the exit policy. The policy must be calibrated "
                    "on these weights (its weights_sha256; one without a digest is used with a warning). Run the "
                    "package with timm-l2w predict.")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=".safetensors (or .pth) weights the policy was calibrated on, or a timm training checkpoint "
                        "(.pth.tar of timm's train.py: model and arguments from its arch / args); omit for random "
                        "init (which only a policy recording no weights digest accepts)")
    p.add_argument("--use-ema", action="store_true",
                   help="export the EMA weights of a timm checkpoint (its state_dict_ema): a policy of timm-l2w eval "
                        "--use-ema, calibrated on them")
    p.add_argument("--policy", required=True,
                   help="exit policy JSON calibrated on this checkpoint (timm-l2w eval CHECKPOINT --q Q or "
                        "--flops-budget F writes one)")
    p.add_argument("--output", required=True, help="package folder to write")
    p.add_argument("--model", default=None,
                   help="timm model name (default: the checkpoint's metadata, else the policy's)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra timm.create_model arguments (default: those recorded in the checkpoint's metadata)")
    p.add_argument("--pt2", action="store_true",
                   help="also write a torch.export program (stage_K.pt2) per stage, for PyTorch runtimes "
                        "(default: ONNX only)")
    p.add_argument("--no-progress", action="store_true", help="no line per exported stage on stderr")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``timm-l2w export``: writes DIR/manifest.json, DIR/policy.json and DIR/stage_K.onnx (+ .pt2 with --pt2)."""
    args = _parser().parse_args(argv)
    try:
        with print_policy_warnings("timm-l2w export"):
            out = _run(args)
    except (ValueError, OSError, TypeError, RuntimeError, ImportError) as err:
        print(f"timm-l2w export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _run(args: argparse.Namespace) -> Path:
    import timm

    import timm_l2w  # noqa: F401  (registers the models)

    from ..evaluation import load_weights
    from ..files import read_metadata
    from .eval import model_from_metadata, unknown_model_error

    policy = read_policy(args.policy)
    args.num_classes = None
    if args.model is None and not (args.checkpoint and read_metadata(args.checkpoint).get("model")):
        args.model = policy.get("model")
    name, kwargs = model_from_metadata(args)
    kwargs.setdefault("num_classes", policy["num_classes"])
    if policy.get("preprocess"):
        kwargs.setdefault("in_chans", policy["preprocess"]["input_size"][0])
    if not timm.is_model(name):
        raise unknown_model_error(name, timm)
    model = timm.create_model(name, **kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint, use_ema=args.use_ema)
        saved = read_metadata(args.checkpoint).get("class_names")
        if policy.get("class_names") is None and saved:
            policy["class_names"] = json.loads(saved)
    return export_package(model, args.output, policy, pt2=args.pt2, checkpoint=args.checkpoint,
                          progress=not args.no_progress)

"""The ``timm-l2w`` command: ``timm-l2w {train,eval,convert,demo,export,predict,run} ...``.

Each subcommand lives in its own module as ``main(argv) -> int``; this file only dispatches, so
``timm-l2w --help`` stays fast (nothing heavy is imported until a subcommand runs).
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "train": ("timm_l2w.cli.train", "train a multi-exit model with L2W or equal weighting (accelerate)"),
    "eval": ("timm_l2w.cli.eval", "anytime and budgeted evaluation of a checkpoint, with plot"),
    "convert": ("timm_l2w.cli.convert", "convert a released .pth.tar checkpoint to .safetensors"),
    "demo": ("timm_l2w.cli.demo", "the README's demo on built-in data"),
    "export": ("timm_l2w.cli.export", "an early-exit package: per-stage ONNX (+ torch.export), manifest, policy"),
    "predict": ("timm_l2w_runtime.predict", "early-exit predictions for images with a package (onnxruntime)"),
    "run": ("timm_l2w.cli.run", "one of timm's scripts (validate.py, benchmark.py, ...) with the models registered"),
}


def _usage() -> str:
    lines = ["usage: timm-l2w <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "run 'timm-l2w <command> --help' for the options of a command; 'timm-l2w --version' for the version"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        from .common import version_text

        print(version_text())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"timm-l2w: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Pieces every ``timm-l2w`` subcommand shares: the help formatter, ``--version``, the flags that are
spelled the same in every command (``--input-size`` / ``--img-size``, ``--device`` / ``--cpu``).

Nothing here imports torch or another ``timm_l2w`` module except the version, so any command module
can use it without an import circle.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Optional, Sequence

__all__ = ["DefaultsHelpFormatter", "add_version", "add_input_size", "add_device", "version_text", "flops_amount"]

FLOPS_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_FLOPS = re.compile(r"\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)\s*(?:flops?)?\s*", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every real default; flags whose default is None or off explain themselves."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False or action.default == {}:
            return action.help
        return super()._get_help_string(action)


def version_text(prog: str = "timm-l2w") -> str:
    """``'timm-l2w 0.1.0'`` (the installed package's version)."""
    from ..version import __version__

    return f"{prog} {__version__}"


def flops_amount(text: str) -> float:
    """A FLOPs count as a command line gives it: ``3000000``, ``3e6``, ``3M``, ``3.5 MFLOPs``, ``0.5G`` (suffixes
    k, M, G, T: 1e3, 1e6, 1e9, 1e12; any case, an optional ``FLOPs`` after them); an argparse type."""
    match = _FLOPS.fullmatch(str(text))
    try:
        value = float(match.group(1)) * FLOPS_SUFFIXES[match.group(2).lower()] if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive FLOPs count: write 3000000, 3e6 or 3M "
                                         "(suffixes k, M, G; 3M = 3 MFLOPs, the unit timm-l2w eval prints)")
    return value


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: print the package version and exit."""
    parser.add_argument("--version", action="version", version=version_text(), help="print the version and exit")


def add_input_size(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int,
                   help_text: str = "square image side fed to the model") -> None:
    """``--input-size N`` (``--img-size N``, timm's spelling, is the same flag); dest ``input_size``."""
    parser.add_argument("--input-size", "--img-size", dest="input_size", type=int, default=default, help=help_text)


def add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str,
               choices: Optional[Sequence[str]] = None) -> None:
    """``--device DEVICE`` with ``--cpu`` as the same flag as ``--device cpu``; dest ``device`` (None: auto)."""
    parser.add_argument("--device", default=None, choices=choices, help=help_text)
    parser.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                        help="the same as --device cpu")


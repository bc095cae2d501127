"""Checks of what enters timm_l2w from outside: settings and labels.

The Python API, ``timm-l2w train``, ``eval`` and ``convert`` call these checks where the input
arrives, so a bad value never reaches torch. Each check returns the cleaned value or raises
:class:`~timm_l2w.errors.SettingError` or :class:`~timm_l2w.errors.LabelError` (``ValueError``
subclasses, :mod:`timm_l2w.errors`), whose message says what was wrong and what to pass instead.
Weights files and checkpoint folders are checked by :mod:`timm_l2w.state_checks`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from .errors import LabelError, SettingError

__all__ = [
    "Range", "check_number", "check_choice", "check_settings", "check_train_settings", "check_label_smoothing",
    "TRAIN_SETTINGS", "EVAL_SETTINGS", "CONVERT_SETTINGS", "FLAG_NAMES", "PAPER_P_INDICES", "negative_weights_note",
    "check_labels", "assert_on_device",
]


# ----------------------------------------------------------------------------- settings


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: bounds (``None``: unbounded; ``*_open``: bound excluded), integer or not."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    hint: str = ""

    def text(self) -> str:
        """``' >= 0'``, ``' in [0, 1)'``, ...: the range as it reads after 'must be'."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f" in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return ""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def check_choice(value: str, choices: Iterable[str], name: str) -> str:
    """``value`` when it is one of ``choices``, else a ValueError naming them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")
    return value


def check_number(value: Any, name: str, allowed: Range = Range()) -> Union[int, float]:
    """Return ``value`` as an int (``allowed.integer``) or a finite float inside ``allowed``, else
    raise :class:`SettingError` naming ``name``, the allowed range and ``allowed.hint``."""
    hint = f" ({allowed.hint})" if allowed.hint else ""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if allowed.integer:
        ok_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        kind = "an integer"
    else:
        ok_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
        kind = "a number"
    if not ok_type:
        raise SettingError(f"{name} must be {kind}{allowed.text()}, got {value!r} "
                           f"({type(value).__name__}){hint}")
    value = int(value) if allowed.integer else float(value)
    if not allowed.integer and not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number{allowed.text()}, got {value}{hint}")
    if not allowed.contains(value):
        raise SettingError(f"{name} must be{allowed.text()}, got {_fmt(value)}{hint}")
    return value


def check_label_smoothing(value: Any, name: str = "label_smoothing") -> float:
    """Label smoothing in ``[0, 1)`` (paper: 0 for CIFAR, 0.1 for ImageNet)."""
    return float(check_number(value, name, Range(0, 1, high_open=True, hint="paper: 0 CIFAR, 0.1 ImageNet")))


PAPER_P_INDICES = Range(1, 39, integer=True, hint="the training distribution q = j/20 of the paper's 39 budgets; "
                                                "paper: 15")

# Flags of ``timm-l2w train`` by argparse ``dest``; a flag left at None (its default) is not checked.
TRAIN_SETTINGS: Dict[str, Range] = {
    "epochs": Range(1, integer=True),
    "max_steps": Range(1, integer=True),
    "batch_size": Range(1, integer=True, hint="the global batch, split into a training and a meta half"),
    "lr": Range(0, low_open=True, hint="paper: 0.1"),
    "min_lr": Range(0),
    "momentum": Range(0, 1, high_open=True, hint="paper: 0.9"),
    "weight_decay": Range(0, hint="paper: 1e-4"),
    "warmup_steps": Range(0, integer=True),
    "warmup_lr": Range(0),
    "label_smoothing": Range(0, 1, high_open=True, hint="paper: 0 CIFAR, 0.1 ImageNet"),
    "seed": Range(0, 2 ** 32 - 1, integer=True),
    "eps": Range(0, hint="0 = equal weighting; paper: 0.8 CIFAR, 0.3 ImageNet"),
    "target_p_index": PAPER_P_INDICES,
    "meta_interval": Range(1, integer=True, hint="paper: 1 CIFAR, 100 ImageNet"),
    "meta_lr": Range(0, low_open=True, hint="paper: 1e-4"),
    "meta_weight_decay": Range(0, hint="paper: 1e-4"),
    "hidden": Range(1, integer=True, hint="paper: 500"),
    "distill_temperature": Range(0, low_open=True, hint="IMTA: 1"),
    "distill_alpha": Range(0, 1, hint="0 = no distillation; IMTA: 0.1"),
    "input_size": Range(1, integer=True),
    "held_out": Range(1, integer=True),
    "workers": Range(0, integer=True),
    "checkpoint_every": Range(0, integer=True, hint="0: checkpoint at epoch ends only"),
    "keep_checkpoints": Range(1, integer=True),
    "stop_after_steps": Range(1, integer=True),
    "max_nonfinite": Range(1, integer=True),
    "eval_batch_size": Range(1, integer=True),
    "opt_eps": Range(0, low_open=True),
    "layer_decay": Range(0, 1, low_open=True, hint="timm's ViT recipes: 0.65-0.75"),
    "clip_grad": Range(0, low_open=True),
    "grad_accum_steps": Range(1, integer=True),
    "mixup": Range(0, hint="timm's recipes: 0.8"),
    "cutmix": Range(0, hint="timm's recipes: 1.0"),
    "mixup_prob": Range(0, 1),
    "mixup_switch_prob": Range(0, 1),
    "bce_target_thresh": Range(0, 1),
    "model_ema_decay": Range(0, 1, high_open=True, hint="timm's recipes: 0.9998"),
}
EVAL_SETTINGS: Dict[str, Range] = {
    "num_classes": Range(1, integer=True), "in_chans": Range(1, integer=True), "input_size": Range(1, integer=True),
    "held_out": Range(1, integer=True), "batch_size": Range(1, integer=True),
    "crop_pct": Range(0, 1, low_open=True, hint="the centre crop's share of the resized image"),
    "latency_batch_size": Range(1, integer=True), "latency_repeats": Range(1, integer=True),
    "latency_threads": Range(1, integer=True), "latency_rounds": Range(1, integer=True),
}
CONVERT_SETTINGS: Dict[str, Range] = {"num_classes": Range(1, integer=True)}
# flags with two spellings, named both ways in messages
FLAG_NAMES = {"input_size": "--input-size/--img-size"}


def check_settings(settings: Any, table: Mapping[str, Range], flags: bool = True) -> None:
    """Check every entry of ``table`` present in ``settings`` (an argparse namespace or a mapping);
    ``None`` means "not given" and is skipped. ``flags``: name them ``--like-this`` in messages."""
    values = settings if isinstance(settings, Mapping) else vars(settings)
    for key, allowed in table.items():
        value = values.get(key)
        if value is not None:
            name = FLAG_NAMES.get(key, f"--{key.replace('_', '-')}") if flags else key
            check_number(value, name, allowed)


def check_train_settings(args: Any) -> None:
    """The flags of ``timm-l2w train``: each in range (:data:`TRAIN_SETTINGS`) and consistent with the others."""
    check_settings(args, TRAIN_SETTINGS)
    if args.max_steps is None and args.epochs is None:
        raise SettingError("pass --epochs or --max-steps")
    if args.min_lr > args.lr:
        raise SettingError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine schedule decays "
                           f"from --lr down to --min-lr; pass a --min-lr <= --lr")


def negative_weights_note(eps: float, constraint: str, num_exits: int, batch: int) -> Optional[str]:
    """A note when ``eps`` lets the L2W weights ``W = 1 + eps (G - mean G)`` (``G`` in (-1, 1)) go negative.

    The mean runs over ``n`` entries (``col``: the ``num_exits`` exits of a sample, ``row``: the ``batch``
    samples of an exit, ``mat``: both); the lowest weight is ``1 - eps 2 (n - 1) / n``, negative when
    ``eps > n / (2 (n - 1))`` (0.625 for 5 exits under ``col``: the paper's CIFAR 0.8 is above it).
    Allowed (docs/method.md §2); returns None when the weights stay >= 0.
    """
    n, what = {"col": (num_exits, f"K/(2(K-1)) for K = {num_exits} exits"),
               "row": (batch, f"B/(2(B-1)) for B = {batch} samples per update"),
               "mat": (num_exits * batch, f"n/(2(n-1)) for n = {num_exits} exits x {batch} samples")}[constraint]
    if n < 2:
        return None
    bound, lowest = n / (2 * (n - 1)), 1 - eps * 2 * (n - 1) / n
    if eps <= bound:
        return None
    return (f"--eps {eps:g} is above {bound:.3g} = {what} under the {constraint} constraint: a sample's weight at "
            f"an exit can go down to {lowest:.2f}, below zero (its loss there is then pushed up); allowed, as in the "
            f"paper's CIFAR setting (docs/method.md §2); --eps {bound:.3g} or less keeps every weight >= 0")


# ----------------------------------------------------------------------------- labels


_HOST_CHECKS = {"left": 8}  # accelerator checks read on the host first: bad labels show at the first batches


def assert_on_device(ok: Tensor, message: str) -> bool:
    """Check a 0-dim bool tensor without a host read in Python (``torch._assert_async``): True when it
    holds. On the CPU the check is immediate and False means it failed (the caller raises the clear
    error). On an accelerator the first few checks of a process are read on the host (so wrong labels,
    which show from the first batch, get the clear error); later ones are queued on the device (no host
    sync: the hot path of the L2W update stays sync-free) and a failure surfaces as a device-side
    assertion naming ``message``."""
    if ok.device.type != "cpu" and _HOST_CHECKS["left"] > 0 and not _capturing():
        _HOST_CHECKS["left"] -= 1
        return bool(ok)
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        return False
    return True


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_labels(labels: Any, num_classes: Optional[int] = None, batch: Optional[int] = None,
                 name: str = "labels") -> Tensor:
    """Return ``labels`` as an int64 ``[batch]`` tensor after checking they are integer class indices
    in ``[0, num_classes - 1]`` (any integer dtype is accepted; bool, float and one-hot are refused)."""
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise LabelError(f"{name} must be a tensor of integer class indices, got {type(labels).__name__} "
                             f"({err})") from err
    dtype = labels.dtype
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise LabelError(
            f"{name} must be integer class indices, got dtype {str(dtype).replace('torch.', '')}: pass them as a "
            f"torch.long tensor (e.g. y.long() for whole-number labels), not one-hot, float or mask labels")
    expected = f"[{batch}]" if batch is not None else "[batch]"
    if labels.ndim != 1 or (batch is not None and labels.shape[0] != batch):
        raise LabelError(f"{name} must be a {expected} tensor of class indices matching the outputs' batch, got "
                         f"shape {tuple(labels.shape)} (one-hot or mixup targets are not supported here)")
    labels = labels.long()
    if labels.numel():
        in_range = labels.min() >= 0
        if num_classes is not None:
            in_range &= labels.max() < num_classes
        top = "inf" if num_classes is None else num_classes - 1
        if assert_on_device(in_range, f"{name} must be class indices in [0, {top}]"):
            return labels
        low, high = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
        if low < 0 or (num_classes is not None and high >= num_classes):
            if num_classes is None:
                raise LabelError(f"{name} must be class indices >= 0, got values from {low} to {high}: remap them")
            fix = (f"remap the labels or build the model with num_classes={high + 1}" if low >= 0 else
                   "remap the labels (negative values such as an ignore index are not class indices)")
            raise LabelError(f"{name} must be class indices in [0, {num_classes - 1}] for the {num_classes}-class "
                             f"heads, got values from {low} to {high}: {fix}")
    return labels

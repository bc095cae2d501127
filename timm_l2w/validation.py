"""One validation layer for what enters timm_l2w from outside: settings, labels and checkpoints.

The Python API, ``timm-l2w train``, ``eval`` and ``convert`` call these checks where the input
arrives, so a bad value never reaches torch. Each check returns the cleaned value or raises one of
the errors below. They are all ``ValueError`` subclasses (``except ValueError`` catches any bad
input; the commands print the message and exit with code 2), and each message says what was wrong
and what to pass instead.

* :class:`SettingError`: a setting that is not finite, outside its range or not an integer.
* :class:`LabelError`: labels that are not integer class indices in ``[0, num_classes - 1]``.
* :class:`CheckpointError`: a weights file that cannot be read or holds unusable weights (NaN/inf,
  a non-floating dtype where the model has floating point, wrong keys or shapes: :func:`check_state_dict`
  raises :class:`StateDictMismatchError`, one of them).
* :class:`ResumeError`: a training checkpoint folder that cannot be resumed; it names the next
  older complete checkpoint when there is one.

Checkpoint folders written by ``timm-l2w train`` carry ``checksums.json`` (SHA-256 of every file),
so a resume also detects damage that leaves a file readable, such as a flipped bit in the weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .models.base import unwrap_model

__all__ = [
    "SettingError", "LabelError", "CheckpointError", "ResumeError",
    "Range", "check_number", "check_settings", "check_train_settings", "check_label_smoothing",
    "TRAIN_SETTINGS", "EVAL_SETTINGS", "CONVERT_SETTINGS", "FLAG_NAMES", "PAPER_P_INDICES", "negative_weights_note",
    "check_labels", "assert_on_device", "check_weights", "check_optimizer_state",
    "StateDictMismatchError", "check_state_dict",
    "CHECKSUMS_FILE", "write_checksums", "verify_checksums", "check_resume_checkpoint",
]

PathLike = Union[str, os.PathLike]
_SHOWN = 8  # names listed per problem in a message


class SettingError(ValueError):
    """A setting (API argument or command-line flag) is not finite, out of range or of the wrong type."""


class LabelError(ValueError):
    """Labels are not a ``[batch]`` tensor of integer class indices in ``[0, num_classes - 1]``."""


class CheckpointError(ValueError):
    """A weights file cannot be read or holds unusable weights; ``path`` names it (or is ``None``)."""

    def __init__(self, message: str, path: Optional[PathLike] = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


class ResumeError(CheckpointError):
    """A checkpoint folder cannot be resumed; ``older`` is the next older complete checkpoint (or ``None``)."""

    def __init__(self, checkpoint: PathLike, why: str, older: Optional[PathLike] = None, fix: Optional[str] = None):
        self.why, self.older = why, None if older is None else Path(older)
        if fix is None and older is not None:
            fix = f"resume the next older complete checkpoint with --resume {older}, or start a fresh --output"
        elif fix is None:
            fix = "there is no older complete checkpoint: start a fresh --output (or restore the file from a backup)"
        super().__init__(f"checkpoint {checkpoint} cannot be resumed: {why}; {fix}", checkpoint)

    @classmethod
    def from_exception(cls, checkpoint: PathLike, err: BaseException, older: Optional[PathLike] = None) -> "ResumeError":
        """Wrap whatever reading the checkpoint raised: a :class:`CheckpointError`'s own message, else the
        first line of the loader's. A :class:`SettingError` (other flags than the run that wrote it) asks
        for the same flags instead of offering an older checkpoint (written with the same flags)."""
        if isinstance(err, ResumeError):
            return err
        if isinstance(err, SettingError):
            return cls(checkpoint, str(err), fix="resume with the flags it was trained with, or use another --output")
        return cls(checkpoint, str(err) if isinstance(err, CheckpointError) else _first_line(err), older)


def _first_line(err: BaseException) -> str:
    import pickle

    text = f"{type(err).__name__}: {(str(err).strip().splitlines() or ['?'])[0][:300]}"
    if isinstance(err, pickle.UnpicklingError):
        text += " (weights_only loading refused it: the file is damaged or holds code)"
    return text


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
        if assert_on_device(in_range, f"{name} must be class indices in [0, {'inf' if num_classes is None else num_classes - 1}]"):
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


# ----------------------------------------------------------------------------- weights


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "floating point" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def _named(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def check_weights(state: Mapping[str, Any], expected: Optional[Mapping[str, Tensor]] = None,
                  source: Union[str, PathLike] = "the state dict") -> None:
    """Raise :class:`CheckpointError` when ``state`` holds non-tensors, tensors of another kind of dtype
    than ``expected`` (e.g. integer where the model has floating point) or non-finite floating values."""
    not_tensor, wrong, nonfinite = [], [], []
    for key, value in state.items():
        if not isinstance(value, Tensor):
            not_tensor.append(f"{key} ({type(value).__name__})")
            continue
        ref = expected.get(key) if expected is not None else None
        if ref is not None and _kind(ref.dtype) != _kind(value.dtype):
            wrong.append(f"{key}: {str(value.dtype).replace('torch.', '')} "
                         f"(model: {str(ref.dtype).replace('torch.', '')})")
        elif value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            nonfinite.append(key)
    problems = []
    if not_tensor:
        problems.append(f"{len(not_tensor)} entries that are not tensors: {_named(not_tensor)}")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong kind of dtype: {_named(wrong)}")
    if nonfinite:
        problems.append(f"NaN or inf in {len(nonfinite)} tensors: {_named(nonfinite)}")
    if problems:
        raise CheckpointError(
            f"{source} holds unusable weights ({'; '.join(problems)}): nothing was loaded; use weights saved from "
            f"a healthy run (an earlier checkpoint) or save them again", source if isinstance(source, Path) else None)


def _walk_tensors(obj: Any, prefix: str = "") -> Iterable[tuple]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def check_optimizer_state(saved: Any, optimizer: Any, source: str = "the optimizer state") -> None:
    """Check a saved ``optimizer.state_dict()`` fits ``optimizer`` (groups, parameter counts, buffer
    shapes) and holds finite numbers, so ``load_state_dict`` and the next step cannot fail on it."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) \
            or not isinstance(saved.get("param_groups"), (list, tuple)):
        raise CheckpointError(f"{source} is not an optimizer state dict (needs 'state' and 'param_groups')")
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(f"{source} has {len(saved['param_groups'])} parameter groups, the optimizer "
                              f"{len(groups)}: it belongs to another model or optimizer")
    shapes: Dict[Any, tuple] = {}
    for i, (old, new) in enumerate(zip(saved["param_groups"], groups)):
        ids = old.get("params") if isinstance(old, Mapping) else None
        if not isinstance(ids, (list, tuple)) or len(ids) != len(new["params"]):
            raise CheckpointError(f"{source}: parameter group {i} does not match the optimizer's "
                                  f"({len(new['params'])} parameters): it belongs to another model")
        shapes.update({pid: tuple(p.shape) for pid, p in zip(ids, new["params"])})
        for key, value in old.items():
            if key != "params" and isinstance(value, numbers.Real) and not isinstance(value, bool) \
                    and not math.isfinite(value):
                raise CheckpointError(f"{source}: parameter group {i} has {key}={value}: not a usable setting")
    bad = [name for name, t in _walk_tensors(saved["state"])
           if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source} has NaN or inf in {_named(bad)}: the run that wrote it diverged or the "
                              f"file is damaged")
    key_sets = {tuple(sorted(map(str, v))) for v in saved["state"].values() if isinstance(v, Mapping)}
    if len(key_sets) > 1:
        raise CheckpointError(f"{source}: the parameters' states have different entries {sorted(key_sets)}: "
                              f"some were lost")
    for pid, per_param in saved["state"].items():
        if pid not in shapes or not isinstance(per_param, Mapping):
            raise CheckpointError(f"{source} has state for parameter {pid!r}, which the optimizer does not have")
        for key, t in per_param.items():
            if key == "step":  # a count: a number or a scalar tensor, not bool, >= 0 (finite: checked above)
                count = t.item() if isinstance(t, Tensor) and t.numel() == 1 and t.dtype != torch.bool else t
                if not isinstance(count, (int, float)) or isinstance(count, bool) or not count >= 0:
                    raise CheckpointError(f"{source}: step of parameter {pid} is {t!r}, not a count of steps")
                continue
            if not isinstance(t, Tensor):
                continue
            if not t.is_floating_point():
                raise CheckpointError(f"{source}: {key} of parameter {pid} has dtype "
                                      f"{str(t.dtype).replace('torch.', '')}, not floating point")
            if tuple(t.shape) != shapes[pid]:
                raise CheckpointError(f"{source}: {key} of parameter {pid} has shape {tuple(t.shape)}, the "
                                      f"parameter {shapes[pid]}")


# ----------------------------------------------------------------------------- state dicts

_KEYS_SHOWN = 25  # keys listed per category in a state-dict mismatch message


class StateDictMismatchError(CheckpointError):
    """Keys or shapes of a state dict do not match a model; ``missing``, ``unexpected``, ``mismatched``
    (a :class:`~timm_l2w.validation.CheckpointError`, hence a ``ValueError``)."""

    def __init__(self, message: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def _listed(title: str, items: Sequence[str]) -> str:
    more = f"\n  ... and {len(items) - _KEYS_SHOWN} more" if len(items) > _KEYS_SHOWN else ""
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:_KEYS_SHOWN]) + more


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise :class:`StateDictMismatchError` (a ``ValueError``) naming every missing, unexpected or mis-shaped key."""
    expected = unwrap_model(model).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape))
                  for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"the state dict does not fit {type(unwrap_model(model)).__name__}"]
    if missing:
        parts.append(_listed("missing keys", missing))
    if unexpected:
        parts.append(_listed("unexpected keys", unexpected))
    if mismatched:
        parts.append(_listed("wrong shapes (checkpoint vs model)", [f"{k}: {a} vs {b}" for k, a, b in mismatched]))
    hint = "build the model the checkpoint was trained with (model name and settings)"
    if mismatched and not (missing or unexpected) and all(len(a) <= 2 for _, a, _ in mismatched):
        hint = f"only the classifier sizes differ: pass num_classes={mismatched[0][1][0]} (--num-classes)"
    parts.append(f"fix: {hint}")
    raise StateDictMismatchError("\n".join(parts), missing, unexpected, mismatched)


# ----------------------------------------------------------------------------- checkpoint folders

CHECKSUMS_FILE = "checksums.json"
_UNCHECKED = ("COMPLETE", CHECKSUMS_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: PathLike, process_index: int = 0) -> Path:
    """Write ``checksums.json`` (SHA-256 of every file of a checkpoint folder) atomically; RNG files of
    other processes (possibly still being written) are left out."""
    from .files import write_json_atomic

    folder = Path(folder)
    own_rng = f"random_states_{process_index}.pkl"
    digests = {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
               if p.is_file() and p.name not in _UNCHECKED and not p.name.startswith(".")
               and not (p.name.startswith("random_states_") and p.name != own_rng)}
    return write_json_atomic(folder / CHECKSUMS_FILE, {"sha256": digests})


def verify_checksums(folder: PathLike) -> bool:
    """Compare every file listed in ``checksums.json`` with its digest (``False``: the folder has no
    ``checksums.json``, e.g. it was written by an older version). Raises :class:`CheckpointError`."""
    folder = Path(folder)
    manifest = folder / CHECKSUMS_FILE
    if not manifest.is_file():
        return False
    try:
        digests = json.loads(manifest.read_bytes().decode("utf-8"))["sha256"]
        if not isinstance(digests, Mapping) or not all(isinstance(v, str) for v in digests.values()):
            raise TypeError("'sha256' is not a mapping of file names to digests")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{CHECKSUMS_FILE} is damaged ({type(err).__name__}: {err})", manifest) from err
    for rel, digest in digests.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{CHECKSUMS_FILE} lists {rel}, which is missing", path)
        if _sha256(path) != digest:
            raise CheckpointError(f"{rel} does not match its checksum in {CHECKSUMS_FILE}: it (or {CHECKSUMS_FILE}) "
                                  f"is damaged, its contents differ from when the checkpoint was written", path)
    return True


def _read(folder: Path, rel: str, loader: Callable[[Path], Any]) -> Any:
    """``loader(folder / rel)``, any failure of the loader turned into a :class:`CheckpointError` naming the file."""
    path = folder / rel
    if not path.is_file():
        raise CheckpointError(f"{rel} is missing", path)
    try:
        return loader(path)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is a damaged file, reported as one
        raise CheckpointError(f"{rel} cannot be read ({_first_line(err)})", path) from err


def _load_safetensors(path: Path) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_module_state(state: Any, module: nn.Module, source: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} is not a state dict (found {type(state).__name__})")
    check_weights(state, module.state_dict(), source)
    try:
        check_state_dict(module, state)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _train_state_problem(state: Any, num_exits: Optional[int]) -> Optional[str]:
    if not isinstance(state, dict):
        return "not a JSON object"
    if not _is_int(state.get("step")) or not _is_int(state.get("nonfinite_run", 0)):
        return "no step count"
    es, history = state.get("epoch_stats"), state.get("history")
    exits = f" for {num_exits} exits" if num_exits else ""
    if not isinstance(es, dict) or not all(
            isinstance(es.get(k), list) and all(_is_num(v) for v in es[k])
            and (num_exits is None or len(es[k]) == num_exits) for k in ("loss_sum", "correct")) \
            or not all(_is_int(es.get(k)) for k in ("seen", "meta_count", "skipped")) \
            or not _is_int(es.get("meta_skipped", 0)) or not all(_is_num(es.get(k)) for k in ("meta_sum", "time")):
        return f"epoch_stats is not the trainer's running sums{exits}"
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history) \
            or len({tuple(r) for r in history}) > 1:
        return "history is not a list of log rows with the same columns"
    return None


def _check_train_state(path: Path, num_exits: Optional[int] = None) -> Dict[str, Any]:
    """``train_state.json``: step, the running epoch sums (one entry per exit) and the per-epoch log rows."""
    state = json.loads(path.read_bytes().decode("utf-8"))
    problem = _train_state_problem(state, num_exits)
    if problem:
        raise CheckpointError(f"{path.name} does not hold a training state ({problem})", path)
    return state


def _check_rng(path: Path) -> None:
    """accelerate only logs a warning when it cannot apply an RNG file (the resumed run then silently
    differs): apply every part to a throwaway generator first, so a bad file is an error."""
    import random

    import numpy as np
    from accelerate.utils import load as accelerate_load

    states = accelerate_load(path)
    if not isinstance(states, Mapping):
        raise CheckpointError(f"{path.name} does not hold random states", path)
    random.Random().setstate(states["random_state"])
    np.random.RandomState().set_state(states["numpy_random_seed"])
    torch.Generator().set_state(states["torch_manual_seed"])


def _check_same_settings(saved: Any, settings: Mapping[str, Any]) -> None:
    saved = saved if isinstance(saved, Mapping) else {}
    differ = [f"--{k.replace('_', '-')} {saved[k]} (now {v})" for k, v in settings.items()
              if k in saved and saved[k] is not None and saved[k] != v]
    if differ:
        raise SettingError(f"it was trained with {', '.join(differ)}")


def check_resume_checkpoint(folder: PathLike, model: nn.Module, optimizer: Any, l2w: Any = None,
                            process_index: int = 0, settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Check every file a resume of ``timm-l2w train`` reads, before anything is loaded.

    ``train_state.json``, the model and optimizer files of accelerate's ``state/``, this process's RNG
    file and, with ``l2w``, ``l2w_state.pt``: readable, fitting ``model`` / ``optimizer`` / ``l2w``,
    floating dtypes where the model has floating point, finite values; then the checksums of every
    file (when the folder has them). ``settings`` (e.g. ``{"model": ..., "weighting": ...}``) must equal
    the flags saved in ``train_state.json`` (else :class:`SettingError`). Returns the parsed
    ``train_state.json``; raises :class:`CheckpointError`.
    """
    folder = Path(folder)
    num_exits = getattr(model, "num_exits", None)
    state = _read(folder, "train_state.json", lambda p: _check_train_state(p, num_exits))
    _check_same_settings(state.get("args"), settings or {})
    models = sorted((folder / "state").glob("model*.safetensors"))
    if not models:
        raise CheckpointError("state/model.safetensors is missing", folder / "state" / "model.safetensors")
    for path in models[:1]:
        _check_module_state(_read(folder, f"state/{path.name}", _load_safetensors), model, f"state/{path.name}")
    saved = _read(folder, "state/optimizer.bin", _load_torch)
    check_optimizer_state(saved, optimizer, "state/optimizer.bin")
    _read(folder, f"state/random_states_{process_index}.pkl", _check_rng)
    if (folder / "state" / "scaler.pt").exists():  # fp16 runs: the GradScaler's scale and growth tracker
        scaler = _read(folder, "state/scaler.pt", _load_torch)
        if not isinstance(scaler, Mapping):
            raise CheckpointError("state/scaler.pt does not hold a GradScaler state", folder / "state" / "scaler.pt")
        check_weights({k: v for k, v in scaler.items() if isinstance(v, Tensor)}, None, "state/scaler.pt")
    if l2w is not None:
        extra = _read(folder, "l2w_state.pt", _load_torch)
        if not isinstance(extra, Mapping) or not {"weight_net", "meta_optimizer", "step"} <= set(extra):
            raise CheckpointError("l2w_state.pt does not hold an L2W state (weight_net, meta_optimizer, step)",
                                  folder / "l2w_state.pt")
        _check_module_state(extra["weight_net"], l2w.weight_net, "l2w_state.pt (weight_net)")
        check_optimizer_state(extra["meta_optimizer"], l2w.meta_optimizer, "l2w_state.pt (meta_optimizer)")
        step = extra["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"l2w_state.pt has step {step!r}, not a count of updates", folder / "l2w_state.pt")
    verify_checksums(folder)  # last: damage that left every file readable (e.g. a flipped bit in a weight)
    return state

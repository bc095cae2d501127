"""Checks of saved states before they are loaded: weights (dtypes, finite values), optimizer states,
state dicts against a model, and the checkpoint folders of ``timm-l2w train`` (every file a resume reads).

Checkpoint folders written by ``timm-l2w train`` carry ``checksums.json`` (SHA-256 of every file),
so a resume also detects damage that leaves a file readable, such as a flipped bit in the weights.
Each check raises :class:`~timm_l2w.errors.CheckpointError` (or :class:`~timm_l2w.errors.SettingError`:
a checkpoint of a run with other flags), with a message naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, SettingError, StateDictMismatchError, first_line
from .models.base import unwrap_model

__all__ = [
    "check_weights", "check_optimizer_state", "check_state_dict",
    "CHECKSUMS_FILE", "write_checksums", "verify_checksums", "check_resume_checkpoint",
]

PathLike = Union[str, os.PathLike]
_SHOWN = 8  # names listed per problem in a message


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
        raise CheckpointError(f"{rel} cannot be read ({first_line(err)})", path) from err


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

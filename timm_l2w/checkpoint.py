"""Checkpoints: safetensors save/load, state-dict checks, release-checkpoint conversion.

``save_safetensors`` writes atomically (temp file in the same folder, then ``os.replace``), so a stopped
run never leaves a half-written file under the final name. ``load_state_dict`` reads ``.safetensors`` and
PyTorch ``.pth`` / ``.pth.tar`` files (``torch.load(weights_only=True)`` only), unwraps a nested
``'state_dict'`` / ``'model'`` entry and strips DDP / ``torch.compile`` prefixes.

:func:`load_pretrained` starts a model from such a file (only the exit classifiers may differ).
The command line is ``timm-l2w convert`` (:mod:`timm_l2w.cli.convert`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .files import atomic_path, load_state_dict, read_metadata
from .models.base import unwrap_model
from .state_checks import check_state_dict, check_weights

__all__ = [
    "save_safetensors",
    "convert_release_checkpoint", "read_metadata", "recorded_model", "exit_classifier_keys", "check_pretrained",
    "load_pretrained",
]

PathLike = Union[str, os.PathLike]
_SHOWN = 25  # keys listed per category in a mismatch message


def _tensor_dict(state_dict_or_model: Union[nn.Module, Mapping[str, Any]]) -> Dict[str, Tensor]:
    if isinstance(state_dict_or_model, nn.Module):
        state = unwrap_model(state_dict_or_model).state_dict()
    elif isinstance(state_dict_or_model, Mapping):
        state = state_dict_or_model
    else:
        raise TypeError(
            f"save_safetensors expects an nn.Module or a dict of tensors, got {type(state_dict_or_model).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise TypeError(
            f"safetensors stores only str -> Tensor entries; not tensors: {bad[:_SHOWN]}: save those "
            "(epoch, optimizer state...) separately, e.g. as JSON or in metadata=")
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().to("cpu")
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        if storage in seen or not value.is_contiguous():  # safetensors refuses shared or strided memory
            value = value.clone(memory_format=torch.contiguous_format)
        elif storage is not None:
            seen.add(storage)
        tensors[key] = value
    return tensors


def save_safetensors(
        state_dict_or_model: Union[nn.Module, Mapping[str, Tensor]],
        path: PathLike,
        metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a model's state dict (or a plain dict of tensors) to ``path`` as safetensors, atomically.

    ``metadata`` values that are not strings are stored as JSON. For a model, ``model`` (its timm
    name) and ``num_classes`` are recorded unless given (and what its ``checkpoint_metadata()`` returns:
    a wrapped timm backbone's ``model_kwargs``), so ``timm-l2w eval`` and
    :func:`load_pretrained` know what the file holds. Returns the path written.
    """
    from safetensors.torch import save_file

    tensors = _tensor_dict(state_dict_or_model)
    meta = {"format": "pt"}
    if isinstance(state_dict_or_model, nn.Module):
        net = unwrap_model(state_dict_or_model)
        name = (getattr(net, "pretrained_cfg", None) or {}).get("architecture")
        if name:
            meta["model"] = str(name)
        if isinstance(getattr(net, "num_classes", None), int):
            meta["num_classes"] = str(net.num_classes)
        if callable(getattr(net, "checkpoint_metadata", None)):  # e.g. a wrapped backbone: what rebuilds it
            meta.update(net.checkpoint_metadata())
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def recorded_model(path: PathLike, given: Optional[str] = None, flag: str = "--model") -> Optional[str]:
    """The model to build for the file at ``path``: ``given`` (a ``--model`` flag) when it agrees with the
    model name the file's metadata records (for a wrapped timm backbone: that backbone's name too), else
    that name; a flag that contradicts the record is a ``ValueError`` naming both. ``None`` when neither says."""
    meta = read_metadata(path)
    saved = meta.get("model")
    try:
        backbone = json.loads(meta.get("model_kwargs") or "{}").get("backbone")
    except (ValueError, AttributeError):
        backbone = None
    if given and saved and given not in (saved, backbone):
        what = f"{saved} (backbone {backbone})" if backbone else saved
        raise ValueError(f"{flag} {given}, but {path} was saved from {what} (its metadata): drop {flag} or pass "
                         f"{flag} {backbone or saved}")
    return given or saved


def exit_classifier_keys(model: nn.Module) -> List[str]:
    """State-dict keys of the exit classifiers: the linear layers that output ``num_classes`` logits."""
    net = unwrap_model(model)
    num_classes = getattr(net, "num_classes", None)
    keys = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            keys += [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return keys


def check_pretrained(model: nn.Module, state: Mapping[str, Tensor], path: PathLike,
                     model_name: Optional[str] = None) -> List[str]:
    """Check that ``state`` (read from ``path``) can initialise ``model`` for fine-tuning; return the
    exit-classifier keys whose shapes differ (another ``num_classes``: they keep their fresh init).

    Anything else that differs -- missing, unexpected or differently shaped tensors outside the exit
    classifiers -- raises a :class:`~timm_l2w.errors.CheckpointError` (a ``ValueError``) naming the model the
    file was saved from when its metadata says (``model_name`` names ``model`` in the message).
    """
    net = unwrap_model(model)
    own = net.state_dict()
    model_name = model_name or (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or type(net).__name__
    heads = set(exit_classifier_keys(net))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    fresh = [k for k in reshaped if k in heads and state[k].shape[1:] == own[k].shape[1:]]
    wrong = [k for k in reshaped if k not in fresh]
    if missing or unexpected or wrong:
        saved_from = read_metadata(path).get("model")
        parts = [f"{len(x)} {what}, e.g. {x[0]}" for x, what in
                 ((missing, "missing"), (unexpected, "unexpected"), (wrong, "with other shapes")) if x]
        if wrong:
            parts[-1] += f" {tuple(state[wrong[0]].shape)} in the file vs {tuple(own[wrong[0]].shape)} here"
        if saved_from and saved_from != model_name:
            fix = (f"it is a checkpoint of another architecture or configuration, saved from {saved_from} "
                   f"(its metadata): pass --model {saved_from}")
        else:
            fix = ("it is a checkpoint of another architecture or configuration: pick the --model it was "
                   "trained as (only the exit classifiers may differ, for another number of classes)")
        raise CheckpointError(f"'{path}' does not fit {model_name} outside the exit classifiers "
                              f"({'; '.join(parts)}): {fix}", path)
    return fresh


def load_pretrained(model: nn.Module, path: str) -> List[str]:
    """Load weights from a safetensors file (or a release ``.pth``/``.pth.tar``, read with
    ``weights_only=True``) into ``model``. Only the exit classifiers may differ in shape (another
    ``num_classes``): they keep the model's fresh initialisation and their names are returned. Any
    other difference (missing, unexpected or differently shaped tensors: another architecture or
    configuration, named from the file's metadata) and unusable weights (NaN/inf, an integer dtype
    where the model has floating point) are a :class:`~timm_l2w.errors.CheckpointError`
    (a ``ValueError``), raised before the model is touched."""

    state = load_state_dict(path)  # safetensors or weights_only torch.load; 'module.' prefixes removed
    own = model.state_dict()
    skipped = check_pretrained(model, state, path)  # the exit classifiers of another num_classes
    check_weights({k: v for k, v in state.items() if k not in skipped}, own, Path(path))  # dtypes, finite values
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped



def _infer_num_classes(model_name: str, state_dict: Mapping[str, Tensor], **model_kwargs: Any) -> Optional[int]:
    """Classes of the checkpoint's first classifier named by the model's pretrained cfg, if any."""
    import timm

    with torch.device("meta"):
        probe = timm.create_model(model_name, **model_kwargs)
    names = probe.pretrained_cfg.get("classifier") or ()
    for name in (names,) if isinstance(names, str) else names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def convert_release_checkpoint(
        in_path: PathLike,
        out_path: PathLike,
        model: Union[str, nn.Module] = "msdnet_l2w",
        num_classes: Optional[int] = None,
        **model_kwargs: Any,
) -> Path:
    """Convert a released ``.pth.tar`` checkpoint to ``.safetensors`` after checking it fits ``model``.

    ``model`` is a timm model name (built with ``num_classes`` and ``model_kwargs``; ``num_classes`` is read
    from the checkpoint's classifier when not given) or a model instance. Returns ``out_path``.
    """
    import timm

    state_dict = load_state_dict(in_path)
    if isinstance(model, str):
        name = model
        if num_classes is None:
            num_classes = _infer_num_classes(name, state_dict, **model_kwargs)
        if num_classes is not None:
            model_kwargs["num_classes"] = num_classes
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = timm.create_model(name, **model_kwargs)
    else:
        if num_classes is not None or model_kwargs:
            raise TypeError("num_classes / model kwargs only apply when model is a name: pass model='msdnet_l2w'")
        name = getattr(unwrap_model(model), "pretrained_cfg", {}).get("architecture", type(model).__name__)
    check_weights(state_dict, unwrap_model(model).state_dict(), Path(in_path))  # dtypes, finite values
    check_state_dict(model, state_dict)
    order = list(unwrap_model(model).state_dict())
    metadata = {"model": name, "num_classes": getattr(unwrap_model(model), "num_classes", None),
                "source": Path(in_path).name}
    return save_safetensors({k: state_dict[k] for k in order}, out_path, metadata=metadata)

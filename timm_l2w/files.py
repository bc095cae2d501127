"""Files: atomic writes, reading weights files, and the digest that names a set of weights.

A write leaves a file either its old self or completely new, never half-written.

Weights files are ``.safetensors`` or PyTorch checkpoints read with ``weights_only=True`` and
``argparse.Namespace`` as the one allowed class, as timm's own loader reads them: a plain ``state_dict``, a
checkpoint dict with a ``'state_dict'`` / ``'model'`` entry, or a training checkpoint of timm's
``CheckpointSaver`` (``.pth.tar``: ``arch``, ``args``, ``state_dict``, ``state_dict_ema``, ...), whose ``arch`` /
``args`` :func:`read_metadata` turns into the same record a safetensors file's metadata holds.

The new file gets the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less the
process umask), or keeps those of the file it replaces; the temporary file's private ``0o600`` never
reaches the final name, so a group can read a shared model or results file when the umask allows it.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import pickle
import stat
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, first_line

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "csv_text", "load_state_dict",
           "read_metadata", "weights_digest", "preprocess_record", "EMA_KEYS", "PREPROCESS_KEYS"]

NESTED_KEYS = ("state_dict", "model")  # where training scripts put the weights inside a checkpoint dict
EMA_KEYS = ("state_dict_ema", "model_ema")  # where timm's checkpoints keep the EMA weights (as timm's loader looks)
PREPROCESS_KEYS = ("crop_pct", "interpolation", "mean", "std")  # eval preprocessing a weights file records
_READABLE = ("pass a .safetensors file, a state dict saved with torch.save, or a timm training checkpoint "
             "(the .pth.tar of timm's CheckpointSaver)")
_SHOWN = 25  # keys named in a message
PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced, given the final file's
    permissions (:func:`_final_mode`) and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _final_mode(path: Path) -> int:
    """The mode of the file ``path`` replaces, else ``0o666`` less the umask (what ``open()`` gives)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        return 0o666 & ~umask


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """UTF-8 text version of :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, payload: Any) -> Path:
    """Indented JSON, written atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """A CSV table (header from the first row's keys) as text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------- reading weights files


def _unwrap_checkpoint(obj: Any, path: Path) -> Mapping[str, Any]:
    while isinstance(obj, Mapping):
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = sorted(map(str, obj))[:_SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds no state dict of tensors (found {found}): pass a file saved from model.state_dict() "
            f"or a checkpoint dict with one of the keys {NESTED_KEYS}")
    return obj


def _torch_load(path: Path, map_location: Union[str, torch.device]) -> Any:
    """``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` (timm's checkpoints keep their
    arguments in one; torch >= 2.5), memory-mapped where the file format allows (not the legacy pre-zip format)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)


def _unsafe_globals(path: Path) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a torch.save file at all
        return []


def _read_torch_file(path: Path, map_location: Union[str, torch.device]) -> Any:
    """The object a PyTorch checkpoint holds; a :class:`CheckpointError` of one line when it cannot be read."""
    try:
        return _torch_load(path, map_location)
    except pickle.UnpicklingError as e:
        found = _unsafe_globals(path)
        if found:
            raise CheckpointError(
                f"{path} holds Python objects that weights_only loading refuses ({', '.join(found[:_SHOWN])}): it is "
                f"not a weights file; {_READABLE}. If you trust it, load it yourself and save its state_dict",
                path) from e
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save file, or a damaged one): "
                              f"{_READABLE}", path) from e
    except Exception as e:  # noqa: BLE001 - RuntimeError, OSError, EOFError, BadZipFile, ... from a damaged file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)}): it may be truncated "
                              f"or corrupt; save or download it again, or {_READABLE}", path) from e


def _ema_entry(obj: Any, path: Path) -> Any:
    """The EMA weights of a timm checkpoint dict (``'state_dict_ema'``, or ``'model_ema'``)."""
    found = next((obj[k] for k in EMA_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
    if found is None:
        holds = sorted(map(str, obj))[:_SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path} has no EMA weights (no '{EMA_KEYS[0]}' entry; it holds {holds}): drop "
                              "--use-ema (use_ema=False), or pass a checkpoint of a run with an EMA (timm's train.py "
                              "--model-ema)", path)
    return found


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu",
                    use_ema: bool = False) -> Dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` or a PyTorch checkpoint (``weights_only=True``, with
    ``argparse.Namespace`` allowed as timm's loader allows it).

    A nested ``'state_dict'`` / ``'model'`` entry is unwrapped (``use_ema``: the ``'state_dict_ema'`` of a timm
    checkpoint instead, an error when there is none) and ``module.`` (DDP) / ``_orig_mod.`` (torch.compile)
    prefixes are stripped, as timm's ``clean_state_dict`` does.
    """
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if use_ema:
            raise CheckpointError(f"{path} is a safetensors file: it holds one set of weights, no EMA ones: drop "
                                  "--use-ema (timm-l2w train --model-ema writes the EMA weights to their own file, "
                                  "model_ema.safetensors: pass that one)", path)
        try:
            obj: Any = load_file(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... : whatever a damaged file raises
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)}): it may be "
                                  "truncated or corrupt; save or download it again") from e
    else:
        obj = _read_torch_file(path, map_location)
        if use_ema:
            obj = _ema_entry(obj, path)
    return dict(clean_state_dict(dict(_unwrap_checkpoint(obj, path))))


def _timm_record(obj: Any) -> Dict[str, str]:
    """What a timm training checkpoint says about its model and data, as safetensors metadata says it: ``model``
    (``args.model``, else a registered ``arch``), ``model_kwargs`` (``args.model_kwargs`` with ``global_pool`` /
    ``bn_eps`` when set; drop rates change nothing at evaluation), ``num_classes``, ``in_chans``, ``input_size``
    (a square side) and the eval preprocessing its arguments set (``crop_pct``, ``interpolation``, ``mean``,
    ``std``)."""
    import timm

    if not isinstance(obj, Mapping):
        return {}
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    meta: Dict[str, str] = {}
    arch = obj.get("arch")
    name = args.get("model") or (arch if isinstance(arch, str) and timm.is_model(arch) else None)
    if isinstance(name, str) and name:
        meta["model"] = name
    kwargs = dict(args.get("model_kwargs") or {})
    for flag, key in (("gp", "global_pool"), ("bn_eps", "bn_eps")):
        if args.get(flag) is not None:
            kwargs.setdefault(key, args[flag])
    if kwargs:
        meta["model_kwargs"] = json.dumps(kwargs, default=str)
    size = args.get("input_size")
    chans = args.get("in_chans") or (size[0] if isinstance(size, (list, tuple)) and len(size) == 3 else None)
    side = (size[1] if isinstance(size, (list, tuple)) and len(size) == 3 and size[1] == size[2]
            else args.get("img_size"))
    for key, value in (("num_classes", args.get("num_classes")), ("in_chans", chans), ("input_size", side)):
        if isinstance(value, int) and value > 0:
            meta[key] = str(value)
    meta.update(preprocess_record(args))
    return meta


def preprocess_record(config: Mapping[str, Any]) -> Dict[str, str]:
    """The eval preprocessing of a data config (timm's ``resolve_data_config`` keys, or train.py's arguments) as a
    weights file records it (:data:`PREPROCESS_KEYS`, strings; keys missing or empty are left out)."""
    record: Dict[str, str] = {}
    if config.get("crop_pct"):
        record["crop_pct"] = str(float(config["crop_pct"]))
    if config.get("interpolation"):
        record["interpolation"] = str(config["interpolation"])
    for key in ("mean", "std"):
        if isinstance(config.get(key), (list, tuple)) and config[key]:
            record[key] = json.dumps([float(v) for v in config[key]])
    return record


@functools.lru_cache(maxsize=8)
def _checkpoint_record(path: str, mtime_ns: int, size: int) -> Tuple[Tuple[str, str], ...]:
    """:func:`_timm_record` of the timm checkpoint at ``path``, read once per version of the file (its
    modification time and size are part of the key): eval asks for it several times."""
    return tuple(_timm_record(_torch_load(Path(path), "cpu")).items())


def read_metadata(path: PathLike) -> Dict[str, str]:
    """What a weights file records (``{}`` for other or unreadable files): a ``.safetensors`` file's metadata, or
    for a timm training checkpoint (``.pth.tar`` of ``CheckpointSaver``) the same keys read from its ``arch`` and
    ``args``: ``model``, ``model_kwargs``, ``num_classes``, ``in_chans``, ``input_size`` and the preprocessing
    (``crop_pct``, ``interpolation``, ``mean``, ``std``) its arguments set."""
    path = Path(path)
    if not path.is_file():
        return {}
    if path.suffix != ".safetensors":
        try:
            found = path.stat()
            return dict(_checkpoint_record(str(path.resolve()), found.st_mtime_ns, found.st_size))
        except Exception:  # noqa: BLE001 - unreadable files are reported by load_state_dict
            return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_state_dict
        return {}


def weights_digest(weights: Union[nn.Module, Mapping[str, Any]]) -> str:
    """The sha256 (hex) of a model's ``state_dict()`` or of a state dict: what ties an exit policy to the weights
    it was calibrated on.

    Per tensor, in sorted name order: its name, dtype and shape, then the raw bytes of the contiguous CPU tensor;
    names are cleaned as :func:`load_state_dict` cleans them (``module.`` / ``_orig_mod.`` prefixes), and entries
    that are not tensors (a module's extra state) are left out. The same weights give the same digest on any device
    and in any memory layout; a changed value, dtype or shape gives another.
    """
    from timm.models import clean_state_dict

    state = clean_state_dict(dict(weights.state_dict() if isinstance(weights, nn.Module) else weights))
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, Tensor):
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}\0{str(tensor.dtype).replace('torch.', '')}\0{list(tensor.shape)}\0{data.size}\0"
                      .encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()

"""Files: atomic writes, reading weights files, and the digest that names a set of weights.

A write leaves a file either its old self or completely new, never half-written.

The new file gets the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less the
process umask), or keeps those of the file it replaces; the temporary file's private ``0o600`` never
reaches the final name, so a group can read a shared model or results file when the umask allows it.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import stat
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "csv_text", "load_state_dict",
           "read_metadata", "weights_digest"]

NESTED_KEYS = ("state_dict", "model")  # where training scripts put the weights inside a checkpoint dict
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


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` or a PyTorch checkpoint (``weights_only=True``).

    A nested ``'state_dict'`` / ``'model'`` entry is unwrapped and ``module.`` (DDP) / ``_orig_mod.``
    (torch.compile) prefixes are stripped.
    """
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... : whatever a damaged file raises
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}): it may be truncated or "
                                  "corrupt; save or download it again") from e
    else:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path} holds Python objects that weights_only loading refuses ({str(e).splitlines()[0]}): "
                "if you trust the file, re-save only its state_dict (tensors) and load that") from e
        except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, BadZipFile, ... from a damaged file
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}): it may "
                                  "be truncated or corrupt; save or download it again") from e
    return dict(clean_state_dict(dict(_unwrap_checkpoint(obj, path))))


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The metadata a ``.safetensors`` file was saved with (``{}`` for other or unreadable files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
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

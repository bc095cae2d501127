"""Atomic file writes: a file is either its old self or completely new, never half-written.

The new file gets the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less the
process umask), or keeps those of the file it replaces; the temporary file's private ``0o600`` never
reaches the final name, so a group can read a shared model or results file when the umask allows it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "csv_text"]


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

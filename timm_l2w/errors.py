"""The errors timm_l2w raises for bad input: each a ``ValueError`` (``SplitError``: a ``TypeError``) whose
message says what was wrong and what to pass instead; the commands print it and exit with code 2.

* :class:`SettingError`: a setting that is not finite, outside its range or not an integer.
* :class:`LabelError`: labels that are not integer class indices in ``[0, num_classes - 1]``.
* :class:`CheckpointError`: a weights file that cannot be read or holds unusable weights (NaN/inf,
  a non-floating dtype where the model has floating point, wrong keys or shapes:
  :class:`StateDictMismatchError`, one of them).
* :class:`ResumeError`: a training checkpoint folder that cannot be resumed; it names the next
  older complete checkpoint when there is one.
* :class:`SplitError`: a timm backbone that cannot be cut into stages at the chosen exits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

__all__ = ["SettingError", "LabelError", "CheckpointError", "ResumeError", "StateDictMismatchError", "SplitError",
           "first_line"]

PathLike = Union[str, os.PathLike]


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
    def from_exception(cls, checkpoint: PathLike, err: BaseException,
                       older: Optional[PathLike] = None) -> "ResumeError":
        """Wrap whatever reading the checkpoint raised: a :class:`CheckpointError`'s own message, else the
        first line of the loader's. A :class:`SettingError` (other flags than the run that wrote it) asks
        for the same flags instead of offering an older checkpoint (written with the same flags)."""
        if isinstance(err, ResumeError):
            return err
        if isinstance(err, SettingError):
            return cls(checkpoint, str(err), fix="resume with the flags it was trained with, or use another --output")
        return cls(checkpoint, str(err) if isinstance(err, CheckpointError) else first_line(err), older)


def first_line(err: BaseException) -> str:
    """``'TypeName: first line of the message'`` (at most 300 characters, terminal colour codes removed)."""
    import pickle
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    text = f"{type(err).__name__}: {(plain.splitlines() or ['?'])[0][:300]}"
    if isinstance(err, pickle.UnpicklingError):
        text += " (weights_only loading refused it: the file is damaged or holds code)"
    return text


class StateDictMismatchError(CheckpointError):
    """Keys or shapes of a state dict do not match a model; ``missing``, ``unexpected``, ``mismatched``
    (a :class:`CheckpointError`, hence a ``ValueError``)."""

    def __init__(self, message: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


class SplitError(TypeError):
    """The backbone cannot be cut into stages (the message says why and what to use instead)."""

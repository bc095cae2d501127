"""How a training run stops early: :class:`TrainingStopped`, and the fault hook the reliability tests
stop a run with at a chosen point (the update, half-way through a checkpoint, the end of an epoch)."""
from __future__ import annotations

import os
import signal

FAULT_ENV = "TIMM_L2W_FAULT"


class TrainingStopped(RuntimeError):
    """Raised when training stops early (signal, too many non-finite losses); a checkpoint was saved."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def fault_point(point: str, step: int) -> None:
    """Test hook for the reliability tests: with ``TIMM_L2W_FAULT=POINT:STEP:SIGNAL`` in the environment
    (e.g. ``checkpoint:4:KILL``) this process sends itself ``SIGSIGNAL`` when it reaches ``POINT``
    (``update``: between forward and optimizer step; ``checkpoint``: half-way through writing a checkpoint;
    ``epoch_end``: epoch logged, its checkpoint not yet written) at step ``STEP``. Off when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, at, sig = spec.split(":")
    if name == point and int(at) == step:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))

"""The meta step's arithmetic beside the real step's mixed precision (``L2W(meta_precision=...)``).

``'fp32'`` (default): autocast off for the whole meta step, so it runs in the parameters' dtype while
the real step keeps bf16/fp16 (the training half's outputs are reused only when they are in that dtype,
else recomputed). ``'amp'``: the meta step's forwards run under the real step's autocast
(``accelerator.autocast()``, or the autocast around :meth:`~timm_l2w.meta.L2W.loss` without an
accelerator), with a dynamic loss scale (``torch.amp.GradScaler``) under fp16. Under bf16 the ``'amp'``
meta gradient is mostly rounding noise early in training (docs/precision.md).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..validation import check_choice

__all__ = ["META_PRECISIONS", "MetaPrecision"]

META_PRECISIONS = ("fp32", "amp")  # the meta step's arithmetic under mixed precision (L2W(meta_precision=...))


class MetaPrecision:
    """One :class:`~timm_l2w.meta.L2W` hook's precision policy (see the module docstring): the contexts of
    its meta step, its loss scaler (created on first use, only for ``'amp'`` under fp16) and whether the
    user's training-half outputs fit it."""

    def __init__(self, policy: str, accelerator: Any = None, dtype: Optional[torch.dtype] = None):
        self.policy = check_choice(policy, META_PRECISIONS, "meta_precision")
        self.accelerator, self.dtype = accelerator, dtype
        self.scaler: Optional[torch.amp.GradScaler] = None
        self._scaler_state: Optional[Dict[str, Any]] = None  # loaded before the scaler exists

    def real_autocast(self) -> ContextManager:
        """The real step's autocast (the accelerator's; none without one)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def contexts(self, device: torch.device) -> Tuple[ContextManager, Callable[[], ContextManager]]:
        """(context around the whole meta step, autocast for its forwards)."""
        if self.policy == "fp32":
            return torch.autocast(device.type, enabled=False), contextlib.nullcontext
        return contextlib.nullcontext(), self.real_autocast

    def scaler_for(self, device: torch.device) -> Optional[torch.amp.GradScaler]:
        """The meta step's loss scaler: only for ``'amp'`` when the real step's autocast is fp16."""
        if self.policy != "amp":
            return None
        if self.scaler is None:
            with self.real_autocast():
                fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
            if not fp16:
                return None
            self.scaler = torch.amp.GradScaler(device.type)
            if self._scaler_state:
                self.scaler.load_state_dict(self._scaler_state)
        return self.scaler

    def reusable(self, outputs: Sequence[Tensor]) -> bool:
        """Whether the user's training-half outputs fit the meta step's precision: always under ``'amp'``;
        under ``'fp32'`` only when no autocast produced them (accelerate casts autocast outputs back to
        fp32, so its ``mixed_precision`` is checked, not just the dtype)."""
        if self.policy == "amp":
            return True
        mixed = getattr(self.accelerator, "mixed_precision", "no") not in (None, "no")
        return (not mixed and not torch.is_autocast_enabled(outputs[0].device.type)
                and all(o.dtype == self.dtype for o in outputs))

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        self._scaler_state = state
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

"""The plug through which an accelerator runs the :class:`~timm_l2w.meta.L2W` hook's meta update its own
way: the hook calls it when one is installed (:attr:`L2W.meta_runner`) and never imports an accelerator.
:func:`timm_l2w.accel.capture_meta_updates` installs CUDA graphs through it."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Tuple

from torch import Tensor

__all__ = ["MetaUpdateRunner"]


class MetaUpdateRunner(Protocol):
    """The plug through which an accelerator runs the hook's meta update instead of the eager call
    (:func:`timm_l2w.accel.capture_meta_updates` installs CUDA graphs as :attr:`L2W.meta_runner`)."""

    def stage(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The loader batch as the runner reads it (e.g. copied into static buffers): :meth:`L2W.split` halves it."""

    def run(self, half: int, update: Callable[[], Any]) -> bool:
        """Run ``update`` (the meta update of the staged ``half`` with its own training forward); False: it
        did not (e.g. turned off), so the hook runs the meta update eagerly."""

"""Gradient clipping as a differentiable function: what timm's ``dispatch_clip_grad`` does to ``.grad``.

The three modes are timm's (``timm.utils.dispatch_clip_grad(parameters, value, mode)``, timm's
train.py ``--clip-grad/--clip-mode``):

- ``'norm'``: ``torch.nn.utils.clip_grad_norm_`` (also what ``accelerator.clip_grad_norm_`` runs):
  every gradient times ``min(1, max_norm / (total_norm + 1e-6))``, ``total_norm`` the 2-norm over all
  the gradients together;
- ``'value'``: ``torch.nn.utils.clip_grad_value_``: each entry clamped to ``[-value, value]``;
- ``'agc'``: ``timm.utils.adaptive_clip_grad`` (adaptive gradient clipping): a gradient whose unit-wise
  norm exceeds ``value * max(|w|, 1e-3)`` (unit-wise) is scaled down to it.

Here they are out of place and keep the graph, so the virtual step differentiates through the clip.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from timm.utils.agc import unitwise_norm
from torch import Tensor

__all__ = ["CLIP_MODES", "clip_gradients"]

CLIP_MODES = ("norm", "value", "agc")


def clip_gradients(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor], value: float,
                   mode: str = "norm") -> List[Optional[Tensor]]:
    """``grads`` (None: no gradient, left out) clipped as ``dispatch_clip_grad(params, value, mode)`` would
    clip the parameters' ``.grad``; ``params`` (their values; only ``'agc'`` reads them) in the same order."""
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    if mode == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in present]), 2.0)
        coef = torch.clamp(value / (total + 1e-6), max=1.0)
        return [None if g is None else g * coef.to(g.device) for g in grads]
    if mode == "value":
        return [None if g is None else g.clamp(-value, value) for g in grads]
    if mode == "agc":
        return [None if g is None else _agc(g, p.detach(), value) for g, p in zip(grads, params)]
    raise ValueError(f"unknown clip mode {mode!r}: use one of {', '.join(CLIP_MODES)} (timm's dispatch_clip_grad)")


def _agc(grad: Tensor, param: Tensor, clip_factor: float, eps: float = 1e-3) -> Tensor:
    """One parameter's gradient after ``timm.utils.adaptive_clip_grad`` (its default ``eps``, 2-norm)."""
    max_norm = unitwise_norm(param).clamp(min=eps).mul(clip_factor)
    grad_norm = unitwise_norm(grad)
    return torch.where(grad_norm < max_norm, grad, grad * (max_norm / grad_norm.clamp(min=1e-6)))

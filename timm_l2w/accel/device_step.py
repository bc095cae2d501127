"""The real step skipped on the device: a non-finite training loss costs no host synchronisation.

``timm-l2w train`` skips an update whose loss is non-finite (model, BatchNorm statistics and optimizer state
untouched). Deciding that on the host reads the loss back every update, which stalls a GPU that is fed
by launches. Here the decision stays a device tensor: the optimizer's fused kernel is given
``found_inf`` (as ``torch.amp.GradScaler`` gives it) and skips its update on the device, and the buffers
are put back by a select. The result equals the host-side skip exactly.

Torch's fused kernels exist for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (CPU and CUDA); fused and
per-tensor SGD / Adam updates agree (bit for bit on the CPU). A fused SGD's first step creates its momentum
buffers, so the device-side skip starts after one step decided on the host.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from ..optim_step import unwrap_optimizer

__all__ = ["FUSED_OPTIMIZERS", "fused_blocker", "use_fused", "step_unless", "restore_unless"]

FUSED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return unwrap_optimizer(optimizer)


def fused_blocker(optimizer: Any) -> Optional[str]:
    """Why ``optimizer`` cannot skip its step on the device (None: it can)."""
    opt = _inner(optimizer)
    if type(opt) not in FUSED_OPTIMIZERS:
        return f"{type(opt).__name__} has no fused kernel in torch (SGD, Adam and AdamW have)"
    params = [p for g in opt.param_groups for p in g["params"]]
    devices = {p.device.type for p in params}
    if not devices <= {"cpu", "cuda"} or not all(p.is_floating_point() for p in params):
        return f"the fused kernel needs floating-point parameters on the CPU or CUDA, got {sorted(devices)}"
    if any(g.get("differentiable") for g in opt.param_groups):
        return "a differentiable optimizer has no fused kernel"
    return None


def use_fused(optimizer: Any) -> None:
    """Switch ``optimizer`` (a torch SGD / Adam / AdamW, see :func:`fused_blocker`) to its fused kernel."""
    opt = _inner(optimizer)
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, False
    opt.defaults.update(fused=True, foreach=False)
    opt._step_supports_amp_scaling = True  # what the fused classes set: GradScaler passes found_inf too


def step_unless(optimizer: Any, skip: Tensor) -> None:
    """``optimizer.step()``, skipped on the device where ``skip`` (a 0-dim bool tensor) is True.

    The optimizer must use its fused kernel (:func:`use_fused`) and have stepped once (its state exists).
    """
    opt = _inner(optimizer)
    opt.found_inf = skip.to(torch.float32)
    try:
        optimizer.step()
    finally:
        del opt.found_inf


def restore_unless(groups: Sequence[Sequence[Tensor]], kept: Sequence[Tensor], keep_new: Tensor) -> None:
    """Put the tensors of ``groups`` back to their flat snapshots ``kept`` (one per group, as
    ``torch.cat`` of the flattened tensors) where ``keep_new`` (0-dim bool) is False; a select on the device."""
    with torch.no_grad():
        for group, flat in zip(groups, kept):
            now = torch.cat([t.reshape(-1) for t in group])
            chosen = torch.where(keep_new, now, flat)
            pieces: List[Tensor] = list(chosen.split([t.numel() for t in group]))
            torch._foreach_copy_(list(group), [p.view_as(t) for p, t in zip(pieces, group)])

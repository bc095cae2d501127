"""The real update as the virtual step models it (docs/method.md §5, "The virtual step of any optimizer").

The training loop turns the training half's gradient ``g`` into theta' in three steps, and the virtual
step repeats them, differentiably in ``g``: gradient accumulation (the optimizer's input is
``accumulated + g / accum_steps``), the loop's clipping (timm's ``dispatch_clip_grad``), then the
optimizer's own rule (:func:`timm_l2w.optim_step.virtual_step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..optim_step import CLIP_MODES, clip_gradients, grad_coefficients, virtual_step
from ..validation import Range, check_choice, check_number

__all__ = ["RealUpdate", "check_clip", "clip_mask", "accelerate_accum_steps", "accumulated_grads",
           "check_window_start"]


@dataclass
class RealUpdate:
    """How the real update turns the training half's gradient ``g`` into theta': the optimizer input is
    ``accumulated + g / accum_steps`` (gradient accumulation), clipped as the loop clips, then the
    optimizer's rule. Every step is differentiable in ``g``."""

    optimizer: Any
    params: List[Tensor]  # the model's parameters, in backend order
    accumulated: Optional[List[Optional[Tensor]]] = None  # .grad of the window's earlier micro-batches
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    clip_mask: Optional[List[bool]] = None  # which parameters the loop clips (None: all of them)

    def gradients(self, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """What the optimizer sees: (accumulated +) this micro-batch's gradient / accum_steps, (clipped)."""
        grads = list(grads)
        if self.accum_steps != 1:
            grads = [None if g is None else g / self.accum_steps for g in grads]
        if self.accumulated is not None:
            grads = [a if g is None else g if a is None else a + g for a, g in zip(self.accumulated, grads)]
        if self.clip_grad is not None:
            clipped = [i for i in range(len(grads)) if self.clip_mask is None or self.clip_mask[i]]
            new = clip_gradients([grads[i] for i in clipped], [self.params[i] for i in clipped], self.clip_grad,
                                 self.clip_mode)
            for i, g in zip(clipped, new):
                grads[i] = g
        return grads

    def step(self, grads: Sequence[Optional[Tensor]], values: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """theta' (from ``values``, default the parameters) for this micro-batch's gradient ``grads``."""
        return virtual_step(self.optimizer, self.params, self.gradients(grads), values)

    def coefficients(self) -> Optional[List[Optional[float]]]:
        """``d theta' / d g`` per parameter when it is one number (SGD without clipping), else None."""
        if self.clip_grad is not None:
            return None
        coefficients = grad_coefficients(self.optimizer, self.params)
        if coefficients is None or self.accum_steps == 1:
            return coefficients
        return [None if c is None else c / self.accum_steps for c in coefficients]


def check_clip(clip_grad: Optional[float], clip_mode: str) -> Tuple[Optional[float], str]:
    """``(clip_grad, clip_mode)`` checked: timm's ``--clip-grad`` / ``--clip-mode``."""
    clip_mode = check_choice(clip_mode, CLIP_MODES, "clip_mode")
    if clip_grad is not None:
        clip_grad = check_number(clip_grad, "clip_grad", Range(0, low_open=True, hint=(
            "the max norm ('norm'), max |value| ('value') or clip factor ('agc'), as timm's --clip-grad; "
            "None: no clipping")))
    return clip_grad, clip_mode


def clip_mask(params: Sequence[Tensor], clip_parameters: Optional[Sequence[Tensor]]) -> Optional[List[bool]]:
    """Which of ``params`` the loop clips: those in ``clip_parameters`` (the list it hands timm's
    ``dispatch_clip_grad``, e.g. ``model_parameters(model, exclude_head=True)`` under ``'agc'``); None: all."""
    if clip_parameters is None:
        return None
    chosen = {id(p) for p in clip_parameters}
    mask = [id(p) in chosen for p in params]
    if sum(mask) != len(chosen):
        raise ValueError(f"clip_parameters holds {len(chosen) - sum(mask)} tensor(s) that are not parameters of the "
                         "model: pass the parameters the loop clips (e.g. task.get_clip_parameters(...) or "
                         "timm.utils.model_parameters(model, exclude_head=...)), or None for all of them")
    return mask


# -- the accumulation window as the hook sees it ------------------------------------------------
def accelerate_accum_steps(accelerator: Any) -> int:
    """Micro-batches per update under accelerate's gradient accumulation (1 without an accelerator)."""
    return int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1) if accelerator is not None else 1


def accumulated_grads(params: Sequence[Tensor], accelerator: Any = None) -> List[Optional[Tensor]]:
    """The gradients the window's earlier micro-batches left in ``.grad`` of ``params`` (unscaled from
    accelerate's fp16 loss scale)."""
    scaler = getattr(accelerator, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    grads = [p.grad for p in params]
    return [None if g is None else g.detach() / scale if scale != 1.0 else g.detach() for g in grads]


def check_window_start(params: Sequence[Tensor]) -> None:
    """At the first micro-batch of an accumulation window ``.grad`` must be empty (or zero): whatever is
    there joins the update, and a ``zero_grad()`` between this loss and its backward would drop what the
    virtual step counted."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and bool(torch.stack([g.ne(0).any() for g in grads]).any()):
        raise RuntimeError(
            "gradient accumulation: the model's .grad is not zero at the first micro-batch of an "
            "accumulation window, so the update would include gradients from before it (and a zero_grad() "
            "between loss and backward would drop the micro-batches the meta step counted). Call "
            "optimizer.zero_grad() right after optimizer.step(), as accelerate's accumulate() loop does "
            "(backward, step, zero_grad), not before backward")

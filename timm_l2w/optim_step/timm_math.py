"""The shared pieces of the timm.optim rules (:mod:`timm_l2w.optim_step.timm_rules`): state reads, the
square root with a finite derivative at 0, timm's scaled adds, caution, decoupled decay and clipping.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Union

import torch
from torch import Tensor

__all__ = ["Rule", "Scale", "LOW_PRECISION", "state_number", "safe_sqrt", "add_scaled", "addcdiv_scaled", "cautious",
           "decay_scale", "state_moment", "rms_clip_denom", "where_positive", "vector_norm", "scalar_dtype"]

Rule = Callable[[List[Tensor], List[Tensor], List[Dict[str, Any]], Dict[str, Any]], List[Tensor]]
Scale = Union[float, Tensor]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_number(x: Any) -> float:
    """A step count or other state scalar that does not depend on the gradient, as a Python number."""
    return float(x) if isinstance(x, Tensor) else x


def safe_sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()`` exactly, with derivative 0 (not inf, hence NaN) where ``x == 0``."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, x).sqrt())


def add_scaled(t: Tensor, u: Tensor, scale: Scale) -> Tensor:
    """``t + scale * u`` as timm computes it (a tensor scale multiplies, a number is an ``alpha``)."""
    return t + u * scale if torch.is_tensor(scale) else t.add(u, alpha=scale)


def addcdiv_scaled(t: Tensor, num: Tensor, den: Tensor, scale: Scale) -> Tensor:
    """``t + scale * num / den`` as timm computes it."""
    return t + num / den * scale if torch.is_tensor(scale) else t.addcdiv(num, den, value=scale)


def cautious(update: Tensor, grad: Tensor) -> Tensor:
    """The 'Cautious Optimizers' mask (arXiv:2411.16085) as timm applies it: keep the entries whose sign
    agrees with the gradient, rescaled by their share (at least 1e-3). The mask is piecewise constant."""
    mask = (update * grad > 0).to(grad.dtype)
    return update * (mask / mask.mean().clamp(min=1e-3))


def decay_scale(group: Dict[str, Any], lr: Scale) -> Scale:
    """The decoupled weight decay's lr factor: lr, or lr**2 / max_lr with corrected weight decay
    (arXiv:2506.02285, timm's ``corrected_weight_decay``)."""
    return lr ** 2 / group["max_lr_snapshot"] if group.get("corrected_weight_decay", False) else lr


def state_moment(state: Dict[str, Any], key: str, like: Tensor) -> Tensor:
    """A state tensor, or the zeros timm initialises it to on the parameter's first step."""
    value = state.get(key)
    return torch.zeros_like(like) if value is None else value


def rms_clip_denom(denom: Tensor, grad: Tensor, threshold: float) -> Tensor:
    """StableAdamW update clipping (timm's ``clipping_threshold``): denom * max(1, rms(grad / denom) / thr)."""
    rms = grad.div(denom).norm() / (grad.numel() ** 0.5)
    return denom * (rms / threshold).clamp(min=1.0)


def where_positive(ok: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 1 elsewhere, with the unused branch kept finite (no NaN derivative)."""
    return torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)


def vector_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t)


def scalar_dtype() -> torch.dtype:
    """The dtype timm gives its CPU scalar state (step counts, LaProp's lr averages)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

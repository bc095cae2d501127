"""timm.optim's Adam family as differentiable rules (AdamWLegacy, NAdamW, NAdamLegacy, RAdamLegacy,
AdaBelief, Adan, Adopt, LaProp): see :mod:`timm_l2w.optim_step.timm_rules` for the contract and the tables.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import Tensor

from .timm_math import (
    LOW_PRECISION,
    add_scaled,
    addcdiv_scaled,
    cautious,
    decay_scale,
    rms_clip_denom,
    safe_sqrt,
    scalar_dtype,
    state_moment,
    state_number,
)

__all__ = ["adamw_legacy_rule", "nadamw_rule", "nadam_legacy_rule", "radam_legacy_rule", "adabelief_rule", "adan_rule",
           "adopt_rule", "laprop_rule"]


# --- Adam family -----------------------------------------------------------------------------------------


def _adamw_like(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                group: Dict[str, Any], nesterov: bool) -> List[Tensor]:
    """AdamWLegacy (``nesterov=False``) and NAdamW (``nesterov=True``: the first moment is lerped towards the
    gradient once more before the update), as timm's single-tensor step computes them."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    amsgrad, caution = group.get("amsgrad", False), group.get("caution", False)
    threshold = group.get("clipping_threshold")
    decay = 1.0 - decay_scale(group, lr) * wd
    out = []
    for p, g, state in zip(params, grads, states):
        if group.get("maximize", False):
            g = -g
        step = state_number(state.get("step", 0)) + 1
        p = p.mul(decay)
        exp_avg = state_moment(state, "exp_avg", p).lerp(g, 1 - beta1)
        exp_avg_sq = state_moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        if amsgrad:
            exp_avg_sq = torch.maximum(state_moment(state, "max_exp_avg_sq", p), exp_avg_sq)
        step_size = lr / (1 - beta1 ** step)
        if nesterov:
            exp_avg = exp_avg.lerp(g, 1 - beta1)
        denom = (safe_sqrt(exp_avg_sq) / (1 - beta2 ** step) ** 0.5).add(eps)
        if threshold is not None:
            denom = rms_clip_denom(denom, g, threshold)
        if caution:
            exp_avg = cautious(exp_avg, g)
        out.append(addcdiv_scaled(p, exp_avg, denom, -step_size))
    return out


def adamw_legacy_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                      group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.AdamWLegacy`: AdamW with amsgrad, caution, corrected weight decay, maximize and
    StableAdamW clipping (``clipping_threshold``, which makes the Jacobian per tensor)."""
    return _adamw_like(params, grads, states, group, nesterov=False)


def nadamw_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.NAdamW`: AdamW with a Nesterov first moment, caution, corrected weight decay,
    maximize, ``clipping_threshold``."""
    return _adamw_like(params, grads, states, group, nesterov=True)


def nadam_legacy_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                      group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.NAdamLegacy`: Nadam with the momentum schedule (``schedule_decay``) and L2 decay."""
    lr, wd, eps, decay = group["lr"], group["weight_decay"], group["eps"], group["schedule_decay"]
    beta1, beta2 = group["betas"]
    out = []
    for p, g, state in zip(params, grads, states):
        t = state.get("step", 0) + 1
        m_schedule = state.get("m_schedule", 1.0)
        if wd != 0:
            g = g.add(p, alpha=wd)
        momentum_t = beta1 * (1.0 - 0.5 * (0.96 ** (t * decay)))
        momentum_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * decay)))
        schedule = m_schedule * momentum_t
        schedule_next = m_schedule * momentum_t * momentum_next
        exp_avg = state_moment(state, "exp_avg", p).mul(beta1).add(g, alpha=1.0 - beta1)
        exp_avg_sq = state_moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1.0 - beta2)
        denom = (safe_sqrt(exp_avg_sq) / math.sqrt(1 - beta2 ** t)).add(eps)
        p = p.addcdiv(g, denom, value=-lr * (1.0 - momentum_t) / (1.0 - schedule))
        out.append(p.addcdiv(exp_avg, denom, value=-lr * momentum_next / (1.0 - schedule_next)))
    return out


def _radam_step_size(step: int, beta1: float, beta2: float) -> tuple:
    """RAdam's variance rectification (arXiv:1908.03265): (num_sma, lr-free step size of the adaptive update)."""
    beta2_t = beta2 ** step
    num_sma_max = 2 / (1 - beta2) - 1
    num_sma = num_sma_max - 2 * step * beta2_t / (1 - beta2_t)
    rect = math.sqrt((1 - beta2_t) * (num_sma - 4) / (num_sma_max - 4) * (num_sma - 2) / num_sma
                     * num_sma_max / (num_sma_max - 2)) if num_sma >= 5 else None
    return num_sma, rect, 1 - beta1 ** step


def radam_legacy_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                      group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.RAdamLegacy`. Like the class, it computes in float32 whatever the parameter dtype
    (float64 parameters too) and casts the result back, so it matches the real step to float32 precision."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    out = []
    for p, g, state in zip(params, grads, states):
        g, p32 = g.float(), p.float()
        step = state.get("step", 0) + 1
        exp_avg_sq = state_moment(state, "exp_avg_sq", p32).type_as(p32).mul(beta2).addcmul(g, g, value=1 - beta2)
        exp_avg = state_moment(state, "exp_avg", p32).type_as(p32).mul(beta1).add(g, alpha=1 - beta1)
        num_sma, rect, bias_correction1 = _radam_step_size(step, beta1, beta2)
        step_size = lr * rect / bias_correction1 if num_sma >= 5 else lr / bias_correction1
        if wd != 0:
            p32 = p32.add(p32, alpha=-wd * lr)
        if num_sma >= 5:
            p32 = p32.addcdiv(exp_avg, safe_sqrt(exp_avg_sq).add(eps), value=-step_size)
        else:
            p32 = p32.add(exp_avg, alpha=-step_size)
        out.append(p32.to(p.dtype))
    return out


def adabelief_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                   group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.AdaBelief`: the second moment is of ``g - m`` and gets ``eps`` added to the state
    itself every step; decoupled (``lr * wd`` or ``fixed_decay``: ``wd``) or L2 decay, amsgrad,
    RAdam-style ``rectify`` (SGD-like below 5 SMA steps if ``degenerated_to_sgd``, else no update).
    float16 / bfloat16 parameters are computed in float32 and cast back, as the class does."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    amsgrad, rectify = group["amsgrad"], group["rectify"]
    out = []
    for p, g, state in zip(params, grads, states):
        if g.dtype in LOW_PRECISION:
            g = g.float()
        p32 = p.float() if p.dtype in LOW_PRECISION else p
        step = state.get("step", 0) + 1
        if group["decoupled_decay"]:
            p32 = p32.mul(1.0 - (wd if group["fixed_decay"] else lr * wd))
        elif wd != 0:
            g = g.add(p32, alpha=wd)
        exp_avg = state_moment(state, "exp_avg", p32).lerp(g, 1 - beta1)
        residual = g - exp_avg
        exp_avg_var = state_moment(state, "exp_avg_var", p32).mul(beta2).addcmul(residual, residual, value=1 - beta2)
        exp_avg_var = exp_avg_var.add(eps)
        if not rectify:
            second = torch.maximum(state_moment(state, "max_exp_avg_var", p32), exp_avg_var) if amsgrad else exp_avg_var
            denom = (safe_sqrt(second) / math.sqrt(1 - beta2 ** step)).add(eps)
            p32 = p32.addcdiv(exp_avg, denom, value=-(lr / (1 - beta1 ** step)))
        else:
            num_sma, rect, bias_correction1 = _radam_step_size(step, beta1, beta2)
            if num_sma >= 5:
                p32 = p32.addcdiv(exp_avg, safe_sqrt(exp_avg_var).add(eps), value=-(rect / bias_correction1) * lr)
            elif group["degenerated_to_sgd"]:
                p32 = p32.add(exp_avg, alpha=-(1.0 / bias_correction1) * lr)
        out.append(p32.to(p.dtype) if p.dtype in LOW_PRECISION else p32)
    return out


def adan_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
              group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.Adan`: moments of g, of the gradient difference and of ``g + beta2 * diff``; the
    step count is the group's; a parameter's first step (or the group's) takes the previous gradient to be
    the current one (difference 0). ``no_prox``: decay ``theta *= 1 - lr * wd`` before the update, else
    the proximal ``theta / (1 + lr * wd)`` after it. Caution."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2, beta3 = group["betas"]
    step = group.get("step", 0) + 1
    step_size, step_size_diff = lr / (1.0 - beta1 ** step), lr * beta2 / (1.0 - beta2 ** step)
    bias_correction3_sqrt = math.sqrt(1.0 - beta3 ** step)
    out = []
    for p, g, state in zip(params, grads, states):
        neg_pre_grad = -g if "neg_pre_grad" not in state or step == 1 else state["neg_pre_grad"]
        diff = neg_pre_grad.add(g)
        exp_avg = state_moment(state, "exp_avg", p).lerp(g, 1 - beta1)
        exp_avg_diff = state_moment(state, "exp_avg_diff", p).mul(beta2).add(diff, alpha=1 - beta2)
        nesterov_grad = diff.mul(beta2).add(g)
        exp_avg_sq = state_moment(state, "exp_avg_sq", p).mul(beta3).addcmul(
            nesterov_grad, nesterov_grad, value=1 - beta3)
        denom = (safe_sqrt(exp_avg_sq) / bias_correction3_sqrt).add(eps)
        if group.get("caution", False):
            exp_avg = cautious(exp_avg, g)
        if group["no_prox"]:
            p = p.mul(1 - lr * wd)
        p = p.addcdiv(exp_avg, denom, value=-step_size).addcdiv(exp_avg_diff, denom, value=-step_size_diff)
        out.append(p if group["no_prox"] else p.div(1 + lr * wd))
    return out


def adopt_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
               group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.Adopt`. On a parameter's first step (empty state) ADOPT only records ``g**2`` and
    leaves the parameter unchanged (no decay either): theta' = theta, so that step passes no meta gradient.
    Later steps normalise g by the *previous* second moment (``max(sqrt(v), eps)``, independent of g), clip
    it to ``±(step - 1) ** clip_exp``, then momentum; L2 or ``decoupled`` decay, caution, maximize."""
    lr, wd, eps, clip_exp = group["lr"], group["weight_decay"], group["eps"], group["clip_exp"]
    beta1 = group["betas"][0]
    decoupled = group["decoupled"]
    out = []
    for p, g, state in zip(params, grads, states):
        if group.get("maximize", False):
            g = -g
        if wd != 0 and not decoupled:
            g = g.add(p, alpha=wd)
        if len(state) == 0:
            out.append(p.clone())  # a new tensor, like every rule's result, with no dependence on g
            continue
        step = state_number(state["step"]) + 1
        if wd != 0 and decoupled:
            p = add_scaled(p, p, -decay_scale(group, lr) * wd)
        normed = g.div(torch.clamp(state["exp_avg_sq"].sqrt(), eps))
        if clip_exp is not None:
            clip = (step - 1) ** clip_exp
            normed = normed.clamp(-clip, clip)
        exp_avg = state["exp_avg"].lerp(normed, 1 - beta1)
        if group.get("caution", False):
            exp_avg = cautious(exp_avg, g)
        out.append(add_scaled(p, exp_avg, -lr))
    return out


def laprop_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.LaProp`: momentum of the normalised gradient ``g / (sqrt(v / bc2) + eps)``, with the
    bias corrections kept as running averages of lr (``exp_avg_lr_1``) and of 1 (``exp_avg_lr_2``, a
    float32 CPU scalar unless the default dtype is float64, reproduced as such), decoupled decay after the
    update, caution, corrected weight decay."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    out = []
    for p, g, state in zip(params, grads, states):
        if state:
            lr_avg_1, lr_avg_2 = state["exp_avg_lr_1"], state["exp_avg_lr_2"]
        else:
            lr_avg_1 = torch.zeros_like(lr) if torch.is_tensor(lr) else 0.0
            lr_avg_2 = torch.zeros((), dtype=scalar_dtype(), device="cpu")
        lr_avg_1 = lr_avg_1 * beta1 + (1 - beta1) * lr
        lr_avg_2 = lr_avg_2 * beta2 + (1 - beta2)
        if torch.is_tensor(lr_avg_1):
            nonzero = lr_avg_1 != 0.0
            step_size = torch.where(nonzero, lr / torch.where(nonzero, lr_avg_1, 1.0), 0.0)
        else:
            step_size = lr / lr_avg_1 if lr_avg_1 != 0.0 else 0.0
        exp_avg_sq = state_moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        step_of_grad = g / safe_sqrt(exp_avg_sq.div(lr_avg_2)).add(eps)
        exp_avg = add_scaled(state_moment(state, "exp_avg", p).mul(beta1), step_of_grad, lr * (1 - beta1))
        if group.get("caution", False):
            exp_avg = cautious(exp_avg, g)
        p = add_scaled(p, exp_avg, -step_size)
        if wd != 0:
            p = add_scaled(p, p, -decay_scale(group, lr) * wd)
        out.append(p)
    return out

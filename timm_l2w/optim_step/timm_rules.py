"""timm.optim's optimizers as differentiable functions: one rule per class.

A rule computes theta' for the parameters of one param group exactly as the class's ``step()`` would
(its op order, step counts, bias corrections and options), but out of place and differentiably in
the gradients, so the L2W meta gradient can flow through the real optimizer's update
(docs/method.md §5). Every rule has the signature

    rule(params, grads, states, group) -> new params

with ``states`` the optimizer's per-parameter state before the step (read, never written; an empty
dict is a parameter the optimizer has not stepped yet) and ``group`` the param group (read-only).

``RULES`` maps each class to its rule; ``REFUSED`` maps the classes whose update has no useful meta
gradient to the reason. ``GLOBAL_INPUTS`` maps a class whose ``step()`` first computes something over
*all* its param groups to a function ``(optimizer, grads) -> dict`` (``grads``: the gradient of every
parameter of every group that has one); the caller merges that dict into each group it passes to the
rule. Only :class:`timm.optim.Lamb` needs it (its global gradient-norm clipping, ``max_grad_norm``).

Differentiability at points the real step does hit: ``sqrt`` of a second moment that is exactly 0
(a fresh state and a zero gradient entry) has an infinite derivative, and inf * 0 = NaN would spoil
the whole meta gradient; the rules use a square root that is exact in value and has derivative 0
where its argument is 0 (``sqrt((1 - beta2) g**2) = c |g|`` has slopes -c and c either side of
g = 0; 0 is their mean, what a central difference sees). Trust ratios (LAMB, LARS) divide by a norm
only where timm uses the ratio (both norms positive), so a zero norm gives derivative 0, never NaN.
Caution masks, clamps and ``max`` are piecewise: the rules differentiate the branch the real step
takes (ties: torch's convention). Everything works in reverse and in forward mode.

The Jacobian of theta' in the gradient is diagonal for SGDW, NAdamW, AdamWLegacy, NAdamLegacy,
RAdamLegacy, RMSpropTF, Adan, Adopt, LaProp and AdaBelief (caution's rescaling is piecewise
constant); per tensor with NAdamW's / AdamWLegacy's ``clipping_threshold`` and for Lars and Lamb's
trust ratios; Lamb's global clipping couples all the optimizer's parameters.

timm classes covered, with the ``create_optimizer_v2`` names that build them:
SGDW (sgdw, nesterovw, sgdc, csgdw, csgdc), NAdamW (nadamw, nadamc, cnadamw, cnadamc), RMSpropTF
(rmsproptf, rmsproptfw, rmsproptfc, crmsproptf), Lamb (lamb, lambc, lambw, lambcw, lambcd, clamb,
clambw), Lars (lars, larc, nlars, nlarc), Adan (adan, adanw, cadan, cadanw), Adopt (adopt, adoptw,
adoptc, cadopt, cadoptw, cadoptc), LaProp (laprop, lapropc, claprop), AdaBelief (adabelief,
radabelief), AdamWLegacy (adamwlegacy, adamc, cadamw, cadamc), NAdamLegacy (nadamlegacy),
RAdamLegacy (radamlegacy). Refused: Lion (lion, lionc, clion, clionc). Not covered (no rule, so
the virtual step does not accept them): Adafactor, AdafactorBigVision, Adahessian, AdamP, SGDP,
Kron, MADGRAD, Mars, Muon, NvNovoGrad and the Lookahead wrapper.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence, Union

import torch
from timm.optim import (
    SGDW,
    AdaBelief,
    AdamWLegacy,
    Adan,
    Adopt,
    Lamb,
    LaProp,
    Lars,
    Lion,
    NAdamLegacy,
    NAdamW,
    RAdamLegacy,
    RMSpropTF,
)
from torch import Tensor

__all__ = ["RULES", "REFUSED", "GLOBAL_INPUTS", "LAMB_CLIP_KEY", "lamb_global_inputs"]

Rule = Callable[[List[Tensor], List[Tensor], List[Dict[str, Any]], Dict[str, Any]], List[Tensor]]
Scale = Union[float, Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: the group key under which :func:`lamb_global_inputs` passes Lamb's global clip divisor to its rule
LAMB_CLIP_KEY = "clip_grad_norm"


# --- shared pieces -----------------------------------------------------------------------------------


def _number(x: Any) -> float:
    """A step count or other state scalar that does not depend on the gradient, as a Python number."""
    return float(x) if isinstance(x, Tensor) else x


def _sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()`` exactly, with derivative 0 (not inf, hence NaN) where ``x == 0``."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, x).sqrt())


def _add_scaled(t: Tensor, u: Tensor, scale: Scale) -> Tensor:
    """``t + scale * u`` as timm computes it (a tensor scale multiplies, a number is an ``alpha``)."""
    return t + u * scale if torch.is_tensor(scale) else t.add(u, alpha=scale)


def _addcdiv_scaled(t: Tensor, num: Tensor, den: Tensor, scale: Scale) -> Tensor:
    """``t + scale * num / den`` as timm computes it."""
    return t + num / den * scale if torch.is_tensor(scale) else t.addcdiv(num, den, value=scale)


def _cautious(update: Tensor, grad: Tensor) -> Tensor:
    """The 'Cautious Optimizers' mask (arXiv:2411.16085) as timm applies it: keep the entries whose sign
    agrees with the gradient, rescaled by their share (at least 1e-3). The mask is piecewise constant."""
    mask = (update * grad > 0).to(grad.dtype)
    return update * (mask / mask.mean().clamp(min=1e-3))


def _decay_scale(group: Dict[str, Any], lr: Scale) -> Scale:
    """The decoupled weight decay's lr factor: lr, or lr**2 / max_lr with corrected weight decay
    (arXiv:2506.02285, timm's ``corrected_weight_decay``)."""
    return lr ** 2 / group["max_lr_snapshot"] if group.get("corrected_weight_decay", False) else lr


def _moment(state: Dict[str, Any], key: str, like: Tensor) -> Tensor:
    """A state tensor, or the zeros timm initialises it to on the parameter's first step."""
    value = state.get(key)
    return torch.zeros_like(like) if value is None else value


def _rms_clip_denom(denom: Tensor, grad: Tensor, threshold: float) -> Tensor:
    """StableAdamW update clipping (timm's ``clipping_threshold``): denom * max(1, rms(grad / denom) / thr)."""
    rms = grad.div(denom).norm() / (grad.numel() ** 0.5)
    return denom * (rms / threshold).clamp(min=1.0)


def _where_positive(ok: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 1 elsewhere, with the unused branch kept finite (no NaN derivative)."""
    return torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t)


# --- SGD family ----------------------------------------------------------------------------------------


def sgdw_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
              group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.SGDW`: decoupled decay ``theta *= 1 - lr * wd`` first, then SGD with momentum
    (a fresh buffer is the gradient itself), nesterov, dampening, caution, maximize."""
    lr, wd, momentum, dampening = group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
    nesterov, caution = group["nesterov"], group.get("caution", False)
    decay = 1.0 - _decay_scale(group, lr) * wd
    out = []
    for p, g, state in zip(params, grads, states):
        if group.get("maximize", False):
            g = -g
        p = p.mul(decay)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else buf.mul(momentum).add(g, alpha=1 - dampening)
            if caution:
                if nesterov:
                    buf = g.add(buf, alpha=momentum)
                g = _cautious(buf, g)
            else:
                g = g.add(buf, alpha=momentum) if nesterov else buf
        out.append(p.add(g, alpha=-lr))
    return out


def lars_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
              group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.Lars`: the LARS trust ratio ``coeff * |w| / (|g| + wd |w| + eps)`` (1 when a norm is
    zero; LARC ``trust_clip``: ``min(ratio / lr, 1)``) scales ``g + wd * w`` when ``wd != 0`` or
    ``always_adapt``, then SGD momentum / nesterov. The ratio depends on |g|: its Jacobian is per tensor."""
    lr, wd, momentum, dampening = group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
    adapt = wd != 0 or group["always_adapt"]
    out = []
    for p, g, state in zip(params, grads, states):
        if adapt:
            w_norm, g_norm = _norm(p), _norm(g)
            ok = (w_norm > 0) & (g_norm > 0)
            ratio = _where_positive(ok, group["trust_coeff"] * w_norm, g_norm + w_norm * wd + group["eps"])
            if group["trust_clip"]:
                ratio = torch.clamp(ratio / lr, max=1.0)
            g = g.add(p, alpha=wd).mul(ratio)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else buf.mul(momentum).add(g, alpha=1.0 - dampening)
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        out.append(_add_scaled(p, g, -lr))
    return out


# --- Adam family -----------------------------------------------------------------------------------------


def _adamw_like(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                group: Dict[str, Any], nesterov: bool) -> List[Tensor]:
    """AdamWLegacy (``nesterov=False``) and NAdamW (``nesterov=True``: the first moment is lerped towards the
    gradient once more before the update), as timm's single-tensor step computes them."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    amsgrad, caution = group.get("amsgrad", False), group.get("caution", False)
    threshold = group.get("clipping_threshold")
    decay = 1.0 - _decay_scale(group, lr) * wd
    out = []
    for p, g, state in zip(params, grads, states):
        if group.get("maximize", False):
            g = -g
        step = _number(state.get("step", 0)) + 1
        p = p.mul(decay)
        exp_avg = _moment(state, "exp_avg", p).lerp(g, 1 - beta1)
        exp_avg_sq = _moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        if amsgrad:
            exp_avg_sq = torch.maximum(_moment(state, "max_exp_avg_sq", p), exp_avg_sq)
        step_size = lr / (1 - beta1 ** step)
        if nesterov:
            exp_avg = exp_avg.lerp(g, 1 - beta1)
        denom = (_sqrt(exp_avg_sq) / (1 - beta2 ** step) ** 0.5).add(eps)
        if threshold is not None:
            denom = _rms_clip_denom(denom, g, threshold)
        if caution:
            exp_avg = _cautious(exp_avg, g)
        out.append(_addcdiv_scaled(p, exp_avg, denom, -step_size))
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
        exp_avg = _moment(state, "exp_avg", p).mul(beta1).add(g, alpha=1.0 - beta1)
        exp_avg_sq = _moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1.0 - beta2)
        denom = (_sqrt(exp_avg_sq) / math.sqrt(1 - beta2 ** t)).add(eps)
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
        exp_avg_sq = _moment(state, "exp_avg_sq", p32).type_as(p32).mul(beta2).addcmul(g, g, value=1 - beta2)
        exp_avg = _moment(state, "exp_avg", p32).type_as(p32).mul(beta1).add(g, alpha=1 - beta1)
        num_sma, rect, bias_correction1 = _radam_step_size(step, beta1, beta2)
        step_size = lr * rect / bias_correction1 if num_sma >= 5 else lr / bias_correction1
        if wd != 0:
            p32 = p32.add(p32, alpha=-wd * lr)
        if num_sma >= 5:
            p32 = p32.addcdiv(exp_avg, _sqrt(exp_avg_sq).add(eps), value=-step_size)
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
        if g.dtype in _LOW_PRECISION:
            g = g.float()
        p32 = p.float() if p.dtype in _LOW_PRECISION else p
        step = state.get("step", 0) + 1
        if group["decoupled_decay"]:
            p32 = p32.mul(1.0 - (wd if group["fixed_decay"] else lr * wd))
        elif wd != 0:
            g = g.add(p32, alpha=wd)
        exp_avg = _moment(state, "exp_avg", p32).lerp(g, 1 - beta1)
        residual = g - exp_avg
        exp_avg_var = _moment(state, "exp_avg_var", p32).mul(beta2).addcmul(residual, residual, value=1 - beta2)
        exp_avg_var = exp_avg_var.add(eps)
        if not rectify:
            second = torch.maximum(_moment(state, "max_exp_avg_var", p32), exp_avg_var) if amsgrad else exp_avg_var
            denom = (_sqrt(second) / math.sqrt(1 - beta2 ** step)).add(eps)
            p32 = p32.addcdiv(exp_avg, denom, value=-(lr / (1 - beta1 ** step)))
        else:
            num_sma, rect, bias_correction1 = _radam_step_size(step, beta1, beta2)
            if num_sma >= 5:
                p32 = p32.addcdiv(exp_avg, _sqrt(exp_avg_var).add(eps), value=-(rect / bias_correction1) * lr)
            elif group["degenerated_to_sgd"]:
                p32 = p32.add(exp_avg, alpha=-(1.0 / bias_correction1) * lr)
        out.append(p32.to(p.dtype) if p.dtype in _LOW_PRECISION else p32)
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
        exp_avg = _moment(state, "exp_avg", p).lerp(g, 1 - beta1)
        exp_avg_diff = _moment(state, "exp_avg_diff", p).mul(beta2).add(diff, alpha=1 - beta2)
        nesterov_grad = diff.mul(beta2).add(g)
        exp_avg_sq = _moment(state, "exp_avg_sq", p).mul(beta3).addcmul(
            nesterov_grad, nesterov_grad, value=1 - beta3)
        denom = (_sqrt(exp_avg_sq) / bias_correction3_sqrt).add(eps)
        if group.get("caution", False):
            exp_avg = _cautious(exp_avg, g)
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
        step = _number(state["step"]) + 1
        if wd != 0 and decoupled:
            p = _add_scaled(p, p, -_decay_scale(group, lr) * wd)
        normed = g.div(torch.clamp(state["exp_avg_sq"].sqrt(), eps))
        if clip_exp is not None:
            clip = (step - 1) ** clip_exp
            normed = normed.clamp(-clip, clip)
        exp_avg = state["exp_avg"].lerp(normed, 1 - beta1)
        if group.get("caution", False):
            exp_avg = _cautious(exp_avg, g)
        out.append(_add_scaled(p, exp_avg, -lr))
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
            lr_avg_2 = torch.zeros((), dtype=_scalar_dtype(), device="cpu")
        lr_avg_1 = lr_avg_1 * beta1 + (1 - beta1) * lr
        lr_avg_2 = lr_avg_2 * beta2 + (1 - beta2)
        if torch.is_tensor(lr_avg_1):
            nonzero = lr_avg_1 != 0.0
            step_size = torch.where(nonzero, lr / torch.where(nonzero, lr_avg_1, 1.0), 0.0)
        else:
            step_size = lr / lr_avg_1 if lr_avg_1 != 0.0 else 0.0
        exp_avg_sq = _moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        step_of_grad = g / _sqrt(exp_avg_sq.div(lr_avg_2)).add(eps)
        exp_avg = _add_scaled(_moment(state, "exp_avg", p).mul(beta1), step_of_grad, lr * (1 - beta1))
        if group.get("caution", False):
            exp_avg = _cautious(exp_avg, g)
        p = _add_scaled(p, exp_avg, -step_size)
        if wd != 0:
            p = _add_scaled(p, p, -_decay_scale(group, lr) * wd)
        out.append(p)
    return out


def _scalar_dtype() -> torch.dtype:
    """The dtype timm gives its CPU scalar state (step counts, LaProp's lr averages)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# --- RMSprop (TensorFlow style) -------------------------------------------------------------------------


def rmsprop_tf_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                    group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.RMSpropTF`: square average initialised to ones, eps inside the sqrt, centered,
    momentum with the lr inside the buffer (``lr_in_momentum``, TensorFlow) or outside, L2 or decoupled
    decay, caution."""
    lr, wd, eps, alpha, momentum = group["lr"], group["weight_decay"], group["eps"], group["alpha"], group["momentum"]
    centered, caution = group["centered"], group.get("caution", False)
    out = []
    for p, g, state in zip(params, grads, states):
        if wd != 0:
            if group["decoupled_decay"]:
                p = p.mul(1.0 - _decay_scale(group, lr) * wd)
            else:
                g = g.add(p, alpha=wd)
        square_avg = state.get("square_avg")
        square_avg = torch.ones_like(p) if square_avg is None else square_avg
        square_avg = square_avg.add(g.pow(2) - square_avg, alpha=1.0 - alpha)
        if centered:
            grad_avg = _moment(state, "grad_avg", p)
            grad_avg = grad_avg.add(g - grad_avg, alpha=1.0 - alpha)
            avg = _sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1).add(eps))
        else:
            avg = _sqrt(square_avg.add(eps))
        if momentum > 0:
            buf = _moment(state, "momentum_buffer", p).mul(momentum)
            if group["lr_in_momentum"]:
                buf = _addcdiv_scaled(buf, g, avg, lr)
                out.append(p.add(-(_cautious(buf, g) if caution else buf)))
            else:
                buf = buf.addcdiv(g, avg)
                out.append(_add_scaled(p, _cautious(buf, g) if caution else buf, -lr))
        else:
            out.append(_addcdiv_scaled(p, g, avg, -lr))
    return out


# --- LAMB --------------------------------------------------------------------------------------------------


def lamb_global_inputs(optimizer: torch.optim.Optimizer, grads: Sequence[Tensor]) -> Dict[str, Any]:
    """What :meth:`timm.optim.Lamb.step` computes over all its param groups before the per-group updates:
    the global gradient-norm clip divisor ``max(1, |g|_global / max_grad_norm)`` (``optimizer.defaults``'
    ``max_grad_norm``; None: no clipping). ``grads``: every group's parameters' gradients, None skipped."""
    max_grad_norm = optimizer.defaults["max_grad_norm"]
    grads = [g for g in grads if g is not None]
    if max_grad_norm is None or not grads:
        return {LAMB_CLIP_KEY: None}
    global_norm = _norm(torch.stack([_norm(g) for g in grads]))
    return {LAMB_CLIP_KEY: (global_norm / max_grad_norm).clamp(min=1.0)}


def lamb_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
              group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.Lamb`: the gradient divided by the global clip divisor (``group[LAMB_CLIP_KEY]``,
    from :func:`lamb_global_inputs`), Adam moments with the group's step count (``bias_correction``,
    ``grad_averaging``), caution, L2 or decoupled decay, and the trust ratio ``|w| / |update|`` (1 when a
    norm is zero; ``trust_clip``: at most 1) when ``wd != 0`` or ``always_adapt``. The clip couples every
    parameter of the optimizer; the trust ratio every entry of a tensor."""
    if LAMB_CLIP_KEY not in group:
        if group.get("max_grad_norm") is not None:
            raise ValueError(
                "timm's Lamb clips by the gradient norm of all its param groups together (max_grad_norm="
                f"{group['max_grad_norm']}): pass the group merged with lamb_global_inputs(optimizer, grads) "
                f"(key {LAMB_CLIP_KEY!r}), or build Lamb with max_grad_norm=None")
        clip = None
    else:
        clip = group[LAMB_CLIP_KEY]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
    step = _number(group.get("step", 0)) + 1
    if group["bias_correction"]:
        bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    else:
        bias_correction1, bias_correction2 = 1.0, 1.0
    decoupled = group.get("decoupled_decay", False)
    decay = (lr ** 2 / group["max_lr_snapshot"] if decoupled and group.get("corrected_weight_decay", False)
             else lr) * wd
    out = []
    for p, g, state in zip(params, grads, states):
        if clip is not None:
            g = g / clip
        exp_avg = _moment(state, "exp_avg", p)
        exp_avg = exp_avg.lerp(g, beta3) if beta3 == 1 - beta1 else exp_avg.mul(beta1).add(g, alpha=beta3)
        exp_avg_sq = _moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        denom = (_sqrt(exp_avg_sq) / (bias_correction2 ** 0.5)).add(eps)
        update = (exp_avg / bias_correction1).div(denom)
        if group.get("caution", False):
            update = _cautious(update, g)
        if wd != 0:
            if decoupled:
                p = _add_scaled(p, p, -decay)
            else:
                update = update.add(p, alpha=wd)
        if wd != 0 or group["always_adapt"]:
            w_norm, u_norm = _norm(p), _norm(update)
            ratio = _where_positive((w_norm > 0) & (u_norm > 0), w_norm, u_norm)
            if group["trust_clip"]:
                ratio = torch.clamp(ratio, max=1.0)
            update = update.mul(ratio)
        out.append(_add_scaled(p, update, -lr))
    return out


# --- the tables ---------------------------------------------------------------------------------------------

RULES: Dict[type, Rule] = {
    SGDW: sgdw_rule,
    Lars: lars_rule,
    AdamWLegacy: adamw_legacy_rule,
    NAdamW: nadamw_rule,
    NAdamLegacy: nadam_legacy_rule,
    RAdamLegacy: radam_legacy_rule,
    AdaBelief: adabelief_rule,
    Adan: adan_rule,
    Adopt: adopt_rule,
    LaProp: laprop_rule,
    RMSpropTF: rmsprop_tf_rule,
    Lamb: lamb_rule,
}

REFUSED: Dict[type, str] = {
    Lion: (
        "its update is the sign of a momentum (timm's 'lion', 'lionc', 'clion', 'clionc'), and sign updates "
        "have zero derivative in the gradient almost everywhere: the meta gradient through the virtual step "
        "would be zero and the weight predictor would never learn. Train with an optimizer whose update is "
        "differentiable in the gradient, e.g. timm's 'adamw', 'nadamw', 'lamb' or 'momentum'"
    ),
}

GLOBAL_INPUTS: Dict[type, Callable[[torch.optim.Optimizer, Sequence[Tensor]], Dict[str, Any]]] = {
    Lamb: lamb_global_inputs,
}

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

Layout: this module holds the tables and the rules outside the Adam family (SGDW, Lars, RMSpropTF, Lamb);
:mod:`~timm_l2w.optim_step.timm_adam` the Adam family; :mod:`~timm_l2w.optim_step.timm_math` the pieces
they share.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

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

from .timm_adam import (
    adabelief_rule,
    adamw_legacy_rule,
    adan_rule,
    adopt_rule,
    laprop_rule,
    nadam_legacy_rule,
    nadamw_rule,
    radam_legacy_rule,
)
from .timm_math import (
    Rule,
    add_scaled,
    addcdiv_scaled,
    cautious,
    decay_scale,
    safe_sqrt,
    state_moment,
    state_number,
    vector_norm,
    where_positive,
)

__all__ = ["RULES", "REFUSED", "GLOBAL_INPUTS", "LAMB_CLIP_KEY", "lamb_global_inputs"]

#: the group key under which :func:`lamb_global_inputs` passes Lamb's global clip divisor to its rule
LAMB_CLIP_KEY = "clip_grad_norm"


# --- SGD family ----------------------------------------------------------------------------------------


def sgdw_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
              group: Dict[str, Any]) -> List[Tensor]:
    """:class:`timm.optim.SGDW`: decoupled decay ``theta *= 1 - lr * wd`` first, then SGD with momentum
    (a fresh buffer is the gradient itself), nesterov, dampening, caution, maximize."""
    lr, wd, momentum, dampening = group["lr"], group["weight_decay"], group["momentum"], group["dampening"]
    nesterov, caution = group["nesterov"], group.get("caution", False)
    decay = 1.0 - decay_scale(group, lr) * wd
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
                g = cautious(buf, g)
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
            w_norm, g_norm = vector_norm(p), vector_norm(g)
            ok = (w_norm > 0) & (g_norm > 0)
            ratio = where_positive(ok, group["trust_coeff"] * w_norm, g_norm + w_norm * wd + group["eps"])
            if group["trust_clip"]:
                ratio = torch.clamp(ratio / lr, max=1.0)
            g = g.add(p, alpha=wd).mul(ratio)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else buf.mul(momentum).add(g, alpha=1.0 - dampening)
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        out.append(add_scaled(p, g, -lr))
    return out


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
                p = p.mul(1.0 - decay_scale(group, lr) * wd)
            else:
                g = g.add(p, alpha=wd)
        square_avg = state.get("square_avg")
        square_avg = torch.ones_like(p) if square_avg is None else square_avg
        square_avg = square_avg.add(g.pow(2) - square_avg, alpha=1.0 - alpha)
        if centered:
            grad_avg = state_moment(state, "grad_avg", p)
            grad_avg = grad_avg.add(g - grad_avg, alpha=1.0 - alpha)
            avg = safe_sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1).add(eps))
        else:
            avg = safe_sqrt(square_avg.add(eps))
        if momentum > 0:
            buf = state_moment(state, "momentum_buffer", p).mul(momentum)
            if group["lr_in_momentum"]:
                buf = addcdiv_scaled(buf, g, avg, lr)
                out.append(p.add(-(cautious(buf, g) if caution else buf)))
            else:
                buf = buf.addcdiv(g, avg)
                out.append(add_scaled(p, cautious(buf, g) if caution else buf, -lr))
        else:
            out.append(addcdiv_scaled(p, g, avg, -lr))
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
    global_norm = vector_norm(torch.stack([vector_norm(g) for g in grads]))
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
    step = state_number(group.get("step", 0)) + 1
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
        exp_avg = state_moment(state, "exp_avg", p)
        exp_avg = exp_avg.lerp(g, beta3) if beta3 == 1 - beta1 else exp_avg.mul(beta1).add(g, alpha=beta3)
        exp_avg_sq = state_moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        denom = (safe_sqrt(exp_avg_sq) / (bias_correction2 ** 0.5)).add(eps)
        update = (exp_avg / bias_correction1).div(denom)
        if group.get("caution", False):
            update = cautious(update, g)
        if wd != 0:
            if decoupled:
                p = add_scaled(p, p, -decay)
            else:
                update = update.add(p, alpha=wd)
        if wd != 0 or group["always_adapt"]:
            w_norm, u_norm = vector_norm(p), vector_norm(update)
            ratio = where_positive((w_norm > 0) & (u_norm > 0), w_norm, u_norm)
            if group["trust_clip"]:
                ratio = torch.clamp(ratio, max=1.0)
            update = update.mul(ratio)
        out.append(add_scaled(p, update, -lr))
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

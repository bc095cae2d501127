"""torch.optim's optimizers as differentiable functions: one rule per class.

A rule computes theta' for the parameters of one param group exactly as the class's ``step()`` would,
out of place and differentiably in the gradients (the virtual step of docs/method.md §5):

    rule(params, grads, states, group) -> new params

``states`` is the optimizer's per-parameter state before the step (read, never written; an empty dict
is a parameter the optimizer has not stepped yet, initialised here as ``step()`` would) and ``group``
the param group (read-only).

Where torch's own functional form runs out of place on copies and is differentiable, the rule is
that function (``torch.optim.adam.adam(..., differentiable=True, foreach=False)`` on clones of the
parameters and the state): Adam, AdamW, RAdam, Adamax, RMSprop, Adagrad, Adadelta. Two rules are
written out, each tested against ``step()``: SGD (torch's first step detaches the new momentum buffer,
which would cut the meta gradient) and NAdam (its differentiable form does the ``mu_product`` scalar
math in the state's float32, off from ``step()`` by ~1e-7 in float64).

One deviation from torch's differentiable forms, in the derivative only: ``sqrt`` of an exactly-zero
second moment (a parameter entry whose gradient has always been 0, e.g. a dead ReLU unit) has
derivative 0 here instead of inf (inf * 0 = NaN would poison the whole meta gradient). That is the
derivative the update really has there: ``m / (sqrt(v) + eps)`` with ``m ∝ g``, ``v ∝ g**2`` is
smooth in ``g`` at 0 and only the ``m`` path contributes.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.optim.adadelta import adadelta
from torch.optim.adagrad import adagrad
from torch.optim.adam import adam
from torch.optim.adamax import adamax
from torch.optim.radam import radam
from torch.optim.rmsprop import rmsprop
from torch.overrides import TorchFunctionMode

__all__ = ["RULES", "REFUSED", "GLOBAL_INPUTS", "SGDSlot", "sgd_update", "sgd_coefficient",
           "zero_safe_sqrt"]

Rule = Callable[[List[Tensor], List[Tensor], List[Dict[str, Any]], Dict[str, Any]], List[Tensor]]


# --- shared pieces -----------------------------------------------------------------------------------
class _ZeroSafeSqrt(torch.autograd.Function):
    """``sqrt(x)`` with derivative 0 where ``x == 0`` (elsewhere ``1 / (2 sqrt(x))``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        positive = y > 0
        return torch.where(positive, grad / torch.where(positive, 2 * y, torch.ones_like(y)), torch.zeros_like(grad))


def zero_safe_sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()`` exactly in value, with derivative 0 (not inf) where ``x == 0``."""
    return _ZeroSafeSqrt.apply(x) if x.requires_grad else torch.sqrt(x)


class _ZeroSafeSqrtMode(TorchFunctionMode):
    """Runs torch's functional optimizers with :func:`zero_safe_sqrt` for every ``sqrt`` on a graph."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.sqrt, Tensor.sqrt) and not kwargs and args[0].requires_grad:
            return _ZeroSafeSqrt.apply(args[0])
        if func is Tensor.sqrt_ and args[0].requires_grad:
            return args[0].copy_(_ZeroSafeSqrt.apply(args[0]))
        return func(*args, **kwargs)


def _moment(state: Dict[str, Any], key: str, like: Tensor, fill: float = 0.0) -> Tensor:
    """A copy of the state tensor ``key``, or the value ``step()`` would initialise it with."""
    if key in state:
        return state[key].detach().clone()
    return torch.full_like(like, fill, memory_format=torch.preserve_format).detach()


def _count(state: Dict[str, Any], like: Tensor) -> Tensor:
    """A copy of the step count as a float64 scalar tensor (float32 on MPS), so bias corrections computed
    from it are as exact as ``step()``'s Python-float ones (torch keeps the count in float32)."""
    dtype = torch.float32 if like.device.type == "mps" else torch.float64
    step = state.get("step", 0.0)
    if isinstance(step, Tensor):
        return step.detach().to(dtype=dtype, copy=True)
    return torch.tensor(float(step), dtype=dtype)


def _number(x: Any) -> float:
    return float(x) if isinstance(x, Tensor) else x


def _complex(params: Sequence[Tensor]) -> bool:
    return any(torch.is_complex(p) for p in params)


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable[..., None]) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _functional(fn: Callable[..., None], new: List[Tensor], grads: Sequence[Tensor], *lists: List[Tensor],
                **kwargs: Any) -> List[Tensor]:
    """Call torch's functional optimizer ``fn`` on the copies ``new`` (updated in place) and state copies."""
    accepted = _parameters(fn)
    options = dict(foreach=False, differentiable=True, capturable=False, fused=False, has_complex=_complex(new))
    kwargs.update({k: v for k, v in options.items() if k in accepted})
    with _ZeroSafeSqrtMode():
        fn(new, list(grads), *lists, **kwargs)
    return new


# --- SGD (written out: torch detaches a new momentum buffer) ------------------------------------------
@dataclass
class SGDSlot:
    """What ``torch.optim.SGD`` would use to update one parameter (its group's settings + buffer)."""

    lr: float | Tensor  # a 0-dim device tensor when a CUDA graph reads the lr there (timm_l2w.accel.cuda_graphs)
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    maximize: bool
    buffer: Optional[Tensor]


def _sgd_slot(group: Dict[str, Any], state: Dict[str, Any]) -> SGDSlot:
    return SGDSlot(
        lr=group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"]),
        momentum=float(group.get("momentum", 0.0)),
        dampening=float(group.get("dampening", 0.0)),
        nesterov=bool(group.get("nesterov", False)),
        weight_decay=float(group.get("weight_decay", 0.0)),
        maximize=bool(group.get("maximize", False)),
        buffer=state.get("momentum_buffer"),
    )


def sgd_update(p: Tensor, g: Tensor, s: SGDSlot) -> Tensor:
    """``theta'`` of one parameter exactly as ``torch.optim.SGD.step`` computes it, out of place.

    ``d = g + wd * theta``; with momentum ``b = m * buf + (1 - dampening) * d`` (``b = d`` when no
    buffer exists yet), ``d = d + m * b`` (nesterov) or ``d = b``; ``theta' = theta - lr * d``.
    """
    d = -g if s.maximize else g
    if s.weight_decay:
        d = d + s.weight_decay * p
    if s.momentum:
        b = d if s.buffer is None else s.buffer * s.momentum + (1 - s.dampening) * d
        d = d + s.momentum * b if s.nesterov else b
    return p - s.lr * d


def sgd_coefficient(s: SGDSlot) -> float:
    """``d theta' / d g`` of :func:`sgd_update`: one scalar per parameter (the step is affine in g)."""
    if not s.momentum:
        c = 1.0
    else:
        a = 1.0 if s.buffer is None else 1.0 - s.dampening
        c = 1.0 + s.momentum * a if s.nesterov else a
    return -s.lr * c * (-1.0 if s.maximize else 1.0)


def sgd_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
             group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.SGD` (lr, momentum buffer, dampening, nesterov, weight decay, maximize)."""
    return [sgd_update(p, g, _sgd_slot(group, state)) for p, g, state in zip(params, grads, states)]


sgd_rule.grad_coefficient = lambda state, group: sgd_coefficient(_sgd_slot(group, state))  # type: ignore[attr-defined]


# --- the Adam family and the others: torch's functional forms -----------------------------------------
def adam_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
              group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.Adam` and :class:`torch.optim.AdamW` (``decoupled_weight_decay``), amsgrad, maximize."""
    amsgrad = group["amsgrad"]
    beta1, beta2 = group["betas"]
    return _functional(
        adam, [p.clone() for p in params], grads,
        [_moment(s, "exp_avg", p) for p, s in zip(params, states)],
        [_moment(s, "exp_avg_sq", p) for p, s in zip(params, states)],
        [_moment(s, "max_exp_avg_sq", p) for p, s in zip(params, states)] if amsgrad else [],
        [_count(s, p) for p, s in zip(params, states)],
        decoupled_weight_decay=group.get("decoupled_weight_decay", False), amsgrad=amsgrad, beta1=beta1,
        beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
    )


def radam_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
               group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.RAdam` (variance rectification, ``decoupled_weight_decay``, maximize)."""
    beta1, beta2 = group["betas"]
    return _functional(
        radam, [p.clone() for p in params], grads,
        [_moment(s, "exp_avg", p) for p, s in zip(params, states)],
        [_moment(s, "exp_avg_sq", p) for p, s in zip(params, states)],
        [_count(s, p) for p, s in zip(params, states)],
        decoupled_weight_decay=group.get("decoupled_weight_decay", False), maximize=group["maximize"],
        beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
    )


def adamax_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.Adamax` (infinity norm of the gradients, maximize)."""
    beta1, beta2 = group["betas"]
    return _functional(
        adamax, [p.clone() for p in params], grads,
        [_moment(s, "exp_avg", p) for p, s in zip(params, states)],
        [_moment(s, "exp_inf", p) for p, s in zip(params, states)],
        [_count(s, p) for p, s in zip(params, states)],
        maximize=group["maximize"], eps=group["eps"], beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"],
    )


def rmsprop_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                 group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.RMSprop` (momentum, centered, maximize)."""
    momentum, centered = group["momentum"], group["centered"]
    return _functional(
        rmsprop, [p.clone() for p in params], grads,
        [_moment(s, "square_avg", p) for p, s in zip(params, states)],
        [_moment(s, "grad_avg", p) for p, s in zip(params, states)] if centered else [],
        [_moment(s, "momentum_buffer", p) for p, s in zip(params, states)] if momentum > 0 else [],
        [_count(s, p) for p, s in zip(params, states)],
        maximize=group["maximize"], lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
        weight_decay=group["weight_decay"], momentum=momentum, centered=centered,
    )


def adagrad_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                 group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.Adagrad` (lr decay, initial accumulator, maximize)."""
    initial = group["initial_accumulator_value"]
    return _functional(
        adagrad, [p.clone() for p in params], grads,
        [_moment(s, "sum", p, initial) for p, s in zip(params, states)],
        [_count(s, p) for p, s in zip(params, states)],
        lr=group["lr"], weight_decay=group["weight_decay"], lr_decay=group["lr_decay"], eps=group["eps"],
        maximize=group["maximize"],
    )


def adadelta_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
                  group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.Adadelta` (maximize)."""
    return _functional(
        adadelta, [p.clone() for p in params], grads,
        [_moment(s, "square_avg", p) for p, s in zip(params, states)],
        [_moment(s, "acc_delta", p) for p, s in zip(params, states)],
        [_count(s, p) for p, s in zip(params, states)],
        lr=group["lr"], rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
        maximize=group["maximize"],
    )


# --- NAdam (written out: step()'s mu_product arithmetic) ---------------------------------------------
def _scalar_dtype() -> torch.dtype:
    """The dtype torch gives a new optimizer's scalar state (``mu_product``): float64 only by default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def nadam_rule(params: List[Tensor], grads: List[Tensor], states: List[Dict[str, Any]],
               group: Dict[str, Any]) -> List[Tensor]:
    """:class:`torch.optim.NAdam` (momentum decay, ``decoupled_weight_decay``, maximize), with the scalars
    computed as ``step()`` computes them: ``mu_product`` multiplied in its own dtype, then read as a number."""
    lr, wd, eps = _number(group["lr"]), group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    decay = group["momentum_decay"]
    out = []
    for p, g, state in zip(params, grads, states):
        g = -g if group["maximize"] else g
        step = _number(state.get("step", 0.0)) + 1
        bias_correction2 = 1 - beta2 ** step
        if wd != 0:
            if group.get("decoupled_weight_decay", False):
                p = p.mul(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
        mu_product = state.get("mu_product")
        mu_product = float((torch.ones((), dtype=_scalar_dtype()) if mu_product is None else mu_product) * mu)
        exp_avg = _moment(state, "exp_avg", p).lerp(g, 1 - beta1)
        exp_avg_sq = _moment(state, "exp_avg_sq", p).mul(beta2).addcmul(g, g, value=1 - beta2)
        denom = zero_safe_sqrt(exp_avg_sq.div(bias_correction2)).add(eps)
        p = p.addcdiv(g, denom, value=-lr * (1.0 - mu) / (1.0 - mu_product))
        out.append(p.addcdiv(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product * mu_next)))
    return out


# --- the tables ----------------------------------------------------------------------------------------
RULES: Dict[type, Rule] = {
    torch.optim.SGD: sgd_rule,
    torch.optim.Adam: adam_rule,
    torch.optim.AdamW: adam_rule,
    torch.optim.NAdam: nadam_rule,
    torch.optim.RAdam: radam_rule,
    torch.optim.Adamax: adamax_rule,
    torch.optim.RMSprop: rmsprop_rule,
    torch.optim.Adagrad: adagrad_rule,
    torch.optim.Adadelta: adadelta_rule,
}

REFUSED: Dict[type, str] = {
    torch.optim.Rprop: (
        "Rprop steps each weight by the sign of its gradient (with a step size adapted from sign changes): a "
        "sign update has zero derivative in the gradient almost everywhere, so the meta gradient through the "
        "virtual step would be zero and L2W would learn nothing. Use e.g. torch.optim.AdamW or SGD"
    ),
    torch.optim.LBFGS: (
        "LBFGS re-evaluates the loss through a closure several times per step (line search), so its update is "
        "no function of one gradient that the virtual step could reproduce. Use e.g. torch.optim.AdamW or SGD"
    ),
}

GLOBAL_INPUTS: Dict[type, Callable[[torch.optim.Optimizer, Sequence[Tensor]], Dict[str, Any]]] = {}

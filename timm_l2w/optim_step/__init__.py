"""The optimizer step as a differentiable function: the virtual step of L2W's meta step (docs/method.md §5).

``virtual_step(optimizer, params, grads)`` returns theta', the parameters exactly as the optimizer's
``step()`` would leave them after seeing ``grads``, computed out of place and kept differentiable in
``grads``, with every param group's settings (lr, weight decay, timm's no-decay group and layer-wise
lr decay), the optimizer's state (moments, step counts, momentum buffers) and options. The real
parameters and the optimizer state are never touched.

One *rule* per optimizer class does the work (``rule(params, grads, states, group) -> new params``
for one param group): ``torch_rules`` for torch.optim, ``timm_rules`` for timm.optim. Adding an
optimizer is one rule plus its test against ``step()``. Classes whose update is a sign (Lion, Rprop)
or no function of one gradient (LBFGS) are refused with the reason; unknown classes are refused
with the list of supported ones.

:func:`clip_gradients` is gradient clipping (timm's modes ``'norm'``, ``'value'``, ``'agc'``) in the
same differentiable form, applied before the rule when the training loop clips.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import torch_rules
from .clip import CLIP_MODES, clip_gradients

try:  # timm.optim's rules (a module of their own)
    from . import timm_rules
except ModuleNotFoundError as error:  # only when that module is absent, never to hide its own errors
    if error.name != f"{__name__}.timm_rules":
        raise
    timm_rules = None

__all__ = [
    "RULES",
    "REFUSED",
    "GLOBAL_INPUTS",
    "CLIP_MODES",
    "clip_gradients",
    "unwrap_optimizer",
    "rule_for",
    "check_optimizer",
    "supported_optimizers",
    "in_optimizer",
    "virtual_step",
    "grad_coefficients",
]

Rule = Callable[[List[Tensor], List[Tensor], List[Dict[str, Any]], Dict[str, Any]], List[Tensor]]

RULES: Dict[type, Rule] = {}
REFUSED: Dict[type, str] = {}
GLOBAL_INPUTS: Dict[type, Callable[[torch.optim.Optimizer, Sequence[Tensor]], Dict[str, Any]]] = {}
for _module in (torch_rules, timm_rules):
    if _module is not None:
        RULES.update(_module.RULES)
        REFUSED.update(getattr(_module, "REFUSED", {}))
        GLOBAL_INPUTS.update(getattr(_module, "GLOBAL_INPUTS", {}))


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar ``.optimizer`` wrappers)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # AcceleratedOptimizer is one too
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or accelerate's wrapper of one), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def _same_step(cls: type, base: type) -> bool:
    """Whether ``cls`` steps exactly like ``base`` (it is ``base``, or a subclass that does not override ``step``)."""
    return cls is base or inspect.unwrap(cls.step) is inspect.unwrap(base.step)


def _entry(cls: type, table: Dict[type, Any]) -> Optional[type]:
    return next((base for base in cls.__mro__ if base in table and _same_step(cls, base)), None)


def supported_optimizers() -> List[str]:
    """The optimizer classes the virtual step reproduces, as ``module.Class`` names."""
    return sorted(f"{c.__module__.split('.')[0]}.{c.__name__}" for c in RULES)


def rule_for(optimizer: Any) -> Rule:
    """The rule of ``optimizer``'s class; a TypeError saying why for a refused or unknown class."""
    cls = type(unwrap_optimizer(optimizer))
    refused = _entry(cls, REFUSED)
    if refused is not None:
        raise TypeError(f"L2W cannot use {cls.__name__} for its virtual step: {REFUSED[refused]}")
    base = _entry(cls, RULES)
    if base is None:
        raise TypeError(
            f"the L2W virtual step has no rule for {cls.__module__}.{cls.__name__}: it reproduces "
            f"{', '.join(supported_optimizers())} (timm's create_optimizer_v2 names sgd, momentum, adamw, lamb, ...). "
            "Train with one of those, or add a rule to timm_l2w.optim_step (one function, tested against step())")
    return RULES[base]


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """``optimizer`` unwrapped, after checking the virtual step has a rule for it (else a TypeError)."""
    rule_for(optimizer)
    return unwrap_optimizer(optimizer)


def in_optimizer(optimizer: Any, params: Sequence[Tensor]) -> List[bool]:
    """For each parameter: whether the optimizer steps it (in one of its groups, and requires grad)."""
    ids = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    return [id(p) in ids and p.requires_grad for p in params]


def virtual_step(optimizer: Any, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                 values: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
    """theta' of ``params`` after the optimizer's ``step()`` on ``grads``, out of place and differentiable.

    ``params``: the real parameters (they identify the param group and state; any subset, any order);
    ``grads``: their gradients (None: no gradient, the parameter stays as it is, as ``step()`` skips
    it); ``values``: the tensors to step from in place of ``params`` (default ``params``; e.g. detached
    copies). Parameters in no param group stay as they are. Raises a TypeError for an optimizer without
    a rule (refused or unknown).
    """
    opt = unwrap_optimizer(optimizer)
    rule = rule_for(opt)
    values = list(params) if values is None else list(values)
    if len(values) != len(params) or len(grads) != len(params):
        raise ValueError(f"params, grads and values need the same length, "
                         f"got {len(params)}, {len(grads)}, {len(values)}")
    index = {id(p): i for i, p in enumerate(params)}
    groups = [[index[id(p)] for p in group["params"] if id(p) in index and grads[index[id(p)]] is not None]
              for group in opt.param_groups]
    global_inputs = GLOBAL_INPUTS.get(_entry(type(opt), GLOBAL_INPUTS))
    extra = global_inputs(opt, [grads[i] for idx in groups for i in idx]) if global_inputs is not None else {}
    new = list(values)
    for group, idx in zip(opt.param_groups, groups):
        if not idx:
            continue
        updated = rule([values[i] for i in idx], [grads[i] for i in idx], [opt.state.get(params[i], {}) for i in idx],
                       {**group, **extra} if extra else group)
        for i, t in zip(idx, updated):
            new[i] = t
    return new


def grad_coefficients(optimizer: Any, params: Sequence[Tensor]) -> Optional[List[Optional[float]]]:
    """``d theta' / d g`` as one number per parameter when the optimizer's update is affine in the gradient
    with a scalar slope (SGD; None for a parameter in no group), else None (use a VJP through the rule)."""
    opt = unwrap_optimizer(optimizer)
    coefficient = getattr(rule_for(opt), "grad_coefficient", None)
    if coefficient is None:
        return None
    by_id = {id(p): coefficient(opt.state.get(p, {}), group) for group in opt.param_groups for p in group["params"]}
    return [by_id.get(id(p)) for p in params]

"""One meta step (docs/method.md §5, steps 1-3): the virtual step, the meta loss, the meta gradient;
and what the hook does around it across ranks (the all-reduce) and on the predictor (its fused Adam)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..exits import distribution_values
from ..models.base import check_multi_exit_output
from ..optim_step import in_optimizer
from ..validation import Range, check_choice, check_number
from ..weighting import (
    CONSTRAINTS,
    Distillation,
    ExitCriterion,
    WeightPredictor,
    check_eps,
    exit_losses,
    sample_weights,
    training_losses,
)
from .backends import Backend, VirtualStep, make_backend
from .loss import RngState, meta_loss, rng_state
from .update import RealUpdate, check_clip, clip_mask

__all__ = ["MetaStepResult", "MissingDerivativeError", "meta_step", "distributed", "all_reduce_mean_", "meta_adam",
           "predictor_step"]

Batch = Tuple[Tensor, Tensor]


@dataclass
class MetaStepResult:
    """What one meta step produced (all detached)."""

    meta_loss: Tensor  # scalar: meta loss of the virtually updated model on the meta half
    grads: List[Tensor]  # d meta_loss / d phi, in weight_net.parameters() order
    weights: Tensor  # [B_train, K]: the weights used in the virtual step


def _check_batch(batch: Any, name: str) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise TypeError(f"{name} must be an (inputs, targets) pair of tensors, got {type(batch).__name__}")
    x, y = batch
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: inputs and targets need the same non-zero batch size, "
                         f"got {x.shape[0]} and {y.shape[0]}")
    return x, y


def meta_step(
    model: nn.Module,
    optimizer: Any,
    weight_net: WeightPredictor,
    train_batch: Batch,
    meta_batch: Batch,
    p: Tensor | Sequence[float],
    *,
    eps: float = 0.8,
    constraint: str = "col",
    backend: str | Backend = "higher",
    label_smoothing: float = 0.0,
    train_outputs: Optional[Sequence[Tensor]] = None,
    train_rng: Optional[RngState] = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    loss_scale: float = 1.0,
    distill: Optional[Distillation] = None,
    criterion: Any = None,
    clip_grad: Optional[float] = None,
    clip_mode: str = "norm",
    accumulated_grads: Optional[Sequence[Optional[Tensor]]] = None,
    grad_accum_steps: int = 1,
    clip_parameters: Optional[Sequence[Tensor]] = None,
) -> MetaStepResult:
    """Steps 1-2 of the training step (docs/method.md §5) and the meta gradient of step 3.

    Leaves ``d meta_loss / d phi`` in the predictor's ``.grad`` (replacing what was there) and
    returns it; stepping the meta optimizer is the caller's job (:class:`~timm_l2w.meta.L2W` does it).
    ``train_outputs`` may pass the model's outputs on the training half that are already computed
    (with their graph, at the current parameters) to save the virtual forward; ``train_rng``
    (:func:`~timm_l2w.meta.rng_state` taken right before that forward) lets the ``'func'`` backend replay
    its dropout masks.

    The virtual step is the real update (docs/method.md §5, "The virtual step of any optimizer"):
    the optimizer's input is ``accumulated_grads + g / grad_accum_steps`` (``g`` the weighted-loss
    gradient of the training half; ``accumulated_grads``, in ``model.named_parameters()`` order, what
    the window's earlier micro-batches left in ``.grad``), clipped as timm's
    ``dispatch_clip_grad(clip_parameters, clip_grad, clip_mode)`` would clip it (``clip_grad=None``:
    no clipping; modes ``'norm'``, ``'value'``, ``'agc'``; ``clip_parameters`` the parameters the loop
    clips, default all of the model's: timm's train.py leaves the classifier out under ``'agc'``), then
    ``optimizer``'s own update rule
    (:func:`timm_l2w.optim_step.virtual_step`: SGD, AdamW, LAMB, ...).

    Both backends compute the same exact second-order gradient (:mod:`timm_l2w.meta.backends`:
    ``'higher'`` differentiates through the virtual step, ``'func'`` takes one reverse product through the
    update and one forward-mode product of the training losses, which is cheaper).

    ``autocast`` wraps every forward of the model (e.g. ``accelerator.autocast``). ``loss_scale``
    multiplies the virtual loss and the meta loss before they are differentiated, so that fp16
    gradients do not flush to zero; the virtual step divides it out again, and the returned
    ``grads`` (and ``.grad``) are ``loss_scale * d meta_loss / d phi``, as ``torch.amp.GradScaler``
    expects (``GradScaler.unscale_`` / ``step`` then divide it out and skip on overflow).

    ``criterion`` (:meth:`~timm_l2w.weighting.ExitCriterion.from_module`: e.g. timm's
    ``SoftTargetCrossEntropy`` or ``BinaryCrossEntropy``) is the per-sample training loss; targets may be
    class probabilities (Mixup / CutMix) on both halves.
    """
    # enable_grad: also works when called under torch.no_grad(). The math attention kernel: the fused
    # scaled_dot_product_attention kernels have no second-order / forward-mode derivatives.
    clip_grad, clip_mode = check_clip(clip_grad, clip_mode)
    grad_accum_steps = check_number(grad_accum_steps, "grad_accum_steps", Range(1, integer=True))
    name = backend.name if isinstance(backend, Backend) else backend
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), _derivatives_of(name):
        return _meta_step(model, optimizer, weight_net, train_batch, meta_batch, p, eps, constraint, backend,
                          label_smoothing, train_outputs, train_rng, autocast, float(loss_scale), distill,
                          ExitCriterion.from_module(criterion, label_smoothing),
                          (clip_grad, clip_mode, accumulated_grads, grad_accum_steps, clip_parameters))


class MissingDerivativeError(ValueError):
    """The model has an op whose derivative the meta backend needs and torch does not implement (``op``):
    ``'higher'`` needs second derivatives, ``'func'`` forward-mode ones; ``other`` is the backend to use."""

    def __init__(self, backend: str, op: str):
        self.backend, self.op = backend, op
        self.other = "func" if backend == "higher" else "higher"
        self.need = "second derivatives (backward of backward)" if backend == "higher" else "forward-mode derivatives"
        auto = " (or backend='auto', which switches by itself)" if backend == "higher" else ""
        super().__init__(f"the '{backend}' meta backend needs {self.need}, which torch does not implement for {op} "
                         f"(an op of this model): use backend='{self.other}' (timm-l2w train --backend "
                         f"{self.other}){auto}")


@contextlib.contextmanager
def _derivatives_of(backend: str) -> Iterator[None]:
    """Turn torch's "derivative for <op> is not implemented" (an op of the model without a second-order
    formula, e.g. hardsigmoid's double backward, or without a forward-mode one) into an error naming the
    other backend, which needs the other kind of derivative."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "derivative for" not in text or "not implemented" not in text:
            raise
        op = text.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
        raise MissingDerivativeError(backend, op) from None


def _meta_step(model, optimizer, weight_net, train_batch, meta_batch, p, eps, constraint, backend,
               label_smoothing, train_outputs, train_rng, autocast, scale, distill=None,
               criterion: Optional[ExitCriterion] = None,
               real_update: Tuple = (None, "norm", None, 1, None)) -> MetaStepResult:
    eps = check_eps(eps)
    check_choice(constraint, CONSTRAINTS, "constraint")
    x_train, y_train = _check_batch(train_batch, "train_batch")
    x_meta, y_meta = _check_batch(meta_batch, "meta_batch")
    runner = make_backend(backend, model)
    params = runner.params()
    trainable = [i for i, inside in enumerate(in_optimizer(optimizer, params)) if inside]
    if not trainable:
        raise ValueError("no model parameter is in the optimizer: pass the optimizer that trains this model")
    clip_grad, clip_mode, accumulated, accum_steps, clip_parameters = real_update
    if accumulated is not None:
        accumulated = list(accumulated)
        if len(accumulated) != len(params):
            raise ValueError(f"accumulated_grads needs one entry (or None) per model parameter ({len(params)}), "
                             f"got {len(accumulated)}")
        steps = set(trainable)
        accumulated = [a.detach() if a is not None and i in steps else None for i, a in enumerate(accumulated)]
    update = RealUpdate(optimizer, params, accumulated, accum_steps, clip_grad, clip_mode,
                        clip_mask(params, clip_parameters))
    num_exits = weight_net.num_exits
    p = distribution_values(p, num_exits)  # Python floats: the meta loss's counts need no tensor read
    phi = list(weight_net.parameters())
    device = x_train.device

    # 1. virtual step: theta' = the real update of theta with the weighted loss's gradient on the training half
    shared = train_outputs is not None
    if not shared:
        train_rng = rng_state(device)
        with autocast():
            train_outputs = runner.forward(params, x_train)
    train_outputs = check_multi_exit_output(train_outputs, num_exits)
    losses = exit_losses(train_outputs, y_train, criterion=criterion)  # CE: the predictor's input
    train_losses = training_losses(train_outputs, y_train, distill=distill, ce=losses)  # what W multiplies
    weights = sample_weights(weight_net, losses, train_outputs, eps, constraint)
    if eps == 0:  # weights do not depend on phi: the meta gradient is zero
        with torch.no_grad(), autocast():
            value = meta_loss(runner.forward(params, x_meta), y_meta, p, criterion)
        grads: List[Optional[Tensor]] = [None] * len(phi)
    else:
        def meta_value(new_params: Sequence[Tensor]) -> Tensor:  # 2. on the meta half, at theta'
            with autocast():
                meta_outputs = runner.forward(new_params, x_meta)
            return meta_loss(check_multi_exit_output(meta_outputs, num_exits), y_meta, p, criterion)

        def train_losses_at(values: Sequence[Tensor]) -> Tensor:
            return training_losses(runner.forward(values, x_train), y_train, distill=distill, criterion=criterion)

        value, grads = runner.meta_gradient(VirtualStep(
            params, trainable, update, phi, weights, train_losses, scale, shared, meta_value, train_losses_at,
            autocast, train_rng, device))
    grads_out = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(phi, grads)]
    for t, g in zip(phi, grads_out):
        t.grad = g.clone()
    return MetaStepResult(meta_loss=value.detach(), grads=grads_out, weights=weights.detach())


# -- around the meta step: ranks and the predictor's optimizer ---------------------------------
def distributed() -> bool:
    """Whether several processes train together (torch.distributed initialised, world size > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place across ranks (no-op without torch.distributed)."""
    if not tensors or not distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def meta_adam(weight_net: nn.Module, lr: float, weight_decay: float) -> Tuple[torch.optim.Adam, bool]:
    """The predictor's Adam, fused where torch has the kernel for its device (numerically the same update;
    it can skip a step on the device); ``(optimizer, fused)``."""
    params = list(weight_net.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay), False


def predictor_step(optimizer: torch.optim.Optimizer, applied: Tensor, scaler: Optional[torch.amp.GradScaler] = None,
                   fused: bool = False) -> None:
    """The meta optimizer's step unless ``applied`` (0-dim bool) is False, then the scaler's update and
    ``zero_grad``. A fused Adam is told to skip on the device (``found_inf``, as ``torch.amp.GradScaler``
    tells it), which leaves the predictor, the moments and the step count exactly as they were; only the
    fp16 ``'amp'`` policy (``scaler``) and an Adam without a fused kernel decide on the host."""
    if scaler is None and fused:  # skipped on the device when not applied: no host read
        optimizer.found_inf = (~applied).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(applied):  # the host decides (GradScaler, or no fused Adam here)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()  # halves the scale after an overflow, doubles it after a run of finite steps
    optimizer.zero_grad(set_to_none=True)

"""The L2W meta step and the hook that adds it to an existing training loop.

docs/method.md §5 (one training step): a virtual step of the model with the weighted loss on the
training half (the real optimizer's update, :func:`timm_l2w.optim_step.virtual_step`, after the
loop's gradient clipping and accumulation; kept differentiable w.r.t. the weight predictor), the meta
loss of the virtually updated model on the meta half with the confidence-based exit assignment, the second-order
gradient of that meta loss w.r.t. the predictor, and the meta optimizer's step. Then the real step
uses the updated predictor's weights.

Two interchangeable backends run the model with the virtual parameters: ``'higher'`` (a cached
``higher.patch.monkeypatch`` of the model, fed the fast weights) and ``'func'``
(``torch.func.functional_call``). Neither copies the model per step, and both run on cloned
buffers, so the real parameters, optimizer state and BatchNorm statistics are never touched. Both
run the model in train mode, whatever the real model's mode, so its forward returns the tuple of
every exit's logits (the multi-exit output convention, :mod:`timm_l2w.models.base`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .exits import assign_exits_static, check_distribution, distribution_values, exit_counts, exit_distribution
from .models.base import check_multi_exit_output, unwrap_model
from .optim_step import CLIP_MODES, check_optimizer, clip_gradients, grad_coefficients, in_optimizer, unwrap_optimizer, virtual_step
from .optim_step.torch_rules import SGDSlot, sgd_update
from .optim_step.torch_rules import sgd_slots as _sgd_slots
from .validation import PAPER_P_INDICES, Range, check_label_smoothing, check_number
from .weighting import (
    CONSTRAINTS,
    INPUT_TYPES,
    WeightPredictor,
    _check_choice,
    _check_eps,
    exit_confidences,
    exit_losses,
    Distillation,
    ExitCriterion,
    sample_weights,
    training_losses,
    weighted_multi_exit_loss,
)

__all__ = [
    "BACKENDS",
    "META_PRECISIONS",
    "SGDSlot",
    "sgd_slots",
    "virtual_sgd_step",
    "virtual_step",
    "meta_loss",
    "make_backend",
    "rng_state",
    "MetaStepResult",
    "meta_step",
    "L2W",
]

BACKENDS = ("higher", "func")
META_PRECISIONS = ("fp32", "amp")  # the meta step's arithmetic under mixed precision (L2W(meta_precision=...))
Batch = Tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# The virtual step: timm_l2w.optim_step (every supported optimizer); the SGD-only names stay
# --------------------------------------------------------------------------------------------
def sgd_slots(optimizer: Any, params: Sequence[Tensor]) -> List[Optional[SGDSlot]]:
    """The SGD settings and momentum buffer of every parameter (``None``: not in the optimizer), for
    :func:`virtual_sgd_step`; the general form is :func:`timm_l2w.optim_step.virtual_step`."""
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"sgd_slots reads torch.optim.SGD, got {type(optimizer).__name__}: use "
                        "timm_l2w.optim_step.virtual_step(optimizer, params, grads) for any supported optimizer")
    return _sgd_slots(optimizer, params)


def virtual_sgd_step(
    params: Sequence[Tensor], grads: Sequence[Optional[Tensor]], slots: Sequence[Optional[SGDSlot]]
) -> List[Tensor]:
    """``theta'`` exactly as ``torch.optim.SGD.step`` would compute it, out of place and differentiable
    (:func:`timm_l2w.optim_step.torch_rules.sgd_update`). Parameters without a slot or a gradient stay
    as they are (SGD skips them)."""
    return [p if s is None or g is None else sgd_update(p, g, s) for p, g, s in zip(params, grads, slots)]


@dataclass
class _RealUpdate:
    """How the real update turns the training half's gradient ``g`` into theta': the optimizer input is
    ``accumulated + g / accum_steps`` (gradient accumulation), clipped as the loop clips, then the
    optimizer's rule. Every step is differentiable in ``g``."""

    optimizer: Any
    params: List[Tensor]  # the model's parameters, in backend order
    accumulated: Optional[List[Optional[Tensor]]] = None  # .grad of the window's earlier micro-batches
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"

    def gradients(self, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """What the optimizer sees: (accumulated +) this micro-batch's gradient / accum_steps, (clipped)."""
        grads = list(grads)
        if self.accum_steps != 1:
            grads = [None if g is None else g / self.accum_steps for g in grads]
        if self.accumulated is not None:
            grads = [a if g is None else g if a is None else a + g for a, g in zip(self.accumulated, grads)]
        if self.clip_grad is not None:
            grads = clip_gradients(grads, self.params, self.clip_grad, self.clip_mode)
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


def rng_state(device: torch.device | str | None = None) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """The CPU (and CUDA ``device``) random state, to replay the same dropout masks later."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # a CUDA graph captures no RNG state (timm_l2w.cuda_graphs refuses stochastic models with 'func')
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state: Optional[Tuple[Tensor, Optional[Tensor]]], device: torch.device) -> Iterator[None]:
    if state is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        yield  # (a CUDA graph can neither read nor set the RNG state: timm_l2w.cuda_graphs refuses dropout with 'func')
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


# --------------------------------------------------------------------------------------------
# The meta loss
# --------------------------------------------------------------------------------------------
def meta_loss(outputs: Sequence[Tensor], target: Tensor, p: Tensor | Sequence[float], criterion: Any = None) -> Tensor:
    """Sum over exits (with at least one sample) of the mean CE of the samples assigned to that exit.

    ``target``: class indices or class probabilities (Mixup); ``criterion``: the training loss
    (:class:`~timm_l2w.weighting.ExitCriterion`, e.g. timm's BinaryCrossEntropy), scored without its
    label smoothing (CE by default).

    The assignment is :func:`timm_l2w.exits.assign_exits` on the detached confidences with the
    training distribution ``p`` (selection without gradient). Non-finite outputs (a virtual step that
    overflowed, e.g. under fp16) give a NaN meta loss, which :class:`L2W` skips, instead of an error.
    No host read: the counts ``floor(n p_k)`` come from ``n`` and ``p`` (:func:`~timm_l2w.exits.exit_counts`),
    the assignment has static shapes and the finiteness test selects the result on the device.
    """
    outputs = check_multi_exit_output(outputs)
    losses = exit_losses(outputs, target, criterion=None if criterion is None else
                         ExitCriterion.from_module(criterion).unsmoothed())
    conf = exit_confidences(outputs)
    n, num_exits = conf.shape
    finite = torch.isfinite(conf).all()
    assigned = assign_exits_static(torch.where(finite, conf, torch.zeros_like(conf)), exit_counts(n, p, num_exits))
    mask = (assigned[:, None] == torch.arange(num_exits, device=assigned.device)).to(losses.dtype)
    value = ((losses * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)).sum()
    return torch.where(finite, value, torch.full_like(value, float("nan")))


# --------------------------------------------------------------------------------------------
# Backends: run the model with given parameters, on cloned buffers
# --------------------------------------------------------------------------------------------
class _Backend:
    """Runs ``model`` (unwrapped) with a list of parameters in ``model.named_parameters()`` order."""

    name = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]

    def params(self) -> List[Tensor]:
        """The model's current parameters, in the order :meth:`forward` expects."""
        return [p for _, p in self.model.named_parameters()]

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Any:
        raise NotImplementedError


class FuncBackend(_Backend):
    """``torch.func.functional_call`` with the given parameters and clones of the buffers."""

    name = "func"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # train-mode BatchNorm normalises with batch statistics; passing None for its running
        # statistics skips their update (nothing to clone, nothing mutated under forward AD)
        plain_bn = {
            f"{prefix}.{b}" if prefix else b
            for prefix, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            for b in ("running_mean", "running_var", "num_batches_tracked")
        }
        self._bn_buffers = [n for n, _ in model.named_buffers() if n in plain_bn]

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Any:
        state: Dict[str, Optional[Tensor]] = {
            n: b.clone() for n, b in self.model.named_buffers() if n not in self._bn_buffers
        }
        state.update(dict.fromkeys(self._bn_buffers))
        state.update(zip(self.names, params))
        was_training = self.model.training
        self.model.train()  # the meta step runs in train mode (docs/method.md §5): forward returns every exit
        # an instance-level forward (accelerate's autocast wrapper) would override the meta step's own
        # precision: call the class's forward (as the 'higher' backend does)
        wrapper = self.model.__dict__.pop("forward", None)
        try:
            return torch.func.functional_call(self.model, state, (x,))
        finally:
            if wrapper is not None:
                self.model.forward = wrapper
            if not was_training:
                self.model.train(False)


class HigherBackend(_Backend):
    """A ``higher.patch.monkeypatch`` of the model, built once and fed the fast weights each call.

    The patched module keeps its own buffers, re-synchronised (cloned) from the real model on every
    call, so BatchNorm statistics of the real model are never updated.
    """

    name = "higher"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        import higher

        self._higher = higher
        self._signature = self._shape_signature()
        self.fmodel = higher.patch.monkeypatch(model, copy_initial_weights=False, track_higher_grads=True)
        self.fmodel.train()  # its own mode flags: train mode, so its forward returns every exit (a tuple)
        # an instance-level forward (accelerate's autocast wrapper) is copied over by the patch and
        # would call the unpatched forward: drop it (meta_step runs its own autocast)
        for m in self.fmodel.modules():
            m.__dict__.pop("forward", None)
        # the patched submodules keep the last fast weights as attributes (and the root appends
        # them to a list); remember the placeholders to release every call's weights afterwards
        self._placeholders = [(m, dict(m._parameters)) for m in self.fmodel.modules()]
        self._release()

    def _release(self) -> None:
        for module, placeholders in self._placeholders:
            module._parameters.update(placeholders)
        self.fmodel._fast_params = None

    def _shape_signature(self) -> Tuple:
        return tuple((n, tuple(p.shape)) for n, p in self.model.named_parameters())

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Any:
        if self._shape_signature() != self._signature:
            raise RuntimeError(
                "the model's parameters changed after the L2W hook was built (e.g. reset_classifier): "
                "build a new L2W / backend after changing the model"
            )
        self._higher.patch.buffer_sync(self.model, self.fmodel)
        if hasattr(self.model, "gradient_equilibrium"):  # attributes were copied when patching: follow the model
            self.fmodel.gradient_equilibrium = self.model.gradient_equilibrium
        try:
            return self.fmodel(x, params=list(params))
        finally:
            self._release()  # do not keep this step's graph alive


def make_backend(backend: str | _Backend, model: nn.Module) -> _Backend:
    """A backend object for ``model`` (unwrapped first) from its name, or ``backend`` as it is."""
    if isinstance(backend, _Backend):
        return backend
    _check_choice(backend, BACKENDS, "backend")
    model = unwrap_model(model)
    return HigherBackend(model) if backend == "higher" else FuncBackend(model)


# --------------------------------------------------------------------------------------------
# The meta step
# --------------------------------------------------------------------------------------------
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
        raise ValueError(f"{name}: inputs and targets need the same non-zero batch size, got {x.shape[0]} and {y.shape[0]}")
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
    backend: str | _Backend = "higher",
    label_smoothing: float = 0.0,
    train_outputs: Optional[Sequence[Tensor]] = None,
    train_rng: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    loss_scale: float = 1.0,
    distill: Optional[Distillation] = None,
    criterion: Any = None,
    clip_grad: Optional[float] = None,
    clip_mode: str = "norm",
    accumulated_grads: Optional[Sequence[Optional[Tensor]]] = None,
    grad_accum_steps: int = 1,
) -> MetaStepResult:
    """Steps 1-2 of the training step (docs/method.md §5) and the meta gradient of step 3.

    Leaves ``d meta_loss / d phi`` in the predictor's ``.grad`` (replacing what was there) and
    returns it; stepping the meta optimizer is the caller's job (:class:`L2W` does it).
    ``train_outputs`` may pass the model's outputs on the training half that are already computed
    (with their graph, at the current parameters) to save the virtual forward; ``train_rng``
    (:func:`rng_state` taken right before that forward) lets the ``'func'`` backend replay its
    dropout masks.

    The virtual step is the real update (docs/method.md §5, "The virtual step of any optimizer"):
    the optimizer's input is ``accumulated_grads + g / grad_accum_steps`` (``g`` the weighted-loss
    gradient of the training half; ``accumulated_grads``, in ``model.named_parameters()`` order, what
    the window's earlier micro-batches left in ``.grad``), clipped as timm's
    ``dispatch_clip_grad(model.parameters(), clip_grad, clip_mode)`` would clip it (``clip_grad=None``:
    no clipping; modes ``'norm'``, ``'value'``, ``'agc'``), then ``optimizer``'s own update rule
    (:func:`timm_l2w.optim_step.virtual_step`: SGD, AdamW, LAMB, ...).

    Both backends compute the same exact second-order gradient. ``'higher'`` differentiates
    through the virtual step (``create_graph``, reverse over reverse). ``'func'`` uses that ``g`` is
    linear in the weights: ``d meta / d W[i, k] = <u, grad_theta L[i, k]> / B`` with
    ``u = (d theta' / d g)^T v`` and ``v = d meta / d theta'``; ``u`` is one reverse-mode product
    through the update alone (no model forward; for SGD without clipping ``d theta' / d g`` is a
    number per parameter), then one forward-mode Jacobian-vector product of the training losses,
    which is cheaper.

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
    clip_grad, clip_mode = _check_clip(clip_grad, clip_mode)
    grad_accum_steps = check_number(grad_accum_steps, "grad_accum_steps", Range(1, integer=True))
    name = backend.name if isinstance(backend, _Backend) else backend
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), _derivatives_of(name):
        return _meta_step(model, optimizer, weight_net, train_batch, meta_batch, p, eps, constraint, backend,
                          label_smoothing, train_outputs, train_rng, autocast, float(loss_scale), distill,
                          ExitCriterion.from_module(criterion, label_smoothing),
                          (clip_grad, clip_mode, accumulated_grads, grad_accum_steps))


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
        other = "func" if backend == "higher" else "higher"
        need = ("second derivatives (backward of backward)" if backend == "higher"
                else "forward-mode derivatives")
        raise ValueError(f"the '{backend}' meta backend needs {need}, which torch does not implement for {op} "
                         f"(an op of this model): use backend='{other}' (timm-l2w train --backend {other})") from None


def _check_clip(clip_grad: Optional[float], clip_mode: str) -> Tuple[Optional[float], str]:
    clip_mode = _check_choice(clip_mode, CLIP_MODES, "clip_mode")
    if clip_grad is not None:
        clip_grad = check_number(clip_grad, "clip_grad", Range(0, low_open=True, hint=(
            "the max norm ('norm'), max |value| ('value') or clip factor ('agc'), as timm's --clip-grad; None: no clipping")))
    return clip_grad, clip_mode


def _meta_step(model, optimizer, weight_net, train_batch, meta_batch, p, eps, constraint, backend,
               label_smoothing, train_outputs, train_rng, autocast, scale, distill=None,
               criterion: Optional[ExitCriterion] = None, real_update: Tuple = (None, "norm", None, 1)) -> MetaStepResult:
    eps = _check_eps(eps)
    _check_choice(constraint, CONSTRAINTS, "constraint")
    x_train, y_train = _check_batch(train_batch, "train_batch")
    x_meta, y_meta = _check_batch(meta_batch, "meta_batch")
    runner = make_backend(backend, model)
    params = runner.params()
    trainable = [i for i, inside in enumerate(in_optimizer(optimizer, params)) if inside]
    if not trainable:
        raise ValueError("no model parameter is in the optimizer: pass the optimizer that trains this model")
    clip_grad, clip_mode, accumulated, accum_steps = real_update
    if accumulated is not None:
        accumulated = list(accumulated)
        if len(accumulated) != len(params):
            raise ValueError(f"accumulated_grads needs one entry (or None) per model parameter ({len(params)}), "
                             f"got {len(accumulated)}")
        steps = set(trainable)
        accumulated = [a.detach() if a is not None and i in steps else None for i, a in enumerate(accumulated)]
    update = _RealUpdate(optimizer, params, accumulated, accum_steps, clip_grad, clip_mode)
    num_exits = weight_net.num_exits
    p = distribution_values(p, num_exits)  # Python floats: the meta loss's counts need no tensor read
    phi = list(weight_net.parameters())
    device = x_train.device

    # 1. virtual step: theta' = SGD(theta, grad of the weighted loss on the training half)
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
    elif runner.name == "higher":
        virtual_loss = (weights * train_losses).mean(dim=0).sum()
        grads_theta = _unscale(torch.autograd.grad(
            virtual_loss * scale, [params[i] for i in trainable], create_graph=True, retain_graph=True, allow_unused=True
        ), scale)
        new_params = update.step(_scatter(grads_theta, trainable, len(params)))
        # 2. meta loss of the virtually updated model on the meta half
        with autocast():
            meta_outputs = runner.forward(new_params, x_meta)
        value = meta_loss(check_multi_exit_output(meta_outputs, num_exits), y_meta, p, criterion)
        # 3. second-order gradient into the predictor (through the virtual step)
        grads = list(torch.autograd.grad(value * scale, phi, allow_unused=True))
    else:
        virtual_loss = (weights.detach() * train_losses).mean(dim=0).sum()
        grads_theta = _unscale(torch.autograd.grad(
            virtual_loss * scale, [params[i] for i in trainable], retain_graph=shared, allow_unused=True
        ), scale)
        full_grads = _scatter(grads_theta, trainable, len(params))
        values = [t.detach() for t in params]
        coefficients = update.coefficients()
        if coefficients is not None:  # SGD: d theta' / d g is one number per parameter
            with torch.no_grad():
                new_params = update.step(full_grads, values)
            moved = [i for i in trainable if full_grads[i] is not None]
            for i in moved:
                new_params[i].requires_grad_(True)
        else:  # keep the update's graph in g (the update alone: no model forward in it)
            leaves = [None if g is None else g.detach().requires_grad_(True) for g in full_grads]
            stepped_graph = update.step(leaves, values)
            moved = [i for i in range(len(params)) if stepped_graph[i] is not values[i]]  # theta' != theta
            new_params = list(values)
            for i in moved:
                new_params[i] = stepped_graph[i].detach().requires_grad_(True)
        # 2. meta loss of the virtually updated model on the meta half, and v = d meta / d theta'
        with autocast():
            meta_outputs = runner.forward(new_params, x_meta)
        value = meta_loss(check_multi_exit_output(meta_outputs, num_exits), y_meta, p, criterion)
        v = torch.autograd.grad(value * scale, [new_params[i] for i in moved], allow_unused=True)  # scaled
        # 3. u = (d theta' / d g)^T v, then d meta / d W = J_L u / B by forward mode (scaled like v)
        if coefficients is not None:
            tangents = {i: coefficients[i] * g for i, g in zip(moved, v) if g is not None}
        else:
            tangents = _vjp_through_update(stepped_graph, moved, v, leaves)
        with fwAD.dual_level(), torch.no_grad(), _replay_rng(train_rng, device), autocast(), warnings.catch_warnings():
            # torch's forward AD scripts its decompositions on first use (a jit deprecation warning)
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            duals = [fwAD.make_dual(t.detach(), tangents[i]) if i in tangents else t.detach()
                     for i, t in enumerate(params)]
            tangent = fwAD.unpack_dual(training_losses(runner.forward(duals, x_train), y_train, distill=distill,
                                                       criterion=criterion)).tangent
        if tangent is None:  # no parameter moved: nothing depends on phi
            grads = [None] * len(phi)
        else:
            grads = list(torch.autograd.grad(
                weights, phi, grad_outputs=tangent.to(weights.dtype) / weights.shape[0], allow_unused=True
            ))
    grads_out = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(phi, grads)]
    for t, g in zip(phi, grads_out):
        t.grad = g.clone()
    return MetaStepResult(meta_loss=value.detach(), grads=grads_out, weights=weights.detach())


def _unscale(grads: Sequence[Optional[Tensor]], scale: float) -> Sequence[Optional[Tensor]]:
    """``grads / scale`` (differentiably; as they are for ``scale == 1``)."""
    return grads if scale == 1.0 else [None if g is None else g / scale for g in grads]


def _scatter(values: Sequence[Optional[Tensor]], index: Sequence[int], size: int) -> List[Optional[Tensor]]:
    full: List[Optional[Tensor]] = [None] * size
    for i, v in zip(index, values):
        full[i] = v
    return full


def _vjp_through_update(stepped: Sequence[Tensor], moved: Sequence[int], v: Sequence[Optional[Tensor]],
                        leaves: Sequence[Optional[Tensor]]) -> Dict[int, Tensor]:
    """``u = (d theta' / d g)^T v`` by one reverse-mode pass through the update's graph: ``stepped`` theta'
    (a graph in the gradient ``leaves``), ``v`` = d meta / d theta' for the ``moved`` parameters."""
    pairs = [(stepped[i], g) for i, g in zip(moved, v) if g is not None and stepped[i].requires_grad]
    inputs = [i for i, leaf in enumerate(leaves) if leaf is not None]
    if not pairs or not inputs:
        return {}
    u = torch.autograd.grad([t for t, _ in pairs], [leaves[i] for i in inputs], grad_outputs=[g for _, g in pairs],
                            allow_unused=True)
    return {i: g for i, g in zip(inputs, u) if g is not None}


# --------------------------------------------------------------------------------------------
# The hook for an existing training loop
# --------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place across ranks (no-op without torch.distributed)."""
    if not tensors or not _distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def _meta_adam(weight_net: nn.Module, lr: float, weight_decay: float) -> Tuple[torch.optim.Adam, bool]:
    """The predictor's Adam, fused where torch has the kernel for its device (numerically the same update;
    it can skip a step on the device); ``(optimizer, fused)``."""
    params = list(weight_net.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay), False


class L2W:
    """Learning to weight samples (docs/method.md) as a hook for an existing training loop.

    Usage::

        l2w = L2W(model, optimizer, eps=0.8, constraint='col', total_steps=2 * len(loader) * epochs)
        for x, y in loader:
            for xt, yt in l2w.split(x, y):      # two halves, each the other's meta set
                outputs = model(xt)            # train mode: the tuple of every exit's logits
                loss = l2w.loss(outputs, yt)   # meta step (every meta_interval updates), then
                optimizer.zero_grad()          # the weighted loss from the updated predictor
                loss.backward()                # or accelerator.backward(loss)
                optimizer.step()

    ``total_steps`` counts model updates (optimizer steps: two per loader batch, ``2 / N`` when N
    micro-batches are accumulated) and sets the cosine annealing of the meta learning rate; ``None``
    keeps it constant. ``target_p_index`` j picks the training distribution ``p_k ∝ (j/20)**k``;
    ``target_p`` gives it directly instead. Calling :meth:`loss` outside :meth:`split` gives the
    weighted loss without a meta step.

    ``optimizer`` is the loop's own optimizer, any class :mod:`timm_l2w.optim_step` reproduces: torch's
    SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adadelta and timm's SGDW, NAdamW,
    RMSpropTF, Lamb, Lars, Adan, Adopt, LaProp, AdaBelief, AdamWLegacy, ... with all their param groups
    (timm's no-decay group, layer decay), state and options. The virtual step is exactly the update its
    ``step()`` would make; a sign update (Lion, Rprop) is refused, as its meta gradient would be zero.

    ``clip_grad`` / ``clip_mode`` say how the loop clips the gradients before ``optimizer.step()``, in
    timm's terms: ``dispatch_clip_grad(model.parameters(), clip_grad, clip_mode)`` with ``'norm'``
    (``accelerator.clip_grad_norm_``), ``'value'`` (``accelerator.clip_grad_value_``) or ``'agc'``
    (``timm.utils.adaptive_clip_grad``). The virtual step clips the same way, differentiably, so theta'
    is the clipped update; L2W does not clip the real gradients (the loop still does).

    Gradient accumulation over N micro-batches (a micro-batch is one half of :meth:`split`):
    ``Accelerator(gradient_accumulation_steps=N)`` with ``with accelerator.accumulate(model):`` around
    each micro-batch's forward, ``loss``, ``accelerator.backward``, ``optimizer.step()``,
    ``optimizer.zero_grad()`` (in that order), or ``grad_accum_steps=N`` without accelerate, in a loop
    that backpropagates ``loss / N`` and steps after every N-th micro-batch. The meta step runs only on
    the micro-batch after whose backward the optimizer steps (accelerate's ``sync_gradients``), and its
    virtual step is that accumulated update: the gradients already in ``.grad`` from the window's
    earlier micro-batches (a constant) plus this micro-batch's weighted-loss gradient / N, clipped, then
    the optimizer's rule. The other micro-batches get the weighted loss of the current predictor.
    ``meta_interval`` and ``total_steps`` count real updates. A window must start with empty (or zero)
    ``.grad``: gradients left over from before it are an error naming the order to use.

    ``meta_precision`` is the meta step's arithmetic when the real step runs in mixed precision.
    ``'fp32'`` (default): autocast off for the whole meta step, so it runs in the parameters' dtype
    while the real step keeps bf16/fp16 (the training half's outputs are reused only when they are
    in that dtype, else recomputed). ``'amp'``: the meta step's forwards run under the real step's
    autocast (``accelerator.autocast()``, or the autocast around :meth:`loss` without an accelerator),
    with a dynamic loss scale (``torch.amp.GradScaler``, :attr:`meta_scaler`) under fp16. Under bf16
    the ``'amp'`` meta gradient is mostly rounding noise early in training (docs/precision.md).
    Either way a meta step with a non-finite meta loss or gradient is skipped and counted in
    :attr:`meta_skipped` (under ``'amp'`` + fp16 that also lowers the loss scale).

    ``criterion`` is the training loop's loss module (``None``: cross-entropy with ``label_smoothing``;
    timm's ``SoftTargetCrossEntropy`` for Mixup / CutMix targets, ``BinaryCrossEntropy``, ...:
    :meth:`timm_l2w.ExitCriterion.from_module`): the weighted loss, the predictor's input and the meta
    loss (without label smoothing) all use it, and the targets may be class probabilities.

    ``distill`` (:class:`timm_l2w.Distillation`) adds IMTA's one-for-all knowledge distillation to
    every exit's loss, in the real step and in the virtual step alike (the predictor still reads the
    CE losses; the meta loss stays CE). IMTA's gradient equilibrium is a model setting
    (``model.set_gradient_equilibrium()``), followed by both backends.

    ``cuda_graphs=True`` records the meta update (the training half's forward, virtual step, meta loss,
    second-order backward, predictor step) as a CUDA graph per half of the loader batch and replays it
    (:mod:`timm_l2w.cuda_graphs`; :meth:`split` copies each loader batch into static buffers). It needs a
    CUDA device, torch SGD as the real optimizer and the fused Adam of the predictor; otherwise, or when the
    capture fails, a warning says why and the meta update runs eagerly. The meta update then takes the
    targets given to :meth:`split`. ``timm-l2w train --cuda-graphs`` captures its whole update instead
    (the real step too).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        num_exits: Optional[int] = None,
        eps: float = 0.8,
        constraint: str = "col",
        input_type: str = "loss",
        target_p_index: int = 15,
        target_p: Optional[Sequence[float] | Tensor] = None,
        hidden_sizes: Sequence[int] = (500,),
        meta_interval: int = 1,
        meta_lr: float = 1e-4,
        meta_weight_decay: float = 1e-4,
        total_steps: Optional[int] = None,
        backend: str = "higher",
        label_smoothing: float = 0.0,
        accelerator: Any = None,
        weight_net: Optional[WeightPredictor] = None,
        share_forward: bool = True,
        meta_precision: str = "fp32",
        distill: Optional[Distillation] = None,
        criterion: Any = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = "norm",
        grad_accum_steps: Optional[int] = None,
        cuda_graphs: bool = False,
    ):
        net = unwrap_model(model)
        model_exits = getattr(net, "num_exits", None)
        if num_exits is None:
            if model_exits is None:
                raise ValueError(
                    f"{type(net).__name__} is not a multi-exit model (no num_exits): L2W weights the losses of "
                    "several exits. Use a timm_l2w model (e.g. timm.create_model('msdnet_l2w_cifar')) or make "
                    "your backbone multi-exit with timm_l2w.MultiExitWrapper('resnet18', exit_indices=(1, 2, 3, 4), "
                    "num_classes=...)")
            num_exits = int(model_exits)
        if model_exits is not None and int(model_exits) != num_exits:
            raise ValueError(f"num_exits={num_exits} but the model has {model_exits} exits: pass num_exits={model_exits}")
        if weight_net is not None and weight_net.num_exits != num_exits:
            raise ValueError(
                f"weight_net predicts {weight_net.num_exits} exits but the model has {num_exits}: "
                f"build WeightPredictor(num_exits={num_exits})"
            )
        check_number(meta_interval, "meta_interval", Range(1, integer=True, hint="paper: 1 CIFAR, 100 ImageNet"))
        if total_steps is not None:
            check_number(total_steps, "total_steps", Range(1, integer=True, hint="updates, or None for a constant meta lr"))
        meta_lr = check_number(meta_lr, "meta_lr", Range(0, low_open=True, hint="paper: 1e-4"))
        meta_weight_decay = check_number(meta_weight_decay, "meta_weight_decay", Range(0, hint="paper: 1e-4"))
        _check_choice(backend, BACKENDS, "backend")
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        check_optimizer(optimizer)  # fail early on an optimizer the virtual step cannot reproduce
        self.clip_grad, self.clip_mode = _check_clip(clip_grad, clip_mode)
        accelerate_steps = self._accelerate_accum_steps()
        if grad_accum_steps is not None:
            grad_accum_steps = check_number(grad_accum_steps, "grad_accum_steps", Range(1, integer=True, hint=(
                "micro-batches (calls of loss() inside split()) per optimizer update")))
            if accelerate_steps > 1 and grad_accum_steps != accelerate_steps:
                raise ValueError(
                    f"grad_accum_steps={grad_accum_steps} but the accelerator accumulates {accelerate_steps} "
                    "micro-batches: give the number once, as Accelerator(gradient_accumulation_steps=...)")
        self.grad_accum_steps = accelerate_steps if accelerate_steps > 1 else (grad_accum_steps or 1)
        self._micro = 0  # micro-batches since the last real update
        self.meta_step_ran = False  # whether the last loss() call ran a meta step
        self.num_exits = num_exits
        self.eps = _check_eps(eps)
        self.constraint = _check_choice(constraint, CONSTRAINTS, "constraint")
        self.input_type = _check_choice(input_type, INPUT_TYPES, "input_type")
        if target_p is None:
            check_number(target_p_index, "target_p_index", PAPER_P_INDICES)
            target_p = exit_distribution(target_p_index / 20, num_exits)
        self.p = check_distribution(target_p, num_exits)
        self._p_values = distribution_values(self.p, num_exits)  # what meta_step gets: no tensor read per step
        self.meta_interval, self.total_steps = meta_interval, total_steps
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.criterion = ExitCriterion.from_module(criterion, self.label_smoothing)
        self.share_forward = share_forward
        self.meta_precision = _check_choice(meta_precision, META_PRECISIONS, "meta_precision")
        if distill is not None and not isinstance(distill, Distillation):
            raise TypeError(f"distill must be a timm_l2w.Distillation(temperature, alpha) or None, got {distill!r}")
        self.distill = distill
        self.meta_scaler: Optional[torch.amp.GradScaler] = None  # 'amp' under fp16 autocast: created on first use
        self._meta_scaler_state: Optional[Dict[str, Any]] = None
        self._fused_attention = any(getattr(m, "fused_attn", False) for m in unwrap_model(model).modules())
        self._backend = make_backend(backend, net)
        ref = next(net.parameters())
        dtype = ref.dtype if ref.is_floating_point() else None
        self._dtype = dtype
        if weight_net is None:
            weight_net = WeightPredictor(num_exits, input_type, hidden_sizes)
        self.weight_net = weight_net.to(device=ref.device, dtype=dtype)
        if _distributed():  # every rank starts from rank 0's predictor
            for t in self.weight_net.parameters():
                dist.broadcast(t.data, src=0)
        self.meta_optimizer, self._fused_meta = _meta_adam(self.weight_net, meta_lr, meta_weight_decay)
        self.meta_lr = meta_lr  # peak of the cosine schedule (_set_meta_lr)
        self.step = 0
        # the meta loss, the skip decision and the skip count stay on the device (read lazily: properties)
        self.last_meta_loss_tensor: Optional[Tensor] = None
        self.last_meta_applied: Optional[Tensor] = None  # bool: the last meta step updated the predictor
        self._meta_skipped: Tensor | int = 0  # meta steps skipped (non-finite); not saved in state_dict
        self.host_bookkeeping = True  # loss() advances the update counter (timm_l2w.cuda_graphs replays do it)
        self.last_meta_grads: Optional[List[Tensor]] = None
        self.last_weights: Optional[Tensor] = None
        self._halves: Optional[Tuple[Batch, Batch]] = None
        self._current = -1
        self._rng: Optional[Tuple[Tensor, Optional[Tensor]]] = None
        self._graphs = self._meta_graphs(ref.device, optimizer, backend, net) if cuda_graphs else None

    def _meta_graphs(self, device: torch.device, optimizer: Any, backend: str, net: nn.Module) -> Any:
        """The graph runner of ``cuda_graphs=True`` (disabled, with the reason warned, where it cannot run)."""
        from .cuda_graphs import GraphedUpdates, capture_blocker

        real = unwrap_optimizer(optimizer)
        blocker = capture_blocker(device, [self.meta_optimizer], backend, net,
                                  gradient_accumulation=self.grad_accum_steps > 1, meta_precision_amp=self.meta_precision == "amp")
        if blocker is None and type(real) is not torch.optim.SGD:
            blocker = f"the captured virtual step reads the learning rate on the device for torch SGD only, not {type(real).__name__}"
        return GraphedUpdates([self.meta_optimizer, real], blocker=blocker,
                              log=lambda line: warnings.warn(line.replace("timm-l2w train", "L2W"), RuntimeWarning))

    # -- what the last meta step did (device values, read only when asked) -------------------
    @property
    def last_meta_loss(self) -> Optional[float]:
        """The last meta step's meta loss (reading it waits for the device; ``last_meta_loss_tensor`` does not)."""
        return None if self.last_meta_loss_tensor is None else float(self.last_meta_loss_tensor)

    @property
    def last_meta_skipped(self) -> bool:
        """Whether the last meta step was skipped (non-finite meta loss or gradient); reading it syncs."""
        return self.last_meta_applied is not None and not bool(self.last_meta_applied)

    @property
    def meta_skipped(self) -> int:
        """Meta steps skipped so far for a non-finite meta loss or gradient (reading it syncs)."""
        return int(self._meta_skipped)

    @meta_skipped.setter
    def meta_skipped(self, value: int) -> None:
        self._meta_skipped = int(value)

    # -- the schedule ------------------------------------------------------------------------
    def split(self, x: Tensor, y: Tensor) -> Iterator[Batch]:
        """Yield the two halves of a loader batch; each is the meta set of the other's update."""
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"split expects tensors (inputs, targets), got {type(x).__name__}, {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and targets have different batch sizes ({x.shape[0]} vs {y.shape[0]})")
        if x.shape[0] < 2:
            raise ValueError(
                f"a batch of {x.shape[0]} sample(s) cannot be split into a training half and a meta half: "
                "use a batch size >= 2 (and drop_last=True in the DataLoader)"
            )
        half = x.shape[0] // 2
        if self._graphs is not None:  # cuda_graphs: the halves at fixed addresses, read by the captured meta update
            x, y = self._graphs.stage(x, y)
        self._halves = ((x[:half], y[:half]), (x[half:], y[half:]))
        try:
            for self._current in (0, 1):
                # the 'func' backend replays the dropout masks of the user's forward on this half
                self._rng = rng_state(x.device) if self._backend.name == "func" else None
                yield self._halves[self._current]
        finally:
            self._halves, self._current = None, -1

    def _autocast(self) -> ContextManager:
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def _meta_autocast(self, device: torch.device) -> Tuple[ContextManager, Callable[[], ContextManager]]:
        """(context around the whole meta step, autocast for its forwards) of :attr:`meta_precision`."""
        if self.meta_precision == "fp32":
            return torch.autocast(device.type, enabled=False), contextlib.nullcontext
        return contextlib.nullcontext(), self._autocast

    def _scaler(self, device: torch.device) -> Optional[torch.amp.GradScaler]:
        """The meta step's loss scaler: only for ``'amp'`` when the real step's autocast is fp16."""
        if self.meta_precision != "amp":
            return None
        if self.meta_scaler is None:
            with self._autocast():
                fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
            if not fp16:
                return None
            self.meta_scaler = torch.amp.GradScaler(device.type)
            if self._meta_scaler_state:
                self.meta_scaler.load_state_dict(self._meta_scaler_state)
        return self.meta_scaler

    def _reusable(self, outputs: Sequence[Tensor]) -> bool:
        """Whether the user's training-half outputs fit the meta step's precision: always under ``'amp'``;
        under ``'fp32'`` only when no autocast produced them (accelerate casts autocast outputs back to
        fp32, so its ``mixed_precision`` is checked, not just the dtype)."""
        if self.meta_precision == "amp":
            return True
        mixed = getattr(self.accelerator, "mixed_precision", "no") not in (None, "no")
        return (not mixed and not torch.is_autocast_enabled(outputs[0].device.type)
                and all(o.dtype == self._dtype for o in outputs))

    def meta_update(
        self,
        train_batch: Batch,
        meta_batch: Batch,
        train_outputs: Optional[Sequence[Tensor]] = None,
        train_rng: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
        accumulated_grads: Optional[Sequence[Optional[Tensor]]] = None,
        read_loss: bool = True,
    ) -> float | Tensor:
        """One meta step and meta optimizer step (gradients averaged across ranks); returns the meta loss
        (``read_loss=False``: as a device tensor, without waiting for the device, as :meth:`loss` does).
        ``accumulated_grads``: what the accumulation window's earlier micro-batches left in ``.grad``.

        A step with a non-finite meta loss or gradient is skipped on the device: the fused Adam step is
        told so (``found_inf``, as ``torch.amp.GradScaler`` tells it), which leaves the predictor, the
        moments and the step count exactly as they were. Only the fp16 ``'amp'`` policy (its GradScaler)
        and an Adam without a fused kernel for the predictor's device decide on the host."""
        device = train_batch[0].device if isinstance(train_batch[0], Tensor) else torch.device("cpu")
        scaler = self._scaler(device)
        outer, autocast = self._meta_autocast(device)
        with outer:
            result = meta_step(
                self.model, self.optimizer, self.weight_net, train_batch, meta_batch, self._p_values,
                eps=self.eps, constraint=self.constraint, backend=self._backend, criterion=self.criterion,
                train_outputs=train_outputs, train_rng=train_rng, autocast=autocast, distill=self.distill,
                # scaler.scale(1) is the current scale (and creates it on the first step)
                loss_scale=float(scaler.scale(torch.ones((), device=device))) if scaler is not None else 1.0,
                clip_grad=self.clip_grad, clip_mode=self.clip_mode, accumulated_grads=accumulated_grads,
                grad_accum_steps=self.grad_accum_steps,
            )
        grads = [t.grad for t in self.weight_net.parameters()]
        # a non-finite meta loss on any rank rides along in the all-reduce, so every rank decides alike
        bad = (~torch.isfinite(result.meta_loss.detach())).to(grads[0].dtype).reshape(1)
        _all_reduce_mean_(grads + [bad])
        if scaler is not None:
            scaler.unscale_(self.meta_optimizer)  # in place: the grads are now d meta / d phi
        self.last_meta_grads = [g.detach().clone() for g in grads]
        self.last_meta_loss_tensor = result.meta_loss.detach()
        applied = torch.stack([torch.isfinite(g).all() for g in grads]).all() & (bad[0] == 0)
        self.last_meta_applied = applied
        if isinstance(self._meta_skipped, Tensor):  # in place: a replayed CUDA graph keeps counting
            self._meta_skipped.add_((~applied).long())
        else:
            self._meta_skipped = self._meta_skipped + (~applied).long()
        if scaler is None and self._fused_meta:  # skipped on the device when not applied: no host read
            self.meta_optimizer.found_inf = (~applied).to(torch.float32)
            try:
                self.meta_optimizer.step()
            finally:
                del self.meta_optimizer.found_inf
        elif bool(applied):  # the host decides (GradScaler, or no fused Adam here)
            if scaler is not None:
                scaler.step(self.meta_optimizer)
            else:
                self.meta_optimizer.step()
        if scaler is not None:
            scaler.update()  # halves the scale after an overflow, doubles it after a run of finite steps
        self.meta_optimizer.zero_grad(set_to_none=True)
        return self.last_meta_loss if read_loss else self.last_meta_loss_tensor

    def loss(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        """The weighted loss for the real step; inside :meth:`split` the meta step runs first when due
        (on a micro-batch after whose backward the optimizer steps, every ``meta_interval`` updates)."""
        outputs = check_multi_exit_output(outputs, self.num_exits)
        in_split = self._halves is not None and self._current in (0, 1)
        updates = in_split and self._updates_now()
        if in_split and self.grad_accum_steps > 1 and self._micro == 0:
            self._check_window_start()
        self.meta_step_ran = updates and self.step % self.meta_interval == 0
        if self.meta_step_ran:
            train_batch = (self._halves[self._current][0], target)
            meta_batch = self._halves[1 - self._current]
            # the virtual step reuses the user's forward when it ran on the plain module with a graph
            # (not through fused attention kernels: they cannot be differentiated twice)
            shared = (self.share_forward and unwrap_model(self.model) is self.model and not self._fused_attention
                      and all(o.requires_grad for o in outputs) and self._reusable(outputs))
            if self._graphs is not None and self._graphs.disabled is None:  # captured: its own training forward
                self._graphs.run(self._current, lambda graphed: self.meta_update(
                    self._halves[self._current], meta_batch, read_loss=False), reset=self.meta_optimizer.zero_grad)
            else:
                self.meta_update(train_batch, meta_batch, outputs if shared else None, self._rng if shared else None,
                                 self._accumulated_grads() if self.grad_accum_steps > 1 else None, read_loss=False)
        loss, weights = weighted_multi_exit_loss(
            outputs, target, self.weight_net, self.eps, self.constraint, distill=self.distill, criterion=self.criterion
        )
        self.last_weights = weights.detach()
        if self.host_bookkeeping:
            self.advance(in_split, updates)
        return loss

    def advance(self, in_split: bool = True, updates: bool = True) -> None:
        """The host side of one :meth:`loss` call: the micro-batch and update counters and the meta learning
        rate (a replayed CUDA graph of the update runs only the device side: its caller calls this)."""
        if in_split:
            self._micro = 0 if updates else self._micro + 1
        if updates:
            self.step += 1
            self._set_meta_lr()

    # -- accumulation ------------------------------------------------------------------------
    def _accelerate_accum_steps(self) -> int:
        return int(getattr(self.accelerator, "gradient_accumulation_steps", 1) or 1) if self.accelerator is not None else 1

    def _updates_now(self) -> bool:
        """Whether the optimizer steps after this micro-batch's backward: accelerate's ``sync_gradients``
        under its accumulation, else every ``grad_accum_steps``-th micro-batch."""
        if self._accelerate_accum_steps() > 1:
            return bool(self.accelerator.sync_gradients)
        return self._micro + 1 >= self.grad_accum_steps

    def _accumulated_grads(self) -> List[Optional[Tensor]]:
        """The gradients the window's earlier micro-batches left in ``.grad`` (unscaled from accelerate's fp16
        loss scale), in the backend's parameter order."""
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        grads = [p.grad for p in self._backend.params()]
        return [None if g is None else g.detach() / scale if scale != 1.0 else g.detach() for g in grads]

    def _check_window_start(self) -> None:
        """At the first micro-batch of an accumulation window ``.grad`` must be empty (or zero): whatever is
        there joins the update, and a ``zero_grad()`` between this loss and its backward would drop what the
        virtual step counted."""
        grads = [p.grad for p in self._backend.params() if p.grad is not None]
        if grads and bool(torch.stack([g.ne(0).any() for g in grads]).any()):
            raise RuntimeError(
                "gradient accumulation: the model's .grad is not zero at the first micro-batch of an "
                "accumulation window, so the update would include gradients from before it (and a zero_grad() "
                "between loss and backward would drop the micro-batches the meta step counted). Call "
                "optimizer.zero_grad() right after optimizer.step(), as accelerate's accumulate() loop does "
                "(backward, step, zero_grad), not before backward")

    def _set_meta_lr(self) -> None:
        """Cosine annealing of the meta learning rate over ``total_steps`` model updates, computed from the
        update counter, so skipped meta steps (non-finite meta loss or gradient) advance it too. A torch LR
        scheduler stepped here warned "lr_scheduler.step() before optimizer.step()" whenever the first meta
        step was skipped: it assumes one scheduler step per optimizer step, this schedule counts updates."""
        if self.total_steps is None:
            return
        t = min(self.step, self.total_steps)
        lr = 0.5 * self.meta_lr * (1.0 + math.cos(math.pi * t / self.total_steps))
        for group in self.meta_optimizer.param_groups:
            if isinstance(group["lr"], Tensor):  # a device lr (CUDA graphs read it there): written in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Predictor, meta optimizer, step counter (the meta lr follows from it) and meta loss scaler, for resume."""
        return {
            "weight_net": self.weight_net.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "step": self.step,
            "micro_step": self._micro,
            "meta_scaler": None if self.meta_scaler is None else self.meta_scaler.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        missing = {"weight_net", "meta_optimizer", "step"} - set(state)
        if missing:
            raise ValueError(f"L2W state is missing {sorted(missing)}: pass a dict from L2W.state_dict()")
        self.weight_net.load_state_dict(state["weight_net"])
        kernel = [{k: g.get(k) for k in ("fused", "foreach")} for g in self.meta_optimizer.param_groups]
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for group, keep in zip(self.meta_optimizer.param_groups, kernel):  # this run's kernel, not the saved one
            group.update(keep)
        self.step = int(state["step"])
        self._micro = int(state.get("micro_step", 0))
        self._set_meta_lr()  # (states saved with a "meta_scheduler" entry load too: it is not needed)
        self._meta_scaler_state = state.get("meta_scaler")
        if self.meta_scaler is not None and self._meta_scaler_state:
            self.meta_scaler.load_state_dict(self._meta_scaler_state)

"""Run the model with given parameters, and the two ways to get the meta gradient through it.

Every backend is one parameter-rebinding runner: :meth:`Backend.forward` runs the (unwrapped) model
with a list of parameters in ``model.named_parameters()`` order, in train mode (so its forward returns
the tuple of every exit's logits, :mod:`timm_l2w.models.base`) and on cloned buffers, so the real
parameters, optimizer state and BatchNorm statistics are never touched; neither copies the model per step.

- ``'higher'``: a cached ``higher.patch.monkeypatch`` of the model, fed the fast weights. Its meta
  gradient differentiates through the virtual step (``create_graph``, reverse over reverse).
- ``'func'``: ``torch.func.functional_call``. Its meta gradient uses that the virtual step's gradient
  ``g`` is linear in the weights: ``d meta / d W[i, k] = <u, grad_theta L[i, k]> / B`` with
  ``u = (d theta' / d g)^T v`` and ``v = d meta / d theta'``; ``u`` is one reverse-mode product
  through the update alone (no model forward; for SGD without clipping ``d theta' / d g`` is a number
  per parameter), then one forward-mode Jacobian-vector product of the training losses.

Both compute the same exact second-order gradient (:func:`timm_l2w.meta.meta_step` sets up the
:class:`VirtualStep` they share). Everything that knows ``higher``'s internals lives here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..models.base import unwrap_model
from ..models.fx_stages import REBOUND_HOOK
from ..validation import check_choice
from .loss import RngState, replay_rng
from .update import RealUpdate

__all__ = ["BACKENDS", "VirtualStep", "FuncBackend", "HigherBackend", "make_backend"]

BACKENDS = ("higher", "func")


@dataclass
class VirtualStep:
    """One meta step as :func:`~timm_l2w.meta.meta_step` set it up, for a backend's :meth:`~Backend.meta_gradient`."""

    params: List[Tensor]  # the model's parameters (backend order)
    trainable: List[int]  # indices of those in the optimizer
    update: RealUpdate  # g -> theta'
    phi: List[Tensor]  # the predictor's parameters
    weights: Tensor  # [B, K] from the predictor (a graph in phi)
    train_losses: Tensor  # [B, K] at the current parameters (what the weights multiply)
    scale: float  # the loss scale (1.0 without fp16 'amp')
    shared: bool  # train_losses' graph came from the caller's forward: keep it
    meta_value: Callable[[Sequence[Tensor]], Tensor]  # the meta loss of the model run with these parameters
    train_losses_at: Callable[[Sequence[Tensor]], Tensor]  # the training losses at these parameters
    autocast: Callable[[], ContextManager]
    train_rng: Optional[RngState]  # the random state of the training forward (its dropout masks)
    device: torch.device


class Backend:
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

    def meta_gradient(self, step: VirtualStep) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """(meta loss, ``loss_scale * d meta / d phi`` per predictor parameter, None where zero)."""
        raise NotImplementedError


class FuncBackend(Backend):
    """``torch.func.functional_call`` with the given parameters and clones of the buffers; the meta
    gradient by one reverse product through the update and one forward-mode product of the losses."""

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

    def meta_gradient(self, step: VirtualStep) -> Tuple[Tensor, List[Optional[Tensor]]]:
        s, params, trainable = step, step.params, step.trainable
        virtual_loss = (s.weights.detach() * s.train_losses).mean(dim=0).sum()
        grads_theta = _unscale(torch.autograd.grad(
            virtual_loss * s.scale, [params[i] for i in trainable], retain_graph=s.shared, allow_unused=True
        ), s.scale)
        full_grads = _scatter(grads_theta, trainable, len(params))
        values = [t.detach() for t in params]
        coefficients = s.update.coefficients()
        if coefficients is not None:  # SGD: d theta' / d g is one number per parameter
            with torch.no_grad():
                new_params = s.update.step(full_grads, values)
            moved = [i for i in trainable if full_grads[i] is not None]
            for i in moved:
                new_params[i].requires_grad_(True)
        else:  # keep the update's graph in g (the update alone: no model forward in it)
            leaves = [None if g is None else g.detach().requires_grad_(True) for g in full_grads]
            stepped_graph = s.update.step(leaves, values)
            moved = [i for i in range(len(params)) if stepped_graph[i] is not values[i]]  # theta' != theta
            new_params = list(values)
            for i in moved:
                new_params[i] = stepped_graph[i].detach().requires_grad_(True)
        # 2. meta loss of the virtually updated model on the meta half, and v = d meta / d theta'
        value = s.meta_value(new_params)
        v = torch.autograd.grad(value * s.scale, [new_params[i] for i in moved], allow_unused=True)  # scaled
        # 3. u = (d theta' / d g)^T v, then d meta / d W = J_L u / B by forward mode (scaled like v)
        if coefficients is not None:
            tangents = {i: coefficients[i] * g for i, g in zip(moved, v) if g is not None}
        else:
            tangents = _vjp_through_update(stepped_graph, moved, v, leaves)
        with fwAD.dual_level(), torch.no_grad(), replay_rng(s.train_rng, s.device), s.autocast(), \
                warnings.catch_warnings():
            # torch's forward AD scripts its decompositions on first use (a jit deprecation warning)
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            duals = [fwAD.make_dual(t.detach(), tangents[i]) if i in tangents else t.detach()
                     for i, t in enumerate(params)]
            tangent = fwAD.unpack_dual(s.train_losses_at(duals)).tangent
        if tangent is None:  # no parameter moved: nothing depends on phi
            return value, [None] * len(s.phi)
        return value, list(torch.autograd.grad(
            s.weights, s.phi, grad_outputs=tangent.to(s.weights.dtype) / s.weights.shape[0], allow_unused=True
        ))


class HigherBackend(Backend):
    """A ``higher.patch.monkeypatch`` of the model, built once and fed the fast weights each call; the
    meta gradient through the virtual step (reverse over reverse).

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
            # multi-exit stages skip the containers' forward, where higher sets their fast weights
            m.__dict__[REBOUND_HOOK] = _refresh_fast_weights
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

    def meta_gradient(self, step: VirtualStep) -> Tuple[Tensor, List[Optional[Tensor]]]:
        s, params = step, step.params
        virtual_loss = (s.weights * s.train_losses).mean(dim=0).sum()
        grads_theta = _unscale(torch.autograd.grad(
            virtual_loss * s.scale, [params[i] for i in s.trainable], create_graph=True, retain_graph=True,
            allow_unused=True
        ), s.scale)
        new_params = s.update.step(_scatter(grads_theta, s.trainable, len(params)))
        # 2. meta loss of the virtually updated model on the meta half
        value = s.meta_value(new_params)
        # 3. second-order gradient into the predictor (through the virtual step)
        return value, list(torch.autograd.grad(value * s.scale, s.phi, allow_unused=True))


def _refresh_fast_weights(module: nn.Module) -> None:
    """Under the ``higher`` monkeypatch, give ``module``'s whole subtree the current fast weights.

    ``higher`` sets a patched module's own parameters when that module's ``forward`` is called; the
    multi-exit stages (:mod:`timm_l2w.models.fx_stages`) call only the leaf modules and read the other
    parameters (ViT's ``pos_embed``, layer scales) directly, so they are set here, the way ``higher`` lays
    them out (its per-module offsets into the expanded fast-weight list, pre-order over ``_modules``).
    No-op for modules ``higher`` did not patch.
    """
    import higher.patch

    if not isinstance(module, higher.patch._MonkeyPatchBase):
        return
    root = module.root
    if root.fast_params is None:
        return
    expanded = root._expand_params(root.fast_params)
    inside = {id(m) for m in module.modules()}
    offset = 0

    def visit(m: nn.Module) -> None:
        nonlocal offset
        names = list(getattr(m, "_param_names", ()))
        if id(m) in inside:
            for i, name in enumerate(names):
                m._parameters[name] = expanded[offset + i]
        offset += len(names)
        for child in m._modules.values():
            if child is not None:
                visit(child)

    visit(root)


def make_backend(backend: str | Backend, model: nn.Module) -> Backend:
    """A backend object for ``model`` (unwrapped first) from its name, or ``backend`` as it is."""
    if isinstance(backend, Backend):
        return backend
    check_choice(backend, BACKENDS, "backend")
    model = unwrap_model(model)
    return HigherBackend(model) if backend == "higher" else FuncBackend(model)


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

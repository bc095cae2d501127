"""The :class:`L2W` hook: the meta step inside an existing training loop (split / loss / state)."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..exits import check_distribution, distribution_values, exit_distribution
from ..models.base import check_multi_exit_output, unwrap_model
from ..optim_step import check_optimizer
from ..validation import PAPER_P_INDICES, Range, check_choice, check_label_smoothing, check_number
from ..weighting import (
    CONSTRAINTS,
    INPUT_TYPES,
    Distillation,
    ExitCriterion,
    WeightPredictor,
    check_eps,
    weighted_multi_exit_loss,
)
from . import step as _step
from .backends import BACKENDS, make_backend
from .loss import RngState, rng_state
from .plug import MetaUpdateRunner
from .precision import MetaPrecision
from .update import accelerate_accum_steps, accumulated_grads, check_clip, check_window_start, clip_mask

__all__ = ["L2W", "BACKEND_CHOICES"]

BACKEND_CHOICES = ("auto",) + BACKENDS  # 'auto': 'higher', or 'func' where the model lacks second derivatives
_log = logging.getLogger(__name__)

Batch = Tuple[Tensor, Tensor]


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

    ``optimizer`` is the loop's own optimizer, any class :mod:`timm_l2w.optim_step` reproduces (torch's
    SGD, Adam(W), NAdam, RAdam, RMSprop, ..., timm's SGDW, NAdamW, Lamb, Lars, Adan, ...) with all its
    param groups, state and options: the virtual step is exactly the update its ``step()`` would make
    (:mod:`timm_l2w.meta.update`); a sign update (Lion, Rprop) is refused, its meta gradient would be zero.

    ``clip_grad`` / ``clip_mode`` say how the loop clips the gradients before ``optimizer.step()``, in
    timm's terms (``dispatch_clip_grad``: ``'norm'``, ``'value'``, ``'agc'``); the virtual step clips the
    same way, differentiably. ``clip_parameters`` are the parameters the loop clips (default: all of the
    model's; timm's train.py clips ``task.get_clip_parameters(exclude_head='agc' in clip_mode)``, the
    classifiers left out under ``'agc'``). L2W does not clip the real gradients (the loop still does).

    Gradient accumulation over N micro-batches (a micro-batch is one half of :meth:`split`):
    ``Accelerator(gradient_accumulation_steps=N)`` with ``with accelerator.accumulate(model):`` around
    each micro-batch's forward, ``loss``, ``accelerator.backward``, ``optimizer.step()``,
    ``optimizer.zero_grad()`` (in that order), or ``grad_accum_steps=N`` without accelerate, in a loop
    that backpropagates ``loss / N`` and steps after every N-th micro-batch. The meta step runs only on
    the micro-batch after whose backward the optimizer steps, and its virtual step is that accumulated
    update (:mod:`timm_l2w.meta.update`). ``meta_interval`` and ``total_steps`` count real updates. A
    window must start with empty (or zero) ``.grad``: leftovers are an error naming the order to use.
    A loop whose windows are uneven (timm's train.py shortens the last one of an epoch) says what it
    does on every call: ``loss(..., update=need_update, accum_steps=n)`` (the optimizer steps after this
    micro-batch's backward; the loss is divided by ``n``) replaces the hook's own count.

    ``backend``: ``'auto'`` (default) runs ``'higher'`` and, when the model has an op without the second
    derivatives it needs (e.g. ``hardsigmoid`` in MobileNetV3), switches to ``'func'`` (the same meta
    gradient from first and forward-mode derivatives) and says so in one log line; ``'higher'`` or
    ``'func'`` keeps that backend.

    ``meta_precision`` (``'fp32'`` or ``'amp'``, :mod:`timm_l2w.meta.precision`) is the meta step's
    arithmetic when the real step runs in mixed precision; :attr:`meta_scaler` is its fp16 loss scaler.
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

    :attr:`meta_runner` (a :class:`MetaUpdateRunner`, None: eager) is the plug an accelerator installs to
    run the meta update its own way: ``timm_l2w.accel.capture_meta_updates(l2w)`` records it as a CUDA
    graph per half of the loader batch and replays it.
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
        backend: str = "auto",
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
        clip_parameters: Optional[Sequence[Tensor]] = None,
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
            raise ValueError(f"num_exits={num_exits} but the model has {model_exits} exits: "
                             f"pass num_exits={model_exits}")
        if weight_net is not None and weight_net.num_exits != num_exits:
            raise ValueError(
                f"weight_net predicts {weight_net.num_exits} exits but the model has {num_exits}: "
                f"build WeightPredictor(num_exits={num_exits})"
            )
        check_number(meta_interval, "meta_interval", Range(1, integer=True, hint="paper: 1 CIFAR, 100 ImageNet"))
        if total_steps is not None:
            check_number(total_steps, "total_steps",
                         Range(1, integer=True, hint="updates, or None for a constant meta lr"))
        meta_lr = check_number(meta_lr, "meta_lr", Range(0, low_open=True, hint="paper: 1e-4"))
        meta_weight_decay = check_number(meta_weight_decay, "meta_weight_decay", Range(0, hint="paper: 1e-4"))
        check_choice(backend, BACKEND_CHOICES, "backend")
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        check_optimizer(optimizer)  # fail early on an optimizer the virtual step cannot reproduce
        self.clip_grad, self.clip_mode = check_clip(clip_grad, clip_mode)
        clip_mask([p for _, p in net.named_parameters()], clip_parameters)  # fail early on foreign tensors
        self.clip_parameters = None if clip_parameters is None else list(clip_parameters)
        accelerate_steps = accelerate_accum_steps(accelerator)
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
        self.eps = check_eps(eps)
        self.constraint = check_choice(constraint, CONSTRAINTS, "constraint")
        self.input_type = check_choice(input_type, INPUT_TYPES, "input_type")
        if target_p is None:
            check_number(target_p_index, "target_p_index", PAPER_P_INDICES)
            target_p = exit_distribution(target_p_index / 20, num_exits)
        self.p = check_distribution(target_p, num_exits)
        self._p_values = distribution_values(self.p, num_exits)  # what meta_step gets: no tensor read per step
        self.meta_interval, self.total_steps = meta_interval, total_steps
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.criterion = ExitCriterion.from_module(criterion, self.label_smoothing)
        self.share_forward = share_forward
        if distill is not None and not isinstance(distill, Distillation):
            raise TypeError(f"distill must be a timm_l2w.Distillation(temperature, alpha) or None, got {distill!r}")
        self.distill = distill
        self._fused_attention = any(getattr(m, "fused_attn", False) for m in unwrap_model(model).modules())
        self.backend_choice = backend  # 'auto' until the first meta step has decided
        self.backend = make_backend("higher" if backend == "auto" else backend, net)
        ref = next(net.parameters())
        dtype = ref.dtype if ref.is_floating_point() else None
        self.precision = MetaPrecision(meta_precision, accelerator, dtype)
        if weight_net is None:
            weight_net = WeightPredictor(num_exits, input_type, hidden_sizes)
        self.weight_net = weight_net.to(device=ref.device, dtype=dtype)
        if _step.distributed():  # every rank starts from rank 0's predictor
            for t in self.weight_net.parameters():
                dist.broadcast(t.data, src=0)
        self.meta_optimizer, self._fused_meta = _step.meta_adam(self.weight_net, meta_lr, meta_weight_decay)
        self.meta_lr = meta_lr  # peak of the cosine schedule (_set_meta_lr)
        self.step = 0
        # the meta loss, the skip decision and the skip count stay on the device (read lazily: properties)
        self.last_meta_loss_tensor: Optional[Tensor] = None
        self.last_meta_applied: Optional[Tensor] = None  # bool: the last meta step updated the predictor
        self._meta_skipped: Tensor | int = 0  # meta steps skipped (non-finite); not saved in state_dict
        self.last_meta_grads: Optional[List[Tensor]] = None
        self.last_weights: Optional[Tensor] = None
        self._halves: Optional[Tuple[Batch, Batch]] = None
        self._current = -1
        self._rng: Optional[RngState] = None
        self.meta_runner: Optional[MetaUpdateRunner] = None  # the plug of an accelerator (None: eager)

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

    @property
    def meta_scaler(self) -> Optional[torch.amp.GradScaler]:
        """The meta step's loss scaler (``meta_precision='amp'`` under fp16; created on first use)."""
        return self.precision.scaler

    @meta_scaler.setter
    def meta_scaler(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        self.precision.scaler = scaler

    @property
    def meta_precision(self) -> str:
        """``'fp32'`` or ``'amp'``: the meta step's arithmetic (:mod:`timm_l2w.meta.precision`)."""
        return self.precision.policy

    @property
    def micro_step(self) -> int:
        """Micro-batches (halves) of the current accumulation window done so far (0: the next one starts it)."""
        return self._micro

    @property
    def meta_due(self) -> bool:
        """Whether the next update runs a meta step (every ``meta_interval`` updates, from the first)."""
        return self.step % self.meta_interval == 0

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
        if self.meta_runner is not None:  # e.g. CUDA graphs: the halves at the fixed addresses they read
            x, y = self.meta_runner.stage(x, y)
        self._halves = ((x[:half], y[:half]), (x[half:], y[half:]))
        try:
            for self._current in (0, 1):
                # the 'func' backend replays the dropout masks of the user's forward on this half
                self._rng = rng_state(x.device) if self.backend.name == "func" else None
                yield self._halves[self._current]
        finally:
            self._halves, self._current = None, -1

    def meta_update(
        self,
        train_batch: Batch,
        meta_batch: Batch,
        train_outputs: Optional[Sequence[Tensor]] = None,
        train_rng: Optional[RngState] = None,
        accumulated_grads: Optional[Sequence[Optional[Tensor]]] = None,
        read_loss: bool = True,
        accum_steps: Optional[int] = None,
    ) -> float | Tensor:
        """One meta step and meta optimizer step (gradients averaged across ranks); returns the meta loss
        (``read_loss=False``: as a device tensor, without waiting for the device, as :meth:`loss` does).
        ``accumulated_grads``: what the accumulation window's earlier micro-batches left in ``.grad``;
        ``accum_steps``: the window's loss divisor (default ``grad_accum_steps``).

        A step with a non-finite meta loss or gradient is skipped (:func:`timm_l2w.meta.step.predictor_step`)."""
        device = train_batch[0].device if isinstance(train_batch[0], Tensor) else torch.device("cpu")
        scaler = self.precision.scaler_for(device)
        outer, autocast = self.precision.contexts(device)

        def run(outputs: Optional[Sequence[Tensor]], rng: Optional[RngState]) -> _step.MetaStepResult:
            with outer:
                return _step.meta_step(
                    self.model, self.optimizer, self.weight_net, train_batch, meta_batch, self._p_values,
                    eps=self.eps, constraint=self.constraint, backend=self.backend, criterion=self.criterion,
                    train_outputs=outputs, train_rng=rng, autocast=autocast, distill=self.distill,
                    # scaler.scale(1) is the current scale (and creates it on the first step)
                    loss_scale=float(scaler.scale(torch.ones((), device=device))) if scaler is not None else 1.0,
                    clip_grad=self.clip_grad, clip_mode=self.clip_mode, accumulated_grads=accumulated_grads,
                    grad_accum_steps=accum_steps or self.grad_accum_steps, clip_parameters=self.clip_parameters,
                )

        if self.backend_choice != "auto":
            result = run(train_outputs, train_rng)
        else:  # the first meta step decides; on its own forward, so a failure leaves the caller's graph whole
            try:
                result = run(None, None)
            except _step.MissingDerivativeError as err:
                if err.backend != "higher":
                    raise
                _log.warning("L2W: the 'higher' meta backend needs %s, which torch does not implement for %s (an "
                             "op of this model): using backend='func' (the same meta gradient)", err.need, err.op)
                self.backend = make_backend("func", self.backend.model)
                result = run(None, None)
            self.backend_choice = self.backend.name
        grads = [t.grad for t in self.weight_net.parameters()]
        # a non-finite meta loss on any rank rides along in the all-reduce, so every rank decides alike
        bad = (~torch.isfinite(result.meta_loss.detach())).to(grads[0].dtype).reshape(1)
        _step.all_reduce_mean_(grads + [bad])
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
        _step.predictor_step(self.meta_optimizer, applied, scaler, self._fused_meta)
        return self.last_meta_loss if read_loss else self.last_meta_loss_tensor

    def loss(self, outputs: Sequence[Tensor], target: Tensor, *, update: Optional[bool] = None,
             accum_steps: Optional[int] = None, advance: bool = True) -> Tensor:
        """The weighted loss for the real step; inside :meth:`split` the meta step runs first when due
        (on a micro-batch after whose backward the optimizer steps, every ``meta_interval`` updates).

        ``update``: whether the optimizer steps after this micro-batch's backward (timm's ``need_update``);
        ``accum_steps``: what the loop divides this micro-batch's loss by (its accumulation window, e.g.
        timm's shorter last window of an epoch). Given, they replace the hook's own count of micro-batches
        (every ``grad_accum_steps``-th, or accelerate's ``sync_gradients``) and ``grad_accum_steps``.
        ``advance=False`` leaves the host side of the call (counters, meta lr) to a later :meth:`advance`:
        a replayed CUDA graph of the whole update runs only its device side."""
        outputs = check_multi_exit_output(outputs, self.num_exits)
        in_split = self._halves is not None and self._current in (0, 1)
        if accum_steps is not None:
            accum_steps = check_number(accum_steps, "accum_steps", Range(1, integer=True, hint=(
                "what the loop divides this micro-batch's loss by (its accumulation window)")))
        window = accum_steps or self.grad_accum_steps
        updates = in_split and (self._updates_now() if update is None else bool(update))
        if in_split and window > 1 and self._micro == 0:
            check_window_start(self.backend.params())
        self.meta_step_ran = updates and self.meta_due
        if self.meta_step_ran:
            train_batch = (self._halves[self._current][0], target)
            meta_batch = self._halves[1 - self._current]
            # the virtual step reuses the user's forward when it ran on the plain module with a graph
            # (not through fused attention kernels: they cannot be differentiated twice)
            shared = (self.share_forward and unwrap_model(self.model) is self.model and not self._fused_attention
                      and all(o.requires_grad for o in outputs) and self.precision.reusable(outputs))
            runner, current = self.meta_runner, self._current
            plugged = runner is not None and runner.run(current, lambda: self.meta_update(  # its own training forward
                self._halves[current], meta_batch, read_loss=False))
            if not plugged:
                accumulated = accumulated_grads(self.backend.params(), self.accelerator) if window > 1 else None
                self.meta_update(train_batch, meta_batch, outputs if shared else None, self._rng if shared else None,
                                 accumulated, read_loss=False, accum_steps=window)
        loss, weights = weighted_multi_exit_loss(
            outputs, target, self.weight_net, self.eps, self.constraint, distill=self.distill, criterion=self.criterion
        )
        self.last_weights = weights.detach()
        if advance:
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

    # -- accumulation (timm_l2w.meta.update) --------------------------------------------------
    def _updates_now(self) -> bool:
        """Whether the optimizer steps after this micro-batch's backward: accelerate's ``sync_gradients``
        under its accumulation, else every ``grad_accum_steps``-th micro-batch."""
        if accelerate_accum_steps(self.accelerator) > 1:
            return bool(self.accelerator.sync_gradients)
        return self._micro + 1 >= self.grad_accum_steps

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
            "meta_scaler": self.precision.state_dict(),
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
        self.precision.load_state_dict(state.get("meta_scaler"))

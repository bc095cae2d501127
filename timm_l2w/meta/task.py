"""L2W as a timm training task, so timm's own ``train.py`` runs it with four changed lines (README, "With
timm's scripts").

timm's ``train.py`` builds ``task = ClassificationTask(model, train_loss_fn, ...)`` (``timm.task``), calls
``result = task(input, target)`` once per loader batch, backpropagates ``result['loss'] / accum_steps`` and,
when ``need_update``, clips ``task.get_clip_parameters(exclude_head='agc' in clip_mode)`` and steps its
optimizer; ``CheckpointSaver(..., task=task)`` saves ``task.get_checkpoint_state()`` and
``resume_task_checkpoint`` gives it back through ``task.load_task_state``. :class:`L2WClassificationTask` is
that task with the :class:`~timm_l2w.meta.hook.L2W` hook in it::

    import timm_l2w
    task = timm_l2w.L2WClassificationTask(model=model, criterion=train_loss_fn, device=device, ...)
    optimizer = create_optimizer_v2(model, ...)
    task.attach(optimizer, loss_scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                grad_accum_steps=args.grad_accum_steps, epochs=args.epochs, batches_per_epoch=len(loader_train))
    ...
    result = task(input, target, need_update=need_update, accum_steps=accum_steps)

How the paper's schedule fits a loop that makes one forward and one backward per loader batch:

* **Two updates per loader batch, each half the other's meta set** (docs/method.md §5). The loop makes one
  update per batch, so the task's forward makes the other one itself: it splits the batch
  (:meth:`L2W.split`), runs the first half (meta step with the second half as meta set, weighted loss,
  backward, the loop's clipping and AMP loss scaler, ``optimizer.step()``, ``zero_grad()``), then the second
  half (meta step with the first half as meta set, at the parameters the first update left) and returns its
  weighted loss, which the loop backpropagates, clips and steps as usual. So the task needs the loop's
  optimizer, clipping and loss scaler: :meth:`L2WClassificationTask.attach`, one line right after the
  optimizer is created (before ``--resume``, which restores the predictor into it). A one-update-per-batch
  form would save no line (the hook needs the optimizer for its virtual step either way), so none is offered.
* **Accumulation** (``--grad-accum-steps N``): a window of N loader batches holds 2N halves, two updates of N
  halves each (what ``grad_accum_steps`` means to the hook and to ``timm-l2w train``: halves per update). The
  loop makes the second (``need_update``); the task makes the first, after the window's N-th half has been
  backpropagated: in its forward when that half is a first half, else at the start of the next forward (the
  loop did that backward and does not step). Each half's loss is divided by ``accum_steps``, as the loop
  divides its own. The loop says on every call whether it steps and by what it divides (``need_update``,
  ``accum_steps``: timm shortens the last window of an epoch, and L2W cannot guess it), and the task tells
  the hook (``L2W.loss(update=, accum_steps=)``), so every meta step falls on an update that happens and
  models it exactly.
* **Clipping**: ``get_clip_parameters(exclude_head=True)`` (train.py under ``--clip-mode agc``) leaves out
  every exit's classifier (``model.get_classifiers()``; timm's base class drops the last two parameters,
  the last exit's alone); the task's own step, the loop's step and the virtual step all clip that one set.
* **Checkpoints**: the task state is the hook's (predictor, its Adam, the update counter, which sets the meta
  learning rate); ``CheckpointSaver`` writes it as ``task_state`` and ``resume_task_checkpoint`` restores it
  exactly. A checkpoint without it is refused under ``strict`` (start from its weights with
  ``--initial-checkpoint`` instead). The EMA copy has no task state.
* **EMA**: train.py updates ``ModelEmaV3`` after its own step, so once per loader batch: the EMA is taken
  after every second update.
* **Not supported**: an fp16 loss scaler together with accumulation (``.grad`` then holds scaled gradients
  that timm's ``NativeScaler`` does not let the virtual step read: use ``--amp-dtype bfloat16``) and
  accumulation under DistributedDataParallel (the task's own update would fall inside ``no_sync``).
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from timm.task import ClassificationTask
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn

from ..models.base import classifier_free_parameters, unwrap_model
from ..validation import Range, check_number
from .hook import L2W
from .update import check_clip

__all__ = ["L2WClassificationTask"]

_logger = logging.getLogger(__name__)

# what the task sets on the hook itself; every other L2W argument is a keyword of the task
_SET_BY_TASK = ("model", "optimizer", "criterion", "clip_grad", "clip_mode", "clip_parameters", "grad_accum_steps",
                "accelerator")


class L2WClassificationTask(ClassificationTask):
    """timm's ``ClassificationTask`` trained with L2W (the module docstring has the design).

    ``model``, ``criterion``, ``criterion_kwargs``, ``device``, ``dtype``, ``verbose``: as timm's
    ``ClassificationTask``; the criterion (timm's ``SoftTargetCrossEntropy`` under Mixup/CutMix,
    ``LabelSmoothingCrossEntropy``, ``BinaryCrossEntropy``, ...) is the loss L2W weights. Other keywords
    (``eps``, ``constraint``, ``meta_interval``, ``meta_lr``, ``backend``, ``total_steps``, ...) go to
    :class:`~timm_l2w.meta.hook.L2W`, built by :meth:`attach`.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            **l2w_kwargs: Any,
    ):
        allowed = set(inspect.signature(L2W).parameters) - set(_SET_BY_TASK)
        unknown = sorted(set(l2w_kwargs) - allowed)
        if unknown:
            raise TypeError(f"L2WClassificationTask got unexpected arguments {unknown}: it takes timm's "
                            f"ClassificationTask arguments and L2W's {sorted(allowed)} (the task sets "
                            f"{', '.join(_SET_BY_TASK)} itself)")
        super().__init__(model, criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype,
                         verbose=verbose)
        self.l2w_kwargs = l2w_kwargs
        self.l2w: Optional[L2W] = None
        self.optimizer: Any = None
        self.loss_scaler: Any = None
        self.clip_grad: Optional[float] = None
        self.clip_mode = "norm"
        self.clipped: Optional[List[nn.Parameter]] = None  # what every update clips (set by attach)
        self.grad_accum_steps = 1
        self._loaded_state: Optional[Dict[str, Any]] = None  # restored before attach(): applied there
        self._step_due = False  # the first update of a window whose last half the loop backpropagated

    # -- set-up ------------------------------------------------------------------------------
    def attach(self, optimizer: Any, loss_scaler: Any = None, *, clip_grad: Optional[float] = None,
               clip_mode: str = "norm", grad_accum_steps: int = 1, epochs: Optional[int] = None,
               batches_per_epoch: Optional[int] = None) -> L2W:
        """Build the L2W hook on the loop's ``optimizer`` (any class :mod:`timm_l2w.optim_step` reproduces),
        with its AMP ``loss_scaler`` (timm's ``NativeScaler``; None under bf16 or fp32), clipping
        (train.py's ``--clip-grad`` / ``--clip-mode``) and ``--grad-accum-steps``; ``epochs`` and
        ``batches_per_epoch`` (``len(loader_train)``) set the meta learning rate's cosine over the run's
        updates (two per accumulation window) unless ``total_steps`` was given. Returns the hook."""
        self.clip_grad, self.clip_mode = check_clip(clip_grad, clip_mode)
        self.grad_accum_steps = check_number(grad_accum_steps, "grad_accum_steps", Range(1, integer=True, hint=(
            "loader batches per optimizer step, as train.py's --grad-accum-steps")))
        kwargs = dict(self.l2w_kwargs)
        if "total_steps" not in kwargs and epochs is not None and batches_per_epoch is not None:
            kwargs["total_steps"] = 2 * epochs * math.ceil(batches_per_epoch / self.grad_accum_steps)
        self.clipped = (self.get_clip_parameters(exclude_head="agc" in self.clip_mode) if clip_grad is not None
                        else None)
        self.l2w = L2W(unwrap_model(self.get_trainable_module()), optimizer, criterion=self.criterion,
                       clip_grad=self.clip_grad, clip_mode=self.clip_mode, clip_parameters=self.clipped, **kwargs)
        self.optimizer, self.loss_scaler = optimizer, loss_scaler
        if self._loaded_state is not None:
            self.l2w.load_state_dict(self._loaded_state)
            self._loaded_state = None
        return self.l2w

    def _hook(self) -> L2W:
        if self.l2w is None:
            raise RuntimeError("L2WClassificationTask: call task.attach(optimizer, loss_scaler, clip_grad=..., "
                               "clip_mode=..., grad_accum_steps=...) once the optimizer exists, before training")
        return self.l2w

    # -- timm's task interface -----------------------------------------------------------------
    def get_clip_parameters(self, exclude_head: bool = False) -> List[nn.Parameter]:
        """The parameters the loop clips; ``exclude_head`` (train.py under ``--clip-mode agc``) leaves out
        every exit's classifier (``model.get_classifiers()``), not only the last two parameters."""
        kept = classifier_free_parameters(self.get_trainable_module()) if exclude_head else None
        return list(super().get_clip_parameters(exclude_head=exclude_head)) if kept is None else kept

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The hook's state (predictor, its optimizer, update counter) for timm's checkpoints; none for the EMA."""
        if ema or self.l2w is None:
            return {}
        return {"l2w": self.l2w.state_dict()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        """Restore what :meth:`get_task_state` saved (applied by :meth:`attach` if it comes first)."""
        if ema:
            return
        if not state or "l2w" not in state:
            if strict:
                raise ValueError("the checkpoint holds no L2W state (task_state['l2w']): it was not written by "
                                 "L2WClassificationTask, so resuming it would restart the weight predictor; start "
                                 "from its weights instead (train.py --initial-checkpoint)")
            return
        if self.l2w is None:
            self._loaded_state = state["l2w"]
        else:
            self.l2w.load_state_dict(state["l2w"])
        if self.verbose:
            _logger.info(f"{type(self).__name__}: restored the L2W state (weight predictor, its optimizer, "
                         f"update {state['l2w']['step']})")

    # -- one loader batch -----------------------------------------------------------------------
    def forward(self, input: Tensor, target: Tensor, need_update: Optional[bool] = None,
                accum_steps: Optional[int] = None) -> Dict[str, Any]:
        """Both halves of a loader batch: the first half's update made here, the second half's weighted loss
        returned for the loop's backward and step. ``need_update`` / ``accum_steps``: train.py's (the loop
        steps after this batch; it divides the loss by ``accum_steps``); a loop without accumulation may
        leave them out."""
        l2w = self._hook()
        if self.grad_accum_steps > 1 and (need_update is None or accum_steps is None):
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps}: call task(input, target, "
                             "need_update=need_update, accum_steps=accum_steps) so the meta steps fall on the "
                             "loop's updates")
        need_update = True if need_update is None else bool(need_update)
        window = 1 if accum_steps is None else check_number(accum_steps, "accum_steps", Range(1, integer=True))
        if window > 1 and self.loss_scaler is not None:
            raise ValueError("gradient accumulation with an AMP loss scaler (fp16): .grad holds scaled gradients the "
                             "virtual step cannot read; use --amp-dtype bfloat16 (no loss scaler) or "
                             "--grad-accum-steps 1")
        if window > 1 and isinstance(self.get_trainable_module(), nn.parallel.DistributedDataParallel):
            raise ValueError("gradient accumulation under DistributedDataParallel: the task's own update would "
                             "fall inside the loop's no_sync(); use --grad-accum-steps 1")
        if self._step_due:  # the loop backpropagated the last half of this window's first update
            self._step()
        model = self.get_trainable_module()
        halves = l2w.split(input, target)
        try:
            x, y = next(halves)
            update = l2w.micro_step + 1 >= window
            first_loss = l2w.loss(model(x), y, update=update, accum_steps=window)
            self._backward(first_loss / window, update)
            x, y = next(halves)
            update = need_update or l2w.micro_step + 1 >= window
            output = model(x)
            loss = l2w.loss(output, y, update=update, accum_steps=window)
        finally:
            halves.close()
        self._step_due = update and not need_update
        return {"loss": loss, "output": output, "first_half_loss": first_loss.detach()}

    def _backward(self, loss: Tensor, update: bool) -> None:
        """The first half's backward (and, when its window ends, the update) as train.py makes its own."""
        with torch.autocast(loss.device.type, enabled=False):
            if self.loss_scaler is not None:
                self.loss_scaler(loss, self.optimizer, clip_grad=self.clip_grad, clip_mode=self.clip_mode,
                                 parameters=self.clipped,
                                 need_update=update)
                if update:
                    self.optimizer.zero_grad()
            else:
                loss.backward()
                if update:
                    self._step()

    def _step(self) -> None:
        """Clip as the loop clips, step, zero the gradients (train.py's order)."""
        if self.clip_grad is not None:
            dispatch_clip_grad(self.clipped, self.clip_grad, mode=self.clip_mode)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self._step_due = False

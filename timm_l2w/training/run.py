"""One ``timm-l2w train`` run's pieces, built from its settings (the command's flags): :class:`Run`.

:meth:`Run.build` creates the data, the model (:func:`~timm_l2w.models.factory.create_multi_exit_model`),
timm's optimizer and schedule, Mixup / the per-exit criterion, L2W and the EMA, and hands them to the
run's parts with a job each (:mod:`timm_l2w.training.update`, :mod:`~timm_l2w.training.summary`,
:mod:`~timm_l2w.training.checkpoints`). The checks of the settings that need the world size or the data
(batch halves, accumulation windows, input size, the output folder) are here too.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..checkpoint import load_pretrained
from ..models.factory import create_multi_exit_model
from .checkpoints import Checkpoints
from .summary import EpochSummary
from .update import Updater, agc_parameters

__all__ = ["Run"]


def _resolve_model(args: argparse.Namespace) -> None:
    """``args.model``: the flag; else the name ``--pretrained-path`` records; else the default. A flag that
    contradicts the file's record is an error naming both (as ``timm-l2w eval`` does)."""
    if args.pretrained_path:
        from ..checkpoint import recorded_model

        args.model = recorded_model(args.pretrained_path, args.model)
    if not args.model:
        args.model = getattr(args, "default_model", None) or "msdnet_l2w_cifar"


def _check_args(args: argparse.Namespace, world_size: int) -> int:
    """Validate the numbers and resolve ``--model``; return the per-rank batch size."""
    from ..validation import check_train_settings

    check_train_settings(args)  # every number finite, in range and consistent (SettingError)
    _resolve_model(args)
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes: "
                         f"use a multiple of {2 * world_size}")
    per_rank = args.batch_size // world_size
    if per_rank < 2 or per_rank % 2:
        raise ValueError(
            f"the per-rank batch ({args.batch_size} / {world_size} processes = {per_rank}) must split into two "
            f"equal halves (training half and meta half): use a --batch-size that is a multiple of {2 * world_size}"
        )
    return per_rank


class Run:
    """One training run, so that the loop reads like the algorithm: the pieces built from the flags
    (:meth:`build`: data, model, optimizer, schedule, L2W, EMA), the loader-batch count ``step``, and three
    parts with a job each (:mod:`timm_l2w.training`): ``updater`` (the update and its counters),
    ``summary`` (the epoch's sums, its rows and the history) and ``checkpoints`` (writing and restoring).
    The methods below only hand each part the run's step and counters."""

    def __init__(self, args: argparse.Namespace):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.args = args
        log_with = args.log_with
        if log_with == "auto":
            from accelerate.utils import is_tensorboard_available

            log_with = "tensorboard" if is_tensorboard_available() else None
        elif log_with == "none":
            log_with = None
        self.log_with = log_with
        # a second run in the same process (demo, notebooks, tests) may ask for another precision:
        # forget the previous run's AcceleratorState (the process group in PartialState is kept)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        from accelerate.utils import GradientAccumulationPlugin

        # windows of exactly --grad-accum-steps halves, across epoch ends (no flush at the end of the loader)
        accumulation = GradientAccumulationPlugin(num_steps=args.grad_accum_steps, sync_with_dataloader=False)
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu, log_with=log_with,
                                       project_dir=args.output, gradient_accumulation_plugin=accumulation)
        if args.mixed_precision == "fp16" and self.accelerator.scaler is None:
            raise ValueError(f"--mixed-precision fp16 needs a GPU: accelerate has no fp16 autocast or loss scaling "
                             f"on {self.accelerator.device.type} and would train in fp32; "
                             f"use --mixed-precision bf16 there")
        self.per_rank = _check_args(args, self.accelerator.num_processes)
        set_seed(args.seed)
        self.output = Path(args.output)
        self.stop_signal: Optional[int] = None

    # -- construction --------------------------------------------------------------------------
    def build(self) -> None:
        from timm.scheduler import CosineLRScheduler

        from ..data import create_datasets, create_loaders

        args, acc = self.args, self.accelerator
        self.splits = create_datasets(args.dataset, data_dir=args.data_dir, input_size=args.input_size,
                                      held_out=args.held_out, download=args.download)
        self.model = create_multi_exit_model(args.model, num_classes=self.splits.num_classes,
                                             in_chans=self.splits.input_size[0], exit_indices=args.exit_indices,
                                             exit_head=args.exit_head, pretrained=args.pretrained,
                                             weights_file=args.pretrained_path, **args.model_kwargs)
        _check_input_size(self.model, self.splits.input_size)
        if args.pretrained_path:
            fresh = load_pretrained(self.model, args.pretrained_path)
            if acc.is_main_process:
                print(f"timm-l2w train: initialised from {args.pretrained_path}"
                      + (f"; {len(fresh)} exit classifier tensors re-initialised for {self.splits.num_classes} "
                         f"classes: {', '.join(fresh)}" if fresh else " (every tensor)"), flush=True)
        self.num_exits = int(self.model.num_exits)
        train_loader, self.held_loader, self.test_loader = create_loaders(
            self.splits, self.per_rank, args.eval_batch_size, seed=args.seed, num_workers=args.workers)
        _set_tf32(args.tf32)
        if args.device_data:  # the whole training set on the device (timm_l2w.accel.device_data)
            from ..accel.device_data import DeviceLoader

            augment = args.device_augment
            if augment == "auto":
                augment = "crop-flip" if args.dataset.lower().startswith("torch/cifar") else "none"
            self.train_loader = DeviceLoader.from_splits(
                self.splits, self.per_rank, acc.device, seed=args.seed, augment=augment,
                world_size=acc.num_processes, rank=acc.process_index, channels_last=args.channels_last)
        else:
            self.train_loader = acc.prepare(train_loader)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(self.splits.train)} images) gives no full batch of "
                             f"{args.batch_size}: pass a smaller --batch-size")
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        _check_accumulation(args, self.steps_per_epoch)
        self.total_updates = 2 * self.total_steps // args.grad_accum_steps  # optimizer updates
        self.model.to(acc.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        optimizer = _create_optimizer(self.model, args)
        from ..weighting import Distillation

        self.distill = Distillation(args.distill_temperature, args.distill_alpha) if args.distill else None
        self.mixup, self.criterion = _mixup_and_criterion(args, self.splits.num_classes)
        if args.gradient_equilibrium:
            self.model.set_gradient_equilibrium(True)
        self.l2w = None
        if args.weighting == "l2w":
            from ..meta import L2W

            # built before accelerate wraps the model's forward for mixed precision, so the virtual
            # step's patched copy of the model is the plain module; L2W gets the prepared model below
            self.l2w = L2W(self.model, optimizer, num_exits=self.num_exits, eps=args.eps,
                           constraint=args.constraint, input_type=args.input_type,
                           target_p_index=args.target_p_index, hidden_sizes=(args.hidden,),
                           meta_interval=args.meta_interval, meta_lr=args.meta_lr,
                           meta_weight_decay=args.meta_weight_decay, total_steps=self.total_updates,
                           backend=args.backend, accelerator=acc, meta_precision=args.meta_precision,
                           distill=self.distill, criterion=self.criterion, **_l2w_step_kwargs(args, self.model))
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        if self.l2w is not None:
            self.l2w.model, self.l2w.optimizer = self.model, self.optimizer
        self.scheduler = CosineLRScheduler(optimizer, t_initial=self.total_updates, lr_min=args.min_lr,
                                           warmup_t=args.warmup_steps, warmup_lr_init=args.warmup_lr,
                                           t_in_epochs=False)
        self.ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(acc.unwrap_model(self.model), decay=args.model_ema_decay,
                                  use_warmup=args.model_ema_warmup)
        self.step = 0  # loader batches trained (two updates each)
        self.updater = Updater(args, acc, self.model, self.optimizer, l2w=self.l2w, ema=self.ema,
                               distill=self.distill, criterion=self.criterion)
        self.summary = EpochSummary(self.num_exits, acc, self.output)
        self.checkpoints = Checkpoints(self.output / "checkpoints", acc, args, self.model, self.optimizer,
                                       self.l2w, self.ema, self.splits, self.num_exits)

    # -- the run's state: each part's, and the step that ties them -----------------------------
    def update(self, x: Tensor, y: Tensor, stats: Dict[str, Any]) -> Tensor:
        """One update on the half ``(x, y)`` of the current loader batch (:meth:`Updater.update`)."""
        return self.updater.update(x, y, stats, self.step)

    def end_epoch(self, epoch: int) -> Dict[str, Any]:
        """Log epoch ``epoch``'s row (:meth:`EpochSummary.end_epoch`) and return it."""
        return self.summary.end_epoch(epoch, self.step, self.updater.updates_done,
                                      self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` for the current step (:meth:`Checkpoints.save`)."""
        return self.checkpoints.save(self.step, {**self.summary.state(),
                                                 "nonfinite_run": int(self.updater.nonfinite_run)})

    def load_checkpoint(self, path: Path) -> None:
        """Restore checkpoint ``path`` (:meth:`Checkpoints.load`, which checks every file first) and
        continue its step, history, update counts and learning-rate schedule."""
        state = self.checkpoints.load(path)
        self.step = int(state["step"])
        self.summary.restore(state)
        self.updater.resume_at(self.step, int(state.get("nonfinite_run", 0)))
        self.scheduler.step_update(num_updates=self.updater.updates_done)


def _set_tf32(setting: str) -> None:
    """``--tf32``: TF32 for fp32 matmuls and cuDNN convolutions on or off (``default``: torch's own)."""
    if setting != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting == "on"


def _check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """Fail before training when the images cannot go through ``model``, naming the command-line fix."""
    check = getattr(model, "check_input", None)
    try:
        if check is not None:
            check(torch.zeros(1, *input_size))
    except ValueError as err:
        if "img_size" not in str(err):
            raise
        raise ValueError(f"{err} -- on the command line: --model-kwargs img_size={input_size[-1]}") from None


def _create_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer from the ``--opt`` flags (``create_optimizer_v2``: param groups, layer decay)."""
    from timm.optim import create_optimizer_v2, list_optimizers

    known = list_optimizers()
    if args.opt.lower() not in known:
        raise ValueError(f"--opt {args.opt} is not a timm optimizer: choose one of {', '.join(known)}")
    extra: Dict[str, Any] = {}
    if args.opt_eps is not None:
        extra["eps"] = args.opt_eps
    if args.opt_betas is not None:
        extra["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=args.lr, momentum=args.momentum,
                                   weight_decay=args.weight_decay, filter_bias_and_bn=args.filter_bias_and_bn,
                                   layer_decay=args.layer_decay, **extra)
    except (AssertionError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--opt {args.opt} with these settings is refused by timm ({err or type(err).__name__}): "
                         f"check --opt-eps / --opt-betas / --momentum for this optimizer") from None


def _mixup_and_criterion(args: argparse.Namespace, num_classes: int) -> tuple:
    """timm's Mixup / CutMix (or None) and the per-exit training loss, chosen as timm's train.py chooses them:
    with mixing, soft-target CE (smoothing inside Mixup) or BCE; without, CE or BCE with label smoothing."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy

    from ..weighting import ExitCriterion

    smoothing = args.label_smoothing
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=smoothing,
                      num_classes=num_classes)
        smoothing = 0.0  # already in the mixed targets
    if args.bce_loss:
        return mixup, ExitCriterion.from_module(BinaryCrossEntropy(smoothing=smoothing,
                                                                   target_threshold=args.bce_target_thresh))
    return mixup, ExitCriterion("ce", smoothing)


def _l2w_step_kwargs(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    """What L2W needs to model the real update beyond the optimizer: the clipping (only when used; under
    agc without the classifiers, :func:`agc_parameters`; the accumulation it reads from the accelerator)."""
    if args.clip_grad is None:
        return {}
    clipped = agc_parameters(model) if args.clip_mode == "agc" else None
    return dict(clip_grad=args.clip_grad, clip_mode=args.clip_mode, clip_parameters=clipped)



def _check_accumulation(args: argparse.Namespace, steps_per_epoch: int) -> None:
    """Accumulation windows (``--grad-accum-steps`` halves) must end where checkpoints are taken (epoch ends,
    ``--checkpoint-every``, ``--stop-after-steps``), so that a resumed run continues exactly."""
    n = args.grad_accum_steps
    if n == 1:
        return
    if n % 2:
        raise ValueError(f"--grad-accum-steps {n}: every loader batch gives two halves (two micro-batches), so a "
                         f"window must hold an even number of them: use {n + 1} or {max(n - 1, 2)}")
    for what, steps in (("an epoch", steps_per_epoch), ("--max-steps", args.max_steps),
                        ("--checkpoint-every", args.checkpoint_every), ("--stop-after-steps", args.stop_after_steps)):
        if steps and (2 * steps) % n:
            raise ValueError(f"--grad-accum-steps {n} needs {what} ({steps} loader batches = {2 * steps} halves) to "
                             f"be a whole number of windows: pick a --grad-accum-steps that divides {2 * steps}")


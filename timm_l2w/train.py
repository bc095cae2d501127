"""``timm-l2w train``: train a multi-exit model with L2W or equal weighting, built on accelerate.

One process or many (``accelerate launch ...``), mixed precision, progress bars, per-epoch CSV/JSON
logs, atomic checkpoints with exact resume, and anytime + budgeted evaluation at the end.

Every loader batch (global size ``--batch-size``, ``batch_size / world_size`` per rank) is split into
two halves and gives two updates (docs/method.md §5); ``--weighting uniform`` keeps the
same halves and schedule without the meta step, so the two runs differ only in the weighting.
``step`` counts loader batches, ``update`` counts optimizer steps (two per step).

Checkpoints go to ``OUTPUT/checkpoints/step_XXXXXXXX/``: ``model.safetensors`` and
``weight_predictor.safetensors`` (the files to share), ``state/`` (accelerate's ``save_state``:
optimizer, RNG, model), ``l2w_state.pt`` (meta optimizer, schedule), ``train_state.json`` and a
``COMPLETE`` marker. Each is written into a temporary folder and renamed into place, so a crash
never leaves a half-written checkpoint under a final name; ``--resume auto`` takes the newest
complete one.

This module is the command and its loop; the run's parts (the update, the epoch summary, the
checkpoints) live in :mod:`timm_l2w.training`, below it.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .cli.common import DefaultsHelpFormatter, add_device, add_input_size, add_version
from .training.checkpoints import (CHECKPOINT_PREFIX, EMA_FILE, Checkpoints, complete_checkpoints, discard,
                                   find_checkpoint)
from .training.stops import TrainingStopped, fault_point
from .training.summary import EpochSummary
from .training.update import Updater

__all__ = ["PRESETS", "build_parser", "parse_args", "train", "main", "find_checkpoint", "TrainingStopped"]

# The paper's hyperparameters (docs/method.md §8). "cifar" is the default; "imagenet" changes these keys.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar": dict(eps=0.8, constraint="col", input_type="loss", target_p_index=15, meta_interval=1,
                  meta_lr=1e-4, meta_weight_decay=1e-4, hidden=500, label_smoothing=0.0),
    "imagenet": dict(eps=0.3, constraint="mat", input_type="loss", target_p_index=15, meta_interval=100,
                     meta_lr=1e-4, meta_weight_decay=1e-4, hidden=500, label_smoothing=0.1),
}


# ----------------------------------------------------------------------------- arguments


def _preset_help(text: str, key: str) -> str:
    return f"{text} (default: the --preset's, " + ", ".join(f"{name} {cfg[key]}" for name, cfg in PRESETS.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(prog="timm-l2w train", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    add_version(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="msdnet_l2w_cifar", help="registered multi-exit timm model, or any timm "
                   "model name (wrapped as multi_exit_l2w: exit heads on its feature_info points)")
    g.add_argument("--exit-indices", nargs="+", type=int, default=None, metavar="I",
                   help="a wrapped timm model's exit points: indices into its feature_info (default: every stage, "
                        "or four evenly spaced blocks)")
    g.add_argument("--exit-head", choices=["linear", "conv"], default=None,
                   help="a wrapped timm model's exit heads: pooling + linear (default) or a small conv head")
    g.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="FILE",
                   help="start a wrapped timm model's backbone from timm's pretrained weights (its hub files), or "
                        "from FILE, a local timm checkpoint of the backbone (timm's pretrained_cfg_overlay file)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, e.g. img_size=32 for vit_tiny_l2w at --input-size 32")
    g.add_argument("--pretrained-path", default=None, help="initial weights (.safetensors) to fine-tune from; "
                   "only the exit classifiers may differ (another number of classes), they start fresh")
    g.add_argument("--dataset", default="digits", help="digits, digits-affine, fashion-mnist, torch/cifar10, "
                   "torch/cifar100, or a name with --data-dir for an ImageFolder tree")
    g.add_argument("--data-dir", default=None, help="folder with the data set files")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs internet)")
    add_input_size(g, 32)
    g.add_argument("--held-out", type=int, default=None, help="training images kept for threshold calibration "
                   "(default: 300 for digits, else a tenth of the training set, at most 5,000; a flat ImageFolder "
                   "without val/ also gives a fifth of its images to the test split)")
    g.add_argument("--workers", type=int, default=0, help="data loader workers per process")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=300, help="passes over the training set (the paper: 300 on CIFAR)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many loader batches (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch; each rank gets batch/world_size")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine schedule)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine schedule")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of SGD-type optimizers (--opt)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, in updates")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of the warmup")
    g.add_argument("--label-smoothing", type=float, default=None, help=_preset_help("label smoothing", "label_smoothing"))
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="autocast precision")
    g.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and data order")
    add_device(g, "cpu, or cuda when there is a GPU (the default then; more GPUs: accelerate launch)",
               choices=["cpu", "cuda"])

    g = p.add_argument_group("timm's recipe pieces (flags named as timm's train.py names them)")
    g.add_argument("--opt", default="momentum", help="timm optimizer (timm.optim.create_optimizer_v2 names: momentum "
                   "(SGD + momentum, the paper's), sgd, nesterov, adamw, adam, lamb, ...; README: which L2W supports)")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, metavar="BETA",
                   help="optimizer betas (default: the optimizer's)")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (timm's param groups)")
    g.add_argument("--filter-bias-and-bn", action="store_true",
                   help="no weight decay on biases and norm layers (timm's recipes; the paper decays every tensor)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this norm / value / AGC factor")
    g.add_argument("--clip-mode", choices=["norm", "value", "agc"], default="norm", help="gradient clipping mode")
    g.add_argument("--grad-accum-steps", type=int, default=1,
                   help="micro-batches (halves of a loader batch) accumulated into each optimizer update")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a loader batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of CutMix when both are on")
    g.add_argument("--mixup-mode", choices=["batch", "pair", "elem"], default="batch", help="how Mixup pairs samples")
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy (timm's BinaryCrossEntropy) per exit")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="binarise BCE targets above this value")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm's ModelEmaV3); "
                   "the final evaluation and model_ema.safetensors use it")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per update")
    g.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup (ModelEmaV3's use_warmup)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")

    g = p.add_argument_group("L2W (defaults: the paper's CIFAR settings, see --preset)")
    g.add_argument("--weighting", choices=["l2w", "uniform"], default="l2w",
                   help="l2w: learned sample weights; uniform: equal weights, same halves and schedule")
    g.add_argument("--preset", choices=sorted(PRESETS), default="cifar",
                   help="the paper's settings; flags given explicitly override it")
    g.add_argument("--eps", type=float, default=None, help=_preset_help("weights lie in [1 - eps, 1 + eps]", "eps"))
    g.add_argument("--constraint", choices=["row", "col", "mat"], default=None,
                   help=_preset_help("how the weights are normalised", "constraint"))
    g.add_argument("--input-type", choices=["loss", "conf", "both"], default=None,
                   help=_preset_help("what the weight predictor sees", "input_type"))
    g.add_argument("--target-p-index", type=int, default=None,
                   help=_preset_help("training exit distribution q = j/20", "target_p_index"))
    g.add_argument("--meta-interval", type=int, default=None, help=_preset_help("meta step every N updates", "meta_interval"))
    g.add_argument("--meta-lr", type=float, default=None, help=_preset_help("Adam lr of the weight predictor", "meta_lr"))
    g.add_argument("--meta-weight-decay", type=float, default=None,
                   help=_preset_help("Adam weight decay of the weight predictor", "meta_weight_decay"))
    g.add_argument("--hidden", type=int, default=None, help=_preset_help("hidden size of the weight predictor", "hidden"))
    g.add_argument("--backend", choices=["higher", "func"], default="higher", help="virtual-step backend")
    g.add_argument("--meta-precision", choices=["fp32", "amp"], default="fp32",
                   help="meta step under --mixed-precision bf16/fp16: fp32 (autocast off; the bf16 meta gradient is "
                        "mostly rounding noise early on) or amp (the real step's autocast; fp16 with its own loss "
                        "scale); docs/precision.md")

    g = p.add_argument_group("IMTA's training methods (Li et al., ICCV 2019), with L2W or uniform weighting")
    g.add_argument("--distill", action="store_true",
                   help="one-for-all knowledge distillation: the last exit teaches every earlier exit, "
                        "(1 - alpha) CE + alpha T^2 KL(last || exit k)")
    g.add_argument("--distill-temperature", type=float, default=1.0, help="distillation temperature T (with --distill)")
    g.add_argument("--distill-alpha", type=float, default=0.1, help="distillation weight alpha (with --distill)")
    g.add_argument("--gradient-equilibrium", action="store_true",
                   help="rescale the gradients into the shared trunk: each block gets the mean of the gradients of "
                        "the exits after it (forward unchanged)")

    g = p.add_argument_group("speed on a GPU (docs/gpu_recipe.md)")
    g.add_argument("--device-data", action="store_true",
                   help="keep the training set on the device (digits, digits-affine, fashion-mnist, CIFAR): batches "
                        "gathered and transformed there, no DataLoader workers")
    g.add_argument("--device-augment", choices=["auto", "none", "crop-flip"], default="auto",
                   help="augmentation of --device-data: crop-flip is the CIFAR recipe (4-pixel pad, random crop, "
                        "horizontal flip); auto: crop-flip for CIFAR, none for the other sets (as their loaders)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole update (meta step, weighted loss, backward, optimizer step) as CUDA graphs "
                        "and replay them; falls back to the eager update, saying why, where that is not possible")
    g.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="TF32 for fp32 matmuls and convolutions on the GPU (default: torch's, convolutions only)")

    g = p.add_argument_group("output")
    g.add_argument("--output", default="output/train", help="folder for checkpoints, logs and results")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in --output) or a path")
    g.add_argument("--overwrite", action="store_true", help="start a fresh run in an --output that holds another "
                   "run: its checkpoints, logs and weights are deleted first (without it, such an --output is refused)")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="save a checkpoint and exit after this many steps (train in chunks; resume with --resume auto)")
    g.add_argument("--max-nonfinite", type=int, default=10,
                   help="stop after this many non-finite losses in a row (each one is skipped)")
    g.add_argument("--no-eval", action="store_true", help="skip the final anytime + budgeted evaluation")
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size of the final evaluation")
    g.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (the per-epoch summary lines stay; bars are off anyway when stderr "
                        "is not a terminal)")
    g.add_argument("--log-with", default="auto", help="accelerate tracker: auto (tensorboard if installed), none, ...")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; L2W flags left unset take the values of ``--preset``. ``--model`` left unset is
    the model ``--pretrained-path`` records in its metadata, else the parser's default."""
    parser = build_parser()
    default_model = parser.get_default("model")
    parser.set_defaults(model=None)  # to tell "not given" from the default
    args = parser.parse_args(list(argv) if argv is not None else None)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.default_model = default_model
    args.cpu = args.device == "cpu"
    return args


def _resolve_model(args: argparse.Namespace) -> None:
    """``args.model``: the flag; else the name ``--pretrained-path`` records; else the default. A flag that
    contradicts the file's record is an error naming both (as ``timm-l2w eval`` does)."""
    if args.pretrained_path:
        from .checkpoint import recorded_model

        args.model = recorded_model(args.pretrained_path, args.model)
    if not args.model:
        args.model = getattr(args, "default_model", None) or "msdnet_l2w_cifar"


def _check_args(args: argparse.Namespace, world_size: int) -> int:
    """Validate the numbers and resolve ``--model``; return the per-rank batch size."""
    from .validation import check_train_settings

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


def _check_writable(folder: Path) -> None:
    """Fail before training (not after the first epoch) when ``folder`` cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--output {folder} is not writable ({err.strerror or err}): pass a folder you can "
                         f"write to, or fix its permissions") from err


# ----------------------------------------------------------------------------- the run


class _Run:
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
            raise ValueError(f"--mixed-precision fp16 needs a GPU: accelerate has no fp16 autocast or loss scaling on "
                             f"{self.accelerator.device.type} and would train in fp32; use --mixed-precision bf16 there")
        self.per_rank = _check_args(args, self.accelerator.num_processes)
        set_seed(args.seed)
        self.output = Path(args.output)
        self.stop_signal: Optional[int] = None

    # -- construction --------------------------------------------------------------------------
    def build(self) -> None:
        import timm
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        from .data import create_datasets, create_loaders

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
            from .accel.device_data import DeviceLoader

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
        from .weighting import Distillation

        self.distill = Distillation(args.distill_temperature, args.distill_alpha) if args.distill else None
        self.mixup, self.criterion = _mixup_and_criterion(args, self.splits.num_classes)
        if args.gradient_equilibrium:
            self.model.set_gradient_equilibrium(True)
        self.l2w = None
        if args.weighting == "l2w":
            from .meta import L2W

            # built before accelerate wraps the model's forward for mixed precision, so the virtual
            # step's patched copy of the model is the plain module; L2W gets the prepared model below
            self.l2w = L2W(self.model, optimizer, num_exits=self.num_exits, eps=args.eps,
                           constraint=args.constraint, input_type=args.input_type,
                           target_p_index=args.target_p_index, hidden_sizes=(args.hidden,),
                           meta_interval=args.meta_interval, meta_lr=args.meta_lr,
                           meta_weight_decay=args.meta_weight_decay, total_steps=self.total_updates,
                           backend=args.backend, accelerator=acc, meta_precision=args.meta_precision,
                           distill=self.distill, criterion=self.criterion, **_l2w_step_kwargs(args))
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

    from .weighting import ExitCriterion

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


def _l2w_step_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """What L2W needs to model the real update beyond the optimizer: the clipping (only when used; the
    accumulation it reads from the accelerator)."""
    return {} if args.clip_grad is None else dict(clip_grad=args.clip_grad, clip_mode=args.clip_mode)


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


def create_multi_exit_model(name: str, exit_indices: Optional[Sequence[int]] = None, exit_head: Optional[str] = None,
                            pretrained: Any = None, weights_file: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """A registered multi-exit model, or any other timm model wrapped as one (``multi_exit_l2w``).

    ``exit_indices`` / ``exit_head`` choose a wrapped backbone's exit points and heads; ``pretrained``:
    ``True`` (the backbone's timm weights) or a local timm checkpoint file of the backbone; ``weights_file``:
    a multi-exit checkpoint about to be loaded, whose metadata fills in how a wrapper was built.
    """
    import timm

    import timm_l2w  # noqa: F401  (registers the models)
    from .models.multi_exit import wrapper_create_args

    if not timm.is_model(name):
        known = ", ".join(timm.list_models("*l2w*")) or "(none registered)"
        raise ValueError(f"unknown model '{name}': pass a timm model name (any of timm.list_models()) or a "
                         f"registered multi-exit model ({known})")
    name, kwargs = wrapper_create_args(name, exit_indices=exit_indices, head=exit_head, pretrained=pretrained,
                                       weights_file=weights_file, **kwargs)
    model = timm.create_model(name, **kwargs)
    if not isinstance(getattr(model, "num_exits", None), int):
        raise ValueError(f"model '{name}' is not multi-exit (no num_exits): use a timm_l2w model, e.g. "
                         f"msdnet_l2w_cifar, or wrap a backbone with timm_l2w.MultiExitWrapper")
    return model


def load_pretrained(model: nn.Module, path: str) -> List[str]:
    """Load weights from a safetensors file (or a release ``.pth``/``.pth.tar``, read with
    ``weights_only=True``) into ``model``. Only the exit classifiers may differ in shape (another
    ``num_classes``): they keep the model's fresh initialisation and their names are returned. Any
    other difference (missing, unexpected or differently shaped tensors: another architecture or
    configuration, named from the file's metadata) and unusable weights (NaN/inf, an integer dtype
    where the model has floating point) are a :class:`~timm_l2w.validation.CheckpointError`
    (a ``ValueError``), raised before the model is touched."""
    from .checkpoint import check_pretrained, load_state_dict
    from .validation import check_weights

    state = load_state_dict(path)  # safetensors or weights_only torch.load; 'module.' prefixes removed
    own = model.state_dict()
    skipped = check_pretrained(model, state, path)  # the exit classifiers of another num_classes
    check_weights({k: v for k, v in state.items() if k not in skipped}, own, Path(path))  # dtypes, finite values
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training ``args`` describe (from :func:`parse_args`); returns the log and results."""
    from tqdm.auto import tqdm

    run = _Run(args)
    acc = run.accelerator
    _check_fresh_output(run.output, args)
    if acc.is_main_process:
        if args.overwrite and not args.resume:
            _clear_run(run.output)
        _check_writable(run.output)
    acc.wait_for_everyone()
    run.build()
    if acc.is_main_process:
        n = acc.num_processes
        kind = f", {acc.distributed_type.value}" if n > 1 else ""
        print(f"timm-l2w train: world size {n} ({n} process{'es' if n > 1 else ''}{kind}), device {acc.device}, mixed precision {acc.mixed_precision}, "
              f"{torch.get_num_threads()} CPU thread(s) per process; {args.model} on {args.dataset}, batch "
              f"{args.batch_size} ({run.per_rank} per process), {run.total_steps} steps", flush=True)
        from .data import describe_splits, held_out_too_small

        print(f"timm-l2w train: data: {describe_splits(run.splits)}", flush=True)
        small = held_out_too_small(len(run.splits.held_out), run.num_exits)
        if small:
            warnings.warn(small, UserWarning, stacklevel=2)
        if args.weighting == "l2w":
            from .validation import negative_weights_note

            note = negative_weights_note(args.eps, args.constraint, run.num_exits, run.per_rank // 2)
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
    if args.resume:
        path = find_checkpoint(args.resume, args.output)
        run.load_checkpoint(path)
        if acc.is_main_process:
            print(f"timm-l2w train: resumed from step {run.step} ({path})", flush=True)
    results_name = f"{args.model}_{args.weighting}"
    finished = run.step >= run.total_steps  # resumed from the last checkpoint of a run that had ended
    if finished and (run.output / "model.safetensors").is_file() and (
            args.no_eval or (run.output / f"{results_name}.json").is_file()):
        if acc.is_main_process:
            print(f"timm-l2w train: the run in {run.output} is already complete (step {run.step} of "
                  f"{run.total_steps}): nothing to train, no file changed. Raise --max-steps/--epochs to train "
                  f"further, or use a fresh --output", flush=True)
        acc.wait_for_everyone()
        return {"history": run.summary.history, "step": run.step, "output": str(run.output), "complete": True,
                "model": acc.unwrap_model(run.model), "weight_net": run.l2w.weight_net if run.l2w is not None else None}
    if acc.is_main_process:
        run.checkpoints.remove_leftovers()
    if acc.is_main_process:
        run.output.mkdir(parents=True, exist_ok=True)
    if run.log_with:
        acc.init_trackers("timm_l2w", config={k: v for k, v in vars(args).items()
                                               if isinstance(v, (int, float, str, bool))})
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(signum, frame):  # noqa: ARG001
        run.stop_signal = signum

    for s in previous:  # a signal only sets a flag: the loop saves a checkpoint and stops cleanly
        signal.signal(s, _on_signal)
    show = acc.is_local_main_process and not args.no_progress and sys.stderr.isatty()  # no \r in log files
    device = acc.device
    stop = pause = False
    try:
        run.model.train()  # model(x) returns every exit only in train mode (eval mode: the last exit)
        start_epoch = run.step // run.steps_per_epoch
        for epoch in range(start_epoch, run.num_epochs):
            if finished:  # only the final model or results were missing: write them, train nothing
                break
            done = run.step - epoch * run.steps_per_epoch
            steps_here = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
            loader = run.train_loader
            if done:  # resumed inside an epoch (timm_l2w.accel.device_data's loader skips on its own)
                skip = getattr(loader, "skip_first_batches", None)
                loader = skip(done) if skip is not None else acc.skip_first_batches(loader, done)
            # the data order depends only on (seed, epoch); accelerate's loaders re-apply their own
            # epoch counter to the sampler when iterated, so set it on the loader being iterated
            loader.set_epoch(epoch)
            bar = tqdm(total=steps_here, initial=done, desc=f"epoch {epoch + 1}/{run.num_epochs}",
                       disable=not show, leave=False, dynamic_ncols=True)
            stats = run.summary.new_sums(device)
            t0 = shown_at = time.perf_counter()
            for x, y in loader:
                if run.mixup is not None:  # the whole loader batch, before it is split (soft targets on both halves)
                    x, y = run.mixup(x, y)
                if run.updater.graphs is not None:  # --cuda-graphs: the batch in the static buffers the graphs read
                    x, y = run.updater.graphs.stage(x, y)
                halves = run.l2w.split(x, y) if run.l2w is not None else _halves(x, y)
                for xt, yt in halves:
                    loss = run.update(xt, yt, stats)
                    run.scheduler.step_update(num_updates=run.updater.updates_done)
                run.step += 1
                if show and time.perf_counter() - shown_at > 1.0:  # reading the loss waits for the device: 1/s
                    shown_at = time.perf_counter()
                    post = {"loss": f"{float(loss):.3f}", "lr": f"{run.optimizer.param_groups[0]['lr']:.3g}"}
                    if run.l2w is not None and run.l2w.last_meta_loss is not None:
                        post["meta"] = f"{run.l2w.last_meta_loss:.3f}"
                    bar.set_postfix(post)
                bar.update(1)
                stop = _any_rank(acc, run.stop_signal is not None)
                pause = bool(args.stop_after_steps) and run.step == args.stop_after_steps < run.total_steps
                mid_epoch_ckpt = bool(args.checkpoint_every) and run.step % args.checkpoint_every == 0
                boundary = run.step % run.steps_per_epoch == 0 or run.step >= run.total_steps
                window_ends = (2 * run.step) % args.grad_accum_steps == 0  # a signal waits for the window's update
                if (stop and window_ends or pause or mid_epoch_ckpt) and not boundary:  # at a boundary the epoch ends first
                    run.summary.add_time(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    run.summary.flush(stats, device)
                    stats = run.summary.new_sums(device)
                    _maybe_stop(run, run.save_checkpoint(), stop, pause)
                if run.step >= run.total_steps:
                    break
            bar.close()
            run.summary.add_time(time.perf_counter() - t0)
            run.summary.flush(stats, device)
            row = run.end_epoch(epoch)
            fault_point("epoch_end", run.step)
            path = run.save_checkpoint()
            if acc.is_main_process:  # the per-epoch summary stays with --no-progress
                meta = f" meta {row['meta_loss']:.4f}" if row["meta_loss"] is not None else ""
                print(f"epoch {row['epoch']}: loss {row['loss']:.4f} (sum over the {run.num_exits} exits){meta} last-exit acc "
                      f"{row[f'acc_{run.num_exits}']:.1f}% lr {row['lr']:.4g} ({row['time_s']:.1f}s)", flush=True)
            _maybe_stop(run, path, stop, pause)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    result: Dict[str, Any] = {"history": run.summary.history, "step": run.step, "output": str(run.output)}
    model = acc.unwrap_model(run.model)
    if acc.is_main_process:
        run.checkpoints.write_weights(run.output, run.checkpoints.metadata())  # atomic
        if not args.no_eval:
            from .evaluate import evaluate_checkpoint

            if run.ema is not None:
                print(f"timm-l2w train: evaluating the EMA weights ({EMA_FILE})", flush=True)
            evaluated = run.ema.module if run.ema is not None else model
            result["eval"] = evaluate_checkpoint(evaluated, run.held_loader, run.test_loader, out_dir=run.output,
                                                 name=results_name, device=device,
                                                 input_size=run.splits.input_size)
    result["model"] = model
    result["model_ema"] = run.ema.module if run.ema is not None else None
    result["weight_net"] = run.l2w.weight_net if run.l2w is not None else None
    acc.wait_for_everyone()
    for tracker in acc.trackers:  # not end_training(): that also tears down the process group
        tracker.finish()
    return result


def _run_files(output: Path) -> List[Path]:
    """What a run leaves in its --output that a later run would mix with its own (resume, logs, weights)."""
    names = ["checkpoints", "log.json", "log.csv", "model.safetensors", "weight_predictor.safetensors", EMA_FILE]
    return [output / n for n in names if (output / n).exists()]


def _check_fresh_output(output: Path, args: argparse.Namespace) -> None:
    """Refuse a fresh run (no --resume) into an --output that holds another run's checkpoints, unless
    --overwrite: a later --resume auto would otherwise continue the old run."""
    if args.resume or args.overwrite:
        return
    root = output / "checkpoints"
    found = complete_checkpoints(root)
    if found:
        raise ValueError(
            f"--output {output} holds another run (checkpoints up to step {int(found[-1].name[len(CHECKPOINT_PREFIX):])}): "
            f"continue it with --resume auto, start over with --overwrite (deletes its checkpoints, logs and "
            f"weights), or pass a fresh --output")


def _clear_run(output: Path) -> None:
    """--overwrite: delete the previous run's files (:func:`_run_files`), checkpoints first."""
    for path in _run_files(output):
        if path.is_dir():
            discard(path)
        else:
            path.unlink()


def _maybe_stop(run: _Run, path: Path, stop: bool, pause: bool) -> None:
    """After a checkpoint: raise :class:`TrainingStopped` for a signal or ``--stop-after-steps``."""
    if stop:
        signum = run.stop_signal or signal.SIGTERM
        raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at step {run.step}; checkpoint saved to "
                              f"{path}: continue with --resume auto", 128 + int(signum))
    if pause:
        raise TrainingStopped(f"paused after step {run.step} (--stop-after-steps); checkpoint saved to {path}: "
                              f"continue with --resume auto", 0)


def _halves(x: Tensor, y: Tensor):
    half = x.shape[0] // 2
    return ((x[:half], y[:half]), (x[half:], y[half:]))


def _any_rank(acc: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one collective)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-l2w train``: exit code 0 on success, 2 on bad input, 128+signal when stopped by a signal."""
    args = parse_args(argv)
    try:
        result = train(args)
    except TrainingStopped as err:
        from accelerate import PartialState

        if PartialState().is_main_process:  # every rank stops; one says so
            print(f"timm-l2w train: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, OSError, TypeError) as err:  # OSError: FileNotFoundError, PermissionError...
        print(f"timm-l2w train: error: {err}", file=sys.stderr)
        return 2
    if "eval" in result:
        best = max(result["eval"]["budgeted"].rows(), key=lambda r: r["test_top1"])
        for row in result["eval"]["anytime"]:
            print(f"exit {row['exit']}: top1 {row['top1']:.2f}%  {row['flops'] / 1e6:.2f} MFLOPs")
        print(f"budgeted: best test top1 {best['test_top1']:.2f}% at {best['expected_flops'] / 1e6:.2f} MFLOPs")
        print(f"results in {result['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

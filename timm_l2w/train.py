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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .cli_common import DefaultsHelpFormatter, add_device, add_input_size, add_version
from .files import csv_text, write_json_atomic, write_text_atomic

__all__ = ["PRESETS", "build_parser", "parse_args", "train", "main", "find_checkpoint", "TrainingStopped"]

CHECKPOINT_PREFIX = "step_"
EMA_FILE = "model_ema.safetensors"  # --model-ema: the averaged weights, beside model.safetensors
COMPLETE_MARKER = "COMPLETE"

# The paper's hyperparameters (docs/method.md §8). "cifar" is the default; "imagenet" changes these keys.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar": dict(eps=0.8, constraint="col", input_type="loss", target_p_index=15, meta_interval=1,
                  meta_lr=1e-4, meta_weight_decay=1e-4, hidden=500, label_smoothing=0.0),
    "imagenet": dict(eps=0.3, constraint="mat", input_type="loss", target_p_index=15, meta_interval=100,
                     meta_lr=1e-4, meta_weight_decay=1e-4, hidden=500, label_smoothing=0.1),
}


class TrainingStopped(RuntimeError):
    """Raised when training stops early (signal, too many non-finite losses); a checkpoint was saved."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


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


FAULT_ENV = "TIMM_L2W_FAULT"


def _fault_point(point: str, step: int) -> None:
    """Test hook for the reliability tests: with ``TIMM_L2W_FAULT=POINT:STEP:SIGNAL`` in the environment
    (e.g. ``checkpoint:4:KILL``) this process sends itself ``SIGSIGNAL`` when it reaches ``POINT``
    (``update``: between forward and optimizer step; ``checkpoint``: half-way through writing a checkpoint;
    ``epoch_end``: epoch logged, its checkpoint not yet written) at step ``STEP``. Off when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, at, sig = spec.split(":")
    if name == point and int(at) == step:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


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


# ----------------------------------------------------------------------------- checkpoints


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def find_checkpoint(resume: str, output: str | os.PathLike) -> Path:
    """The checkpoint folder ``--resume`` names: the newest complete one for ``auto``, else the path given."""
    if resume == "auto":
        root = Path(output) / "checkpoints"
        found = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(p)) if root.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"--resume auto found no complete checkpoint in {root}: train without --resume first, "
                f"or pass --resume PATH to a checkpoint folder (one holding a {COMPLETE_MARKER} file)"
            )
        return found[-1]
    path = Path(resume)
    if _is_complete(path):
        return path
    if path.is_dir():  # a checkpoints/ folder or an output folder: take its newest checkpoint
        for root in (path, path / "checkpoints"):
            found = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(p))
            if found:
                return found[-1]
    raise FileNotFoundError(
        f"--resume {resume}: no complete checkpoint there (a checkpoint folder holds a {COMPLETE_MARKER} "
        f"file; half-written ones are ignored): pass a folder from {Path(output) / 'checkpoints'} or 'auto'"
    )


def _is_device_error(err: BaseException) -> bool:
    """torch's errors for a storage that cannot be restored on this device (not a damaged file)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        words in text for words in ("restore data location", "deserialize object on", "torch.cuda.is_available() is False"))


def _older_checkpoint(path: Path) -> Optional[Path]:
    """The newest complete checkpoint beside ``path`` that is older than it (offered when ``path`` cannot be resumed)."""
    older = sorted(p for p in path.parent.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(p) and p.name < path.name)
    return older[-1] if older else None


def _save_tensors(tensors: Dict[str, Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from .checkpoint import save_safetensors

    save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that a crash half-way never leaves it looking complete: rename it
    to a hidden name first (``--resume auto`` ignores those), then remove it."""
    trash = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- the run


class _Run:
    """State and pieces of one training run (kept together so the loop reads like the algorithm)."""

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
        self.ckpt_root = self.output / "checkpoints"
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
        if args.device_data:  # the whole training set on the device (timm_l2w.device_data)
            from .device_data import DeviceLoader

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
        self.step = 0
        self.updates_done = 0  # optimizer updates so far (the scheduler's and the EMA's count)
        self.history: List[Dict[str, Any]] = []
        self.epoch_stats = self._zero_stats()
        self.nonfinite_run: Any = 0  # a device tensor once the update runs sync-free
        self._build_sync_free()

    def _build_sync_free(self) -> None:
        """Sync-free updates (timm_l2w.device_step): the skip of a non-finite update decided on the device,
        where the optimizer has a fused kernel and neither fp16 loss scaling, EMA nor accumulation decide on
        the host; then CUDA graphs (--cuda-graphs) where the update can be captured."""
        from .device_step import fused_blocker, use_fused

        args, acc = self.args, self.accelerator
        host = {"fp16 loss scaling": acc.scaler is not None, "model EMA": self.ema is not None,
                "gradient accumulation": args.grad_accum_steps > 1}
        reason = fused_blocker(self.optimizer) or next((name for name, on in host.items() if on), None)
        self.device_skip = reason is None
        if self.device_skip:
            use_fused(self.optimizer)
        self._stepped = False  # the device-side skip starts after one step (the optimizer state exists)
        self._stop_kind: Any = -1  # 1: the training loss, 0: the meta step reached --max-nonfinite first
        self._since_check = 0
        self.graphs = None
        if args.cuda_graphs:
            from .cuda_graphs import GraphedUpdates, capture_blocker

            optimizers = [self.optimizer] + ([self.l2w.meta_optimizer] if self.l2w is not None else [])
            blocker = (f"the update skips non-finite steps on the host ({reason})" if reason else capture_blocker(
                acc.device, optimizers, args.backend if self.l2w is not None else None, acc.unwrap_model(self.model),
                several_processes=acc.num_processes > 1))
            log = print if acc.is_main_process else (lambda _: None)
            self.graphs = GraphedUpdates(optimizers, log=log, blocker=blocker)

    def _zero_stats(self) -> Dict[str, Any]:
        k = self.num_exits
        return {"loss_sum": [0.0] * k, "correct": [0] * k, "seen": 0, "meta_sum": 0.0, "meta_count": 0,
                "skipped": 0, "meta_skipped": 0, "time": 0.0}

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (temporary folder, marker, rename); prune old ones."""
        acc = self.accelerator
        name = f"{CHECKPOINT_PREFIX}{self.step:08d}"
        final, tmp = self.ckpt_root / name, self.ckpt_root / f".tmp-{name}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))
        if acc.is_main_process:
            meta = {"model": self.args.model, **_kwargs_meta(self.args, acc.unwrap_model(self.model)), "num_classes": str(self.splits.num_classes),
                    "num_exits": str(self.num_exits), "step": str(self.step), "format": "timm_l2w",
                    **_class_names_meta(self.splits), **_data_meta(self.args)}
            _save_tensors(acc.unwrap_model(self.model).state_dict(), tmp / "model.safetensors", meta)
            if self.l2w is not None:
                wmeta = {"num_exits": str(self.num_exits), "input_type": self.args.input_type,
                         "hidden": str(self.args.hidden)}
                _save_tensors(self.l2w.weight_net.state_dict(), tmp / "weight_predictor.safetensors", wmeta)
                torch.save(self.l2w.state_dict(), tmp / "l2w_state.pt")
            if self.ema is not None:
                _save_tensors(self.ema.module.state_dict(), tmp / EMA_FILE, meta)
            write_json_atomic(tmp / "train_state.json", {"step": self.step, "epoch_stats": self.epoch_stats,
                                                   "history": self.history, "nonfinite_run": int(self.nonfinite_run),
                                                   "args": vars(self.args)})
            from .validation import write_checksums

            write_checksums(tmp, acc.process_index)  # a resume detects damaged files (flipped bits too)
            _fault_point("checkpoint", self.step)  # tests: killed half-way, the .tmp- folder is ignored
            (tmp / COMPLETE_MARKER).write_text(f"{self.step}\n")
            if final.exists():  # same step saved before (e.g. stop right after a checkpoint)
                _discard(final)
            os.replace(tmp, final)
            kept = sorted(p for p in self.ckpt_root.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(p))
            for old in kept[: -self.args.keep_checkpoints]:
                _discard(old)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint. Every file it reads is checked first (readable, fits this model and
        optimizer, floating and finite weights, checksums: :func:`timm_l2w.validation.check_resume_checkpoint`);
        any failure is a :class:`~timm_l2w.validation.ResumeError` naming the next older complete checkpoint.
        Nothing here unpickles code: accelerate 1.15's ``load_state`` reads optimizer, scheduler and RNG files
        with ``torch.load(weights_only=True)`` (plus a numpy-array allowlist) and the model from safetensors;
        ``l2w_state.pt`` is read with ``weights_only=True``."""
        from .validation import ResumeError, check_resume_checkpoint

        acc = self.accelerator
        try:
            same = {k: getattr(self.args, k) for k in ("model", "weighting", "input_type", "hidden", "distill",
                                                        "distill_temperature", "distill_alpha", "gradient_equilibrium",
                                                        "batch_size")}  # another batch re-maps the epochs
            state = check_resume_checkpoint(path, acc.unwrap_model(self.model), self.optimizer, self.l2w,
                                            acc.process_index, settings=same)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with a file, the answer is the same
            raise ResumeError.from_exception(path, err, _older_checkpoint(path)) from err
        try:
            acc.load_state(str(path / "state"))
            if self.l2w is not None:
                # "cpu", not acc.device: a 2-process CPU run's device is cpu:0, which torch.load cannot map
                # to; load_state_dict then copies into the predictor and optimizer on their device
                self.l2w.load_state_dict(torch.load(path / "l2w_state.pt", map_location="cpu",
                                                    weights_only=True))
        except Exception as err:  # noqa: BLE001
            if _is_device_error(err):  # the files passed every check above: they are not damaged
                raise ValueError(
                    f"checkpoint {path} is intact but its tensors cannot be placed on this process's device "
                    f"{acc.device} ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}): resume it with "
                    f"the device settings it was saved with (the same --cpu / accelerate launch flags, a machine "
                    f"with that GPU); keep the checkpoint, it is fine") from err
            raise ResumeError.from_exception(path, err, _older_checkpoint(path)) from err
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.epoch_stats = state["epoch_stats"]
        self.nonfinite_run = int(state.get("nonfinite_run", 0))
        self.updates_done = 2 * self.step // self.args.grad_accum_steps
        self.scheduler.step_update(num_updates=self.updates_done)
        if self.ema is not None:
            self.ema.module.load_state_dict(_load_ema(path, self.ema.module))

    # -- one update ----------------------------------------------------------------------------
    def update(self, x: Tensor, y: Tensor, stats: Dict[str, Tensor]) -> Tensor:
        """Forward, (meta step,) weighted loss, backward, optimizer step; returns the detached loss."""
        with self.accelerator.accumulate(self.model):  # --grad-accum-steps: the step ends the window
            return self._update(x, y, stats)

    def _update(self, x: Tensor, y: Tensor, stats: Dict[str, Tensor]) -> Tensor:
        if self.graphs is not None and self.device_skip and self._stepped:  # --cuda-graphs: captured, replayed
            l2w = self.l2w
            meta_due = l2w is not None and l2w.step % l2w.meta_interval == 0
            result = self.graphs.run((x.data_ptr(), meta_due), lambda graphed: self._device_update(x, y, graphed),
                                     after=l2w.advance if l2w is not None else (lambda: None),
                                     reset=lambda: self._clear_grads())
        else:
            result = self._device_update(x, y, graphed=False)
        self._record(result, y.shape[0], stats)
        return result["loss"]

    def _device_update(self, x: Tensor, y: Tensor, graphed: bool) -> Dict[str, Any]:
        """Forward, (meta step,) weighted loss, backward, optimizer step. The values it returns stay on the
        device; with ``device_skip`` it reads nothing back (a non-finite update is skipped there), so a CUDA
        graph can record it (``graphed``: L2W leaves its counters to the graph runner)."""
        from .device_step import restore_unless, step_unless
        from .weighting import exit_losses, training_losses

        acc, model = self.accelerator, self.model
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kept = self._snapshot_buffers()  # BN running stats, restored if this update is skipped
        with acc.autocast():
            outputs = model(x)  # train mode: the tuple of every exit's logits (through DDP for gradient sync)
        if self.l2w is not None:
            self.l2w.host_bookkeeping = not graphed
            try:
                loss = self.l2w.loss(outputs, y)
            finally:
                self.l2w.host_bookkeeping = True
        else:
            loss = training_losses(outputs, y, distill=self.distill, criterion=self.criterion).mean(dim=0).sum()
        # whether L2W applied its meta update (False: non-finite meta loss or gradient, same on every rank)
        applied = self.l2w.last_meta_applied if self.l2w is not None and self.l2w.meta_step_ran else None
        _fault_point("update", self.step)
        finite = acc.gather(torch.isfinite(loss.detach()).reshape(1)).all()  # a device bool, alike on every rank
        skipped: Any = ~finite
        if self.device_skip and self._stepped:  # decided on the device: the fused step skips, buffers go back
            acc.backward(loss)
            if acc.sync_gradients:
                self._clip_gradients()
            step_unless(self.optimizer, ~finite)
            self.optimizer.zero_grad(set_to_none=True)
            restore_unless(self._buffer_groups, kept, finite)
        elif bool(finite):
            acc.backward(loss)  # fp16: accelerate's GradScaler scales the loss ... (and divides it by --grad-accum-steps)
            if acc.sync_gradients:
                self._clip_gradients()
            self.optimizer.step()  # ... and skips the step when the gradients overflowed (then lowers the scale);
            self.optimizer.zero_grad(set_to_none=True)  # both only at the end of an accumulation window
            if self.optimizer.step_was_skipped:
                self._restore_buffers(kept)
                skipped = 1
            else:
                self._stepped = self._stepped or acc.sync_gradients
                if self.ema is not None and acc.sync_gradients:
                    self.ema.update(acc.unwrap_model(model), step=self.updates_done + 1)
        else:  # skip this update everywhere; the model (BN statistics too) and optimizer states are untouched
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_buffers(kept)
        with torch.no_grad():
            per_exit = exit_losses([o.detach() for o in outputs], y, criterion=self.criterion)
            labels = y.argmax(dim=1) if y.ndim == 2 else y  # Mixup: the dominant class
            correct = torch.stack([o.detach().argmax(dim=1).eq(labels) for o in outputs], 1).sum(0).double()
        return {"loss": loss.detach(), "finite": finite, "skipped": skipped, "loss_sum": per_exit.sum(dim=0).double(),
                "correct": correct, "meta_applied": applied,
                "meta_loss": self.l2w.last_meta_loss_tensor if applied is not None else None}

    def _record(self, result: Dict[str, Any], seen: int, stats: Dict[str, Any]) -> None:
        """The host side of an update: counters, the epoch's running sums (device additions) and the stop
        after ``--max-nonfinite`` non-finite losses in a row, checked every ``max(1, max_nonfinite // 2)``
        updates when the update runs sync-free (every update otherwise)."""
        if self.accelerator.sync_gradients:
            self.updates_done += 1
        finite, applied = result["finite"], result["meta_applied"]
        stats["loss_sum"] += result["loss_sum"]
        stats["correct"] += result["correct"]
        stats["seen"] += seen
        stats["skipped"] += result["skipped"]
        bad = ~finite
        if applied is not None:
            stats["meta_skipped"] += ~applied
            stats["meta_sum"] += torch.where(applied, result["meta_loss"].double(), 0.0)
            stats["meta_count"] += applied
            bad = bad | ~applied
        limit = self.args.max_nonfinite
        self.nonfinite_run = (self.nonfinite_run + 1) * bad  # 0 after a finite update
        reached = (self.nonfinite_run == limit) & (torch.as_tensor(self._stop_kind) < 0)
        self._stop_kind = torch.where(reached, (~finite).long(), torch.as_tensor(self._stop_kind, device=bad.device))
        self._since_check += 1
        if self._since_check >= (max(1, limit // 2) if self.device_skip else 1):
            self._since_check = 0
            kind = int(self._stop_kind)
            if kind >= 0:
                latest = "the training loss" if kind == 1 else "the meta loss or meta gradient"
                raise TrainingStopped(
                    f"{limit} non-finite losses in a row (latest: {latest}) by step {self.step}: "
                    f"lower --lr (or --meta-lr), use --mixed-precision bf16/no, or check the data; "
                    f"raise --max-nonfinite to tolerate more", 3)

    def _clear_grads(self) -> None:
        """Drop every gradient of the model and the predictor (what a failed graph capture leaves is garbage)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.l2w is not None:
            self.l2w.meta_optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> None:
        """``--clip-grad`` on the real step, as timm's dispatch_clip_grad does it (after unscaling fp16)."""
        args, acc = self.args, self.accelerator
        if args.clip_grad is None:
            return
        if args.clip_mode == "norm":
            acc.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        elif args.clip_mode == "value":
            acc.clip_grad_value_(self.model.parameters(), args.clip_grad)
        else:
            from timm.utils import adaptive_clip_grad

            acc.unscale_gradients()
            adaptive_clip_grad(self.model.parameters(), args.clip_grad)

    def _snapshot_buffers(self) -> List[Tensor]:
        """The model's buffers, one flat copy per dtype (a few kernels, not one per BN layer)."""
        if not hasattr(self, "_buffer_groups"):
            groups: Dict[torch.dtype, List[Tensor]] = {}
            for b in self.accelerator.unwrap_model(self.model).buffers():
                groups.setdefault(b.dtype, []).append(b)
            self._buffer_groups = list(groups.values())
        return [torch.cat([b.detach().reshape(-1) for b in group]) for group in self._buffer_groups]

    def _restore_buffers(self, kept: List[Tensor]) -> None:
        with torch.no_grad():
            for group, flat in zip(self._buffer_groups, kept):
                offset = 0
                for b in group:
                    b.copy_(flat[offset: offset + b.numel()].view_as(b))
                    offset += b.numel()

    # -- epoch bookkeeping ---------------------------------------------------------------------
    def _flush_stats(self, stats: Dict[str, Any], device: torch.device) -> None:
        """Add this process's running sums into ``epoch_stats`` (all ranks summed)."""
        acc = self.accelerator
        k = self.num_exits
        local = torch.cat([stats["loss_sum"].to(device), stats["correct"].to(device),
                           torch.tensor([float(stats["seen"]), stats["meta_sum"], float(stats["meta_count"]),
                                         float(stats["skipped"]), float(stats["meta_skipped"])],
                                        dtype=torch.float64, device=device)])
        total = acc.reduce(local, reduction="sum").cpu()
        es = self.epoch_stats
        es["loss_sum"] = [a + float(b) for a, b in zip(es["loss_sum"], total[:k])]
        es["correct"] = [a + int(b) for a, b in zip(es["correct"], total[k:2 * k])]
        es["seen"] += int(total[2 * k])
        es["meta_sum"] += float(total[2 * k + 1])
        es["meta_count"] += int(total[2 * k + 2])
        # every rank skips the same updates (decided together): count each once
        es["skipped"] = es["skipped"] + int(total[2 * k + 3]) // acc.num_processes
        es["meta_skipped"] = es.get("meta_skipped", 0) + int(total[2 * k + 4]) // acc.num_processes

    def _new_stats(self, device: torch.device) -> Dict[str, Any]:
        k = self.num_exits
        return {"loss_sum": torch.zeros(k, dtype=torch.float64, device=device),
                "correct": torch.zeros(k, dtype=torch.float64, device=device),
                "seen": 0, "meta_sum": 0.0, "meta_count": 0, "skipped": 0, "meta_skipped": 0}

    def end_epoch(self, epoch: int) -> Dict[str, Any]:
        es = self.epoch_stats
        seen = max(es["seen"], 1)
        row: Dict[str, Any] = {"epoch": epoch + 1, "step": self.step, "updates": 2 * self.step,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "loss": sum(es["loss_sum"]) / seen,
                               "meta_loss": es["meta_sum"] / es["meta_count"] if es["meta_count"] else None,
                               "skipped_updates": es["skipped"], "skipped_meta_updates": es.get("meta_skipped", 0),
                               "time_s": round(es["time"], 3)}
        for k in range(self.num_exits):
            row[f"loss_{k + 1}"] = es["loss_sum"][k] / seen
            row[f"acc_{k + 1}"] = 100.0 * es["correct"][k] / seen
        self.history.append(row)
        self.epoch_stats = self._zero_stats()
        if self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.output / "log.json", self.history)
            write_text_atomic(self.output / "log.csv", csv_text(self.history))
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.step)
        return row


def _set_tf32(setting: str) -> None:
    """``--tf32``: TF32 for fp32 matmuls and cuDNN convolutions on or off (``default``: torch's own)."""
    if setting != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting == "on"


def _load_ema(path: Path, module: nn.Module) -> Dict[str, Tensor]:
    """The EMA weights of checkpoint ``path`` (a clear error when a --model-ema run's file is missing)."""
    from .checkpoint import check_state_dict, load_state_dict
    from .validation import ResumeError

    file = path / EMA_FILE
    if not file.is_file():
        raise ResumeError(path, f"it has no {EMA_FILE} (it was written without --model-ema)",
                          fix="resume it without --model-ema, or start a fresh --output")
    state = load_state_dict(file)
    check_state_dict(module, state)
    return state


def _kwargs_meta(args: argparse.Namespace, model: Optional[nn.Module] = None) -> Dict[str, str]:
    """``--model-kwargs`` for a checkpoint's metadata (``timm-l2w eval`` rebuilds the model from it); a wrapped
    timm backbone records its own (``model=multi_exit_l2w``, backbone, exit points, head, timm arguments)."""
    rebuild = getattr(model, "checkpoint_metadata", None)
    if callable(rebuild) and "model_kwargs" in rebuild():
        return rebuild()
    return {"model_kwargs": json.dumps(args.model_kwargs)} if args.model_kwargs else {}


def _data_meta(args: argparse.Namespace) -> Dict[str, str]:
    """What ``timm-l2w eval`` needs to evaluate a checkpoint on the data it was trained on."""
    meta = {"dataset": str(args.dataset), "input_size": str(args.input_size)}
    if args.data_dir:
        meta["data_dir"] = str(args.data_dir)
    if args.held_out is not None:
        meta["held_out"] = str(args.held_out)
    return meta


def _class_names_meta(splits: Any) -> Dict[str, str]:
    """The data set's class names (a JSON list) for a checkpoint's metadata (exit policies and exports read them)."""
    names = getattr(splits, "class_names", None)
    return {"class_names": json.dumps(list(names))} if names else {}


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
        return {"history": run.history, "step": run.step, "output": str(run.output), "complete": True,
                "model": acc.unwrap_model(run.model), "weight_net": run.l2w.weight_net if run.l2w is not None else None}
    if acc.is_main_process and run.ckpt_root.is_dir():  # leftovers of a run killed while (de)saving
        for leftover in list(run.ckpt_root.glob(".tmp-*")) + list(run.ckpt_root.glob(".old-*")):
            shutil.rmtree(leftover, ignore_errors=True)
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
            if done:  # resumed inside an epoch (timm_l2w.device_data's loader skips on its own)
                skip = getattr(loader, "skip_first_batches", None)
                loader = skip(done) if skip is not None else acc.skip_first_batches(loader, done)
            # the data order depends only on (seed, epoch); accelerate's loaders re-apply their own
            # epoch counter to the sampler when iterated, so set it on the loader being iterated
            loader.set_epoch(epoch)
            bar = tqdm(total=steps_here, initial=done, desc=f"epoch {epoch + 1}/{run.num_epochs}",
                       disable=not show, leave=False, dynamic_ncols=True)
            stats = run._new_stats(device)
            t0 = shown_at = time.perf_counter()
            for x, y in loader:
                if run.mixup is not None:  # the whole loader batch, before it is split (soft targets on both halves)
                    x, y = run.mixup(x, y)
                if run.graphs is not None:  # --cuda-graphs: the batch in the static buffers the graphs read
                    x, y = run.graphs.stage(x, y)
                halves = run.l2w.split(x, y) if run.l2w is not None else _halves(x, y)
                for xt, yt in halves:
                    loss = run.update(xt, yt, stats)
                    run.scheduler.step_update(num_updates=run.updates_done)
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
                    run.epoch_stats["time"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    run._flush_stats(stats, device)
                    stats = run._new_stats(device)
                    _maybe_stop(run, run.save_checkpoint(), stop, pause)
                if run.step >= run.total_steps:
                    break
            bar.close()
            run.epoch_stats["time"] += time.perf_counter() - t0
            run._flush_stats(stats, device)
            row = run.end_epoch(epoch)
            _fault_point("epoch_end", run.step)
            path = run.save_checkpoint()
            if acc.is_main_process:  # the per-epoch summary stays with --no-progress
                meta = f" meta {row['meta_loss']:.4f}" if row["meta_loss"] is not None else ""
                print(f"epoch {row['epoch']}: loss {row['loss']:.4f} (sum over the {run.num_exits} exits){meta} last-exit acc "
                      f"{row[f'acc_{run.num_exits}']:.1f}% lr {row['lr']:.4g} ({row['time_s']:.1f}s)", flush=True)
            _maybe_stop(run, path, stop, pause)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    result: Dict[str, Any] = {"history": run.history, "step": run.step, "output": str(run.output)}
    model = acc.unwrap_model(run.model)
    if acc.is_main_process:
        meta = {"model": args.model, **_kwargs_meta(args, model), "num_classes": str(run.splits.num_classes),
                "num_exits": str(run.num_exits), **_class_names_meta(run.splits), **_data_meta(args)}
        _save_tensors(model.state_dict(), run.output / "model.safetensors", meta)  # atomic
        if run.l2w is not None:
            _save_tensors(run.l2w.weight_net.state_dict(), run.output / "weight_predictor.safetensors",
                          {"num_exits": str(run.num_exits), "input_type": args.input_type, "hidden": str(args.hidden)})
        if run.ema is not None:
            _save_tensors(run.ema.module.state_dict(), run.output / EMA_FILE, meta)
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
    found = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(p)) if root.is_dir() else []
    if found:
        raise ValueError(
            f"--output {output} holds another run (checkpoints up to step {int(found[-1].name[len(CHECKPOINT_PREFIX):])}): "
            f"continue it with --resume auto, start over with --overwrite (deletes its checkpoints, logs and "
            f"weights), or pass a fresh --output")


def _clear_run(output: Path) -> None:
    """--overwrite: delete the previous run's files (:func:`_run_files`), checkpoints first."""
    for path in _run_files(output):
        if path.is_dir():
            _discard(path)
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

"""``timm-l2w train``: train a multi-exit model with L2W or equal weighting, built on accelerate.

One process or many (``accelerate launch -m timm_l2w.cli.train ...``), mixed precision, progress bars,
per-epoch CSV/JSON logs, atomic checkpoints with exact resume, and anytime + budgeted evaluation at the end.

This module is the command: its flags (:func:`build_parser`, with the paper's settings as ``--preset``),
:func:`main` and what it prints. The run itself is :func:`timm_l2w.training.loop.train`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from ..training.loop import train
from ..training.stops import TrainingStopped
from .common import DefaultsHelpFormatter, add_device, add_input_size, add_version

__all__ = ["PRESETS", "build_parser", "parse_args", "main"]

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
    g.add_argument("--pretrained-path", default=None, help="initial weights to fine-tune from: .safetensors, .pth, or "
                   "a timm training checkpoint (.pth.tar of timm's train.py: model from its arch / args, weights from "
                   "its state_dict); only the exit classifiers may differ (another number of classes), they start "
                   "fresh")
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
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many loader batches (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch; each rank gets batch/world_size")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine schedule)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine schedule")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of SGD-type optimizers (--opt)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, in updates")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of the warmup")
    g.add_argument("--label-smoothing", type=float, default=None,
                   help=_preset_help("label smoothing", "label_smoothing"))
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
    g.add_argument("--meta-interval", type=int, default=None,
                   help=_preset_help("meta step every N updates", "meta_interval"))
    g.add_argument("--meta-lr", type=float, default=None,
                   help=_preset_help("Adam lr of the weight predictor", "meta_lr"))
    g.add_argument("--meta-weight-decay", type=float, default=None,
                   help=_preset_help("Adam weight decay of the weight predictor", "meta_weight_decay"))
    g.add_argument("--hidden", type=int, default=None,
                   help=_preset_help("hidden size of the weight predictor", "hidden"))
    g.add_argument("--backend", choices=["auto", "higher", "func"], default="auto",
                   help="virtual-step backend (auto: higher, or func where the model lacks second derivatives)")
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

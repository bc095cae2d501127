"""``timm-l2w eval``: anytime and budgeted evaluation of a checkpoint, with plot and, on request, the exit policy.

The model, its arguments and the data default to what the checkpoint's metadata records (as
``timm-l2w train`` writes it, or a timm training checkpoint's ``arch`` / ``args``); ImageFolder data is prepared
as timm's ``validate.py`` prepares it (the model's data config). The work is
:func:`timm_l2w.evaluation.evaluate_checkpoint` and :func:`timm_l2w.inference.policy.eval_policy_file`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from timm_l2w_runtime.policy import INTERPOLATIONS

from ..evaluation.results import evaluate_checkpoint
from ..evaluation.risk import RISKS
from ..exits import EXIT_RULES
from ..validation import EVAL_SETTINGS, check_settings
from .common import DefaultsHelpFormatter, add_device, add_input_size, add_version, flops_amount

__all__ = ["main", "model_from_metadata"]


def _parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog="timm-l2w eval",
        description="Anytime and budgeted (accuracy vs average FLOPs) evaluation of a multi-exit checkpoint.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_version(p)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=".safetensors (or .pth) weights, or a timm training checkpoint (.pth.tar of timm's train.py: "
                        "model, arguments and classes from its arch / args); omit for random init")
    p.add_argument("--use-ema", action="store_true",
                   help="evaluate the EMA weights of a timm checkpoint (its state_dict_ema), as validate.py --use-ema")
    p.add_argument("--model", default=None, help="timm model name (default: the one recorded in the checkpoint's "
                                                 "metadata, as timm-l2w train writes it)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra timm.create_model arguments (default: those recorded in the checkpoint's metadata)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model head (default: the checkpoint's metadata, else the data set's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: 3)")
    p.add_argument("--dataset", default=None, help="data set, as timm-l2w train takes it (default: the one the "
                   "checkpoint records, as timm-l2w train writes it; else digits)")
    p.add_argument("--data-dir", default=None, help="root folder of the data set files (default: the one the "
                   "checkpoint records with its data set)")
    add_input_size(p, None, "square input side of the model (default: the one the checkpoint records, else 32; "
                            "ImageFolder data: else the model's data config)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="ImageFolder data: centre crop share (default: the checkpoint's record, else the model's data "
                        "config, as timm's validate.py)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="ImageFolder data: resize interpolation (default: the checkpoint's record, else the model's "
                        "data config)")
    p.add_argument("--held-out", type=int, default=None,
                   help="held-out images for the thresholds (default: the data set's)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    add_device(p, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--exit-rule", choices=EXIT_RULES, default="confidence",
                   help="budgeted exit rule: confidence (max softmax >= threshold), entropy (entropy <= threshold; "
                        "both calibrated on the held-out set for the paper's 39 exit distributions) or patience "
                        "(the prediction unchanged at p consecutive exits; one budget per p = 1..K)")
    p.add_argument("--output", default="eval_results", help="folder for the CSV/JSON tables and the plot")
    p.add_argument("--name", default=None, help="file name stem and curve label (default: the model name)")
    p.add_argument("--q", type=float, default=None,
                   help="also write <name>_<rule>_q<Q>_policy.json, the exit policy for timm-l2w export (it records "
                        "the digest of the checkpoint's weights): thresholds calibrated on "
                        "the held-out set for the paper's exit distribution p_k ∝ q**k")
    p.add_argument("--flops-budget", type=flops_amount, default=None, metavar="FLOPS",
                   help="also write <name>_<rule>_flops<F>_policy.json (e.g. _flops3M_) for the most accurate exit "
                        "distribution (patience: patience "
                        "value) whose expected FLOPs per image on the held-out set stay within this budget. In "
                        "FLOPs per image: 3000000, 3e6 and 3M are the same budget (suffixes k, M, G); the tables "
                        "this command prints are in MFLOPs, so a row's '3.5 MFLOPs' is --flops-budget 3.5M")
    p.add_argument("--max-risk", type=float, default=None, metavar="EPS",
                   help="also write <name>_<rule>_<risk>_<EPS>_conf<1-DELTA>_policy.json for the cheapest policy "
                        "(lowest expected FLOPs) whose --risk is at most EPS (a fraction: 0.05 is 5%%) with "
                        "probability at least --confidence: an upper "
                        "confidence bound on the held-out split, tested from the most expensive policy down "
                        "(Learn then Test; assumptions and equations in docs/risk.md)")
    p.add_argument("--confidence", type=float, default=None, metavar="1-DELTA",
                   help="with --max-risk: the probability, over the draw of the held-out set, that the risk on new "
                        "data of the same distribution is within EPS (default 0.9)")
    p.add_argument("--risk", choices=RISKS, default=None,
                   help="with --max-risk: disagreement (the early prediction differs from the last exit's; needs no "
                        "labels) or top1-drop (early-exit errors minus last-exit errors, per image) (default "
                        "disagreement)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a policy file of the same name (default: refuse, before evaluating)")
    latency = p.add_argument_group("latency budgets (docs/deploy.md, 'Latency budgets')")
    latency.add_argument("--latency-budget", type=float, default=None, metavar="MS",
                         help="also write <name>_<rule>_latency<MS>ms_batch<B>_policy.json for the most accurate "
                              "exit distribution (patience: patience value) whose expected milliseconds per image "
                              "at --latency-batch-size stay within MS, from a table of every stage's time on the "
                              "target; the budgeted tables get expected_ms columns and the policy carries the table")
    latency.add_argument("--latency-batch-size", type=int, default=1, metavar="B",
                         help="the deployment batch size the budget is for (images per predict call)")
    latency.add_argument("--latency-target", choices=("torch", "onnx"), default="torch",
                         help="where the stages are timed, on this machine: torch (EarlyExitPredictor in eager "
                              "PyTorch on --device) or onnx (the exported package in onnxruntime, CPU)")
    latency.add_argument("--latency-table", default=None, metavar="FILE",
                         help="a latency table measured elsewhere instead (on the deployment machine: "
                              "timm-l2w-predict DIR --measure-latency --latency-output FILE)")
    latency.add_argument("--latency-repeats", type=int, default=10,
                         help="timed runs per stage, batch size and round (default: 10)")
    latency.add_argument("--latency-rounds", type=int, default=3,
                         help="rounds over every batch size, one after another; the table holds the slowest "
                              "round's medians, so the budget holds when the machine is as slow as it was seen to "
                              "be while measuring (default: 3)")
    latency.add_argument("--latency-threads", type=int, default=None,
                         help="CPU threads while timing (torch: torch.set_num_threads; onnx: onnxruntime intra-op "
                              "threads; default: the library's)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (it is off anyway when stderr is not a terminal)")
    return p


def model_from_metadata(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    """The model name and ``create_model`` arguments: the flags, else the checkpoint's metadata."""
    from ..checkpoint import recorded_model
    from ..files import read_metadata

    meta = read_metadata(args.checkpoint) if args.checkpoint else {}
    name = recorded_model(args.checkpoint, args.model) if args.checkpoint else args.model
    if not name:
        if args.checkpoint:
            from ..files import load_state_dict

            load_state_dict(args.checkpoint)  # a file that cannot be read: say that first
        raise ValueError("pass --model NAME: the checkpoint records no model name (a timm-l2w file's metadata or a "
                         "timm checkpoint's arch / args)" if args.checkpoint
                         else "pass --model NAME (or a checkpoint written by timm-l2w)")
    kwargs = dict(args.model_kwargs)
    if not kwargs and meta.get("model_kwargs"):
        kwargs = json.loads(meta["model_kwargs"])
    if args.num_classes is None and str(meta.get("num_classes", "")).isdigit():
        kwargs.setdefault("num_classes", int(meta["num_classes"]))
    return name, kwargs


def _data_from_metadata(args: argparse.Namespace) -> None:
    """``--dataset``, ``--data-dir``, ``--input-size``, ``--in-chans`` and ``--held-out`` left unset: the data the
    checkpoint records (``timm-l2w train`` writes it); a data set not given and not recorded is digits, said aloud.
    An ImageFolder's input size not given and not recorded is left to its data config (:func:`_folder_config`)."""
    from ..data import is_image_folder
    from ..files import read_metadata

    meta = read_metadata(args.checkpoint) if args.checkpoint else {}
    recorded = args.dataset is None and "dataset" in meta
    if recorded:
        args.dataset = meta["dataset"]
        if args.data_dir is None:
            args.data_dir = meta.get("data_dir")
        if args.held_out is None and str(meta.get("held_out", "")).isdigit():
            args.held_out = int(meta["held_out"])
    if args.in_chans is None and str(meta.get("in_chans", "")).isdigit():
        args.in_chans = int(meta["in_chans"])
    if args.dataset is None:
        args.dataset = "digits"
        print("timm-l2w eval: no --dataset given" + (f" and {args.checkpoint} records none" if args.checkpoint else "")
              + ": evaluating on digits (pass --dataset NAME for another)", flush=True)
    if args.input_size is None and str(meta.get("input_size", "")).isdigit():
        args.input_size = int(meta["input_size"])
    elif args.input_size is None and not is_image_folder(args.dataset, args.data_dir):
        args.input_size = 32
    if recorded:
        where = f" in {args.data_dir}" if args.data_dir else ""
        size = f", {args.input_size}x{args.input_size} images" if args.input_size else ""
        print(f"timm-l2w eval: data set {args.dataset}{where}{size} "
              f"(recorded in {args.checkpoint}; --dataset / --data-dir / --input-size choose others)", flush=True)


def unknown_model_error(name: str, timm: Any) -> ValueError:
    """The error for a model name timm does not know, listing the registered multi-exit models (eval, export)."""
    return ValueError(f"unknown model '{name}': choose a registered multi-exit model "
                      f"({', '.join(timm.list_models('*l2w*'))})")


def _folder_config(args: argparse.Namespace, model_name: str, kwargs: Mapping[str, Any],
                   timm: Any) -> Optional[Dict[str, Any]]:
    """An ImageFolder's eval preprocessing, resolved as timm's ``validate.py`` resolves it
    (``resolve_data_config`` at the test size): ``--input-size`` / ``--crop-pct`` / ``--interpolation``, else what
    the checkpoint records (the recipe ``timm-l2w train`` used; a timm checkpoint's arguments), else the model's
    data config. ``None`` for the built-in data sets, whose preprocessing is fixed."""
    from timm.data import resolve_data_config

    from ..data import is_image_folder
    from ..files import PREPROCESS_KEYS, read_metadata

    if not is_image_folder(args.dataset, args.data_dir):
        if args.crop_pct is not None or args.interpolation is not None:
            raise ValueError(f"--crop-pct / --interpolation set the preprocessing of ImageFolder data; {args.dataset} "
                             "has its own fixed one: drop them")
        return None
    meta = read_metadata(args.checkpoint) if args.checkpoint else {}
    wanted: Dict[str, Any] = {k: meta[k] if k == "interpolation" else json.loads(meta[k])
                              for k in PREPROCESS_KEYS if meta.get(k)}
    wanted.update({k: v for k, v in (("crop_pct", args.crop_pct), ("interpolation", args.interpolation)) if v})
    if args.input_size:
        wanted["input_size"] = (3, args.input_size, args.input_size)
    if not timm.is_model(model_name):
        raise unknown_model_error(model_name, timm)
    try:
        with torch.device("meta"):  # only its pretrained_cfg is read: no memory, no initialisation
            probe = timm.create_model(model_name, **kwargs)
    except (RuntimeError, NotImplementedError):  # an __init__ that reads tensor values needs real ones
        probe = timm.create_model(model_name, **kwargs)
    config = resolve_data_config(wanted, model=probe, use_test_size=True)
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"{model_name}'s data config has a {height}x{width} input: pass a square --input-size N")
    args.input_size = int(height)
    source = "the checkpoint's record" if any(k in meta for k in PREPROCESS_KEYS) else "the model's data config"
    print(f"timm-l2w eval: ImageFolder images at {height}x{width}: centre crop {config['crop_pct']:g} of the shorter "
          f"side, {config['interpolation']} resize, mean {tuple(config['mean'])}, std {tuple(config['std'])} "
          f"(flags, else {source}, as timm's validate.py; --crop-pct / --interpolation / --input-size choose others)",
          flush=True)
    return config


def _check_classes(model_classes: Optional[int], info: Mapping[str, Any], dataset: str) -> None:
    """A data set with more classes than the model's heads has labels they cannot score: say which data to pass."""
    data_classes = info.get("num_classes")
    if model_classes and data_classes and int(data_classes) > int(model_classes):
        raise ValueError(f"the data set {dataset} has {data_classes} classes but the model only {model_classes}: "
                         f"pass the --dataset (and --data-dir) the checkpoint was trained on")


def main(argv: Optional[List[str]] = None) -> int:
    """``timm-l2w eval``: writes ``<name>_anytime.csv``, ``<name>_budgeted.csv``, ``<name>.json``, ``<name>.png``."""
    import timm

    args = _parser().parse_args(argv)
    try:
        return _run(args, timm)
    except (ValueError, OSError, TypeError, RuntimeError) as err:  # bad input: a message, not a traceback
        print(f"timm-l2w eval: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, timm: Any) -> int:
    import timm_l2w  # noqa: F401  (registers the models)

    from ..data import create_eval_loaders

    check_settings(args, EVAL_SETTINGS)  # numbers in range before any data or model is built
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"no such file: {args.checkpoint}: pass the path of a .safetensors (or .pth) "
                                f"checkpoint, e.g. OUTPUT/model.safetensors of timm-l2w train"
                                + (" (that is a folder)" if Path(args.checkpoint).is_dir() else ""))
    model_name, kwargs = model_from_metadata(args)  # before the data: a wrong --model is the first thing to say
    _data_from_metadata(args)
    folder_config = _folder_config(args, model_name, kwargs, timm)  # ImageFolder data: timm's eval preprocessing
    if any(v is not None for v in (args.q, args.flops_budget, args.max_risk, args.confidence, args.risk,
                                   args.latency_budget)):
        from ..inference.policy import check_policy_request, eval_policy_path

        check_policy_request(args.q, args.flops_budget, args.exit_rule, args.max_risk, args.confidence, args.risk,
                             latency_budget=args.latency_budget)
        eval_policy_path(args, args.name or model_name)  # an existing policy: refused before the work
    if args.latency_table is not None:  # a table from elsewhere: readable before any work
        from timm_l2w_runtime.latency import read_latency_table

        if args.latency_budget is None:
            raise ValueError("--latency-table is the table of a latency budget: pass --latency-budget MS with it")
        read_latency_table(args.latency_table)
    heldout_loader, test_loader, info = create_eval_loaders(
        args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, input_size=args.input_size,
        in_chans=args.in_chans or 3, held_out=args.held_out, eval_config=folder_config,
    )
    num_classes = args.num_classes or kwargs.pop("num_classes", None) or info.get("num_classes")
    _check_classes(num_classes, info, args.dataset)
    in_chans = args.in_chans or info.get("in_chans")
    if num_classes:
        kwargs["num_classes"] = num_classes
    if in_chans:
        kwargs["in_chans"] = in_chans
    try:
        model = timm.create_model(model_name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise unknown_model_error(model_name, timm) from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.name or model_name
    print(f"timm-l2w eval: {model_name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())}) on {args.dataset}",
          flush=True)
    result = evaluate_checkpoint(
        model, heldout_loader, test_loader, checkpoint=args.checkpoint, out_dir=args.output, name=name,
        device=device, progress=not args.no_progress and sys.stderr.isatty(), input_size=tuple(info["input_size"]),
        exit_rule=args.exit_rule, use_ema=args.use_ema,
    )
    for row in result["anytime"]:
        print(f"exit {row['exit']}: top1 {row['top1']:.2f}%  top5 {row['top5']:.2f}%  "
              f"loss {row['loss']:.4f}  {row['flops'] / 1e6:.2f} MFLOPs")
    best = max(result["budgeted"].rows(), key=lambda r: r["test_top1"])
    print(f"budgeted: best test top1 {best['test_top1']:.2f}% at {best['expected_flops'] / 1e6:.2f} MFLOPs "
          f"(exit rule: {args.exit_rule})")
    if args.latency_budget is not None:  # the latency table: expected ms beside the FLOPs, and the policy's
        from ..deploy.latency import eval_latency_table

        eval_latency_table(args, model, result, tuple(info["input_size"]), name)
    if any(v is not None for v in (args.q, args.flops_budget, args.max_risk, args.latency_budget)):  # the policy
        from ..inference.policy import eval_policy_file

        result["files"]["policy"] = eval_policy_file(args, model, result, test_loader, info, name)
    for kind, path in result["files"].items():
        print(f"wrote {kind}: {path}")
    return 0

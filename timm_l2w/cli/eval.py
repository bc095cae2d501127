"""``timm-l2w eval``: anytime and budgeted evaluation of a checkpoint, with plot and, on request, the exit policy.

The model, its arguments and the data default to what the checkpoint's metadata records (as
``timm-l2w train`` writes it); the work is :func:`timm_l2w.evaluation.evaluate_checkpoint` and
:func:`timm_l2w.inference.policy.eval_policy_file`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..evaluation.results import evaluate_checkpoint
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
    p.add_argument("checkpoint", nargs="?", default=None, help=".safetensors (or .pth) weights; omit for random init")
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
    add_input_size(p, None, "square input side of the model (default: the one the checkpoint records, else 32)")
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
                   help="also write <name>_policy.json, the exit policy for timm-l2w export: thresholds calibrated on "
                        "the held-out set for the paper's exit distribution p_k ∝ q**k")
    p.add_argument("--flops-budget", type=flops_amount, default=None, metavar="FLOPS",
                   help="also write <name>_policy.json for the most accurate exit distribution (patience: patience "
                        "value) whose expected FLOPs per image on the held-out set stay within this budget. In "
                        "FLOPs per image: 3000000, 3e6 and 3M are the same budget (suffixes k, M, G); the tables "
                        "this command prints are in MFLOPs, so a row's '3.5 MFLOPs' is --flops-budget 3.5M")
    latency = p.add_argument_group("latency budgets (docs/deploy.md, 'Latency budgets')")
    latency.add_argument("--latency-budget", type=float, default=None, metavar="MS",
                         help="also write <name>_policy.json for the most accurate exit distribution (patience: "
                              "patience value) whose expected milliseconds per image at --latency-batch-size stay "
                              "within MS, from a table of every stage's time on the target; the budgeted tables "
                              "get expected_ms columns and the policy carries the table")
    latency.add_argument("--latency-batch-size", type=int, default=1, metavar="B",
                         help="the deployment batch size the budget is for (images per predict call)")
    latency.add_argument("--latency-target", choices=("torch", "onnx"), default="torch",
                         help="where the stages are timed, on this machine: torch (EarlyExitPredictor in eager "
                              "PyTorch on --device) or onnx (the exported package in onnxruntime, CPU)")
    latency.add_argument("--latency-table", default=None, metavar="FILE",
                         help="a latency table measured elsewhere instead (on the deployment machine: "
                              "timm-l2w-predict DIR --measure-latency --latency-output FILE)")
    latency.add_argument("--latency-repeats", type=int, default=20,
                         help="timed runs per stage and batch size (the table holds their medians)")
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
        raise ValueError("pass --model NAME: the checkpoint records no model name"
                         if args.checkpoint else "pass --model NAME (or a checkpoint written by timm-l2w)")
    kwargs = dict(args.model_kwargs)
    if not kwargs and meta.get("model_kwargs"):
        kwargs = json.loads(meta["model_kwargs"])
    if args.num_classes is None and str(meta.get("num_classes", "")).isdigit():
        kwargs.setdefault("num_classes", int(meta["num_classes"]))
    return name, kwargs


def _data_from_metadata(args: argparse.Namespace) -> None:
    """``--dataset``, ``--data-dir``, ``--input-size`` and ``--held-out`` left unset: the data the checkpoint
    records (``timm-l2w train`` writes it); a data set not given and not recorded is digits, said aloud."""
    from ..files import read_metadata

    meta = read_metadata(args.checkpoint) if args.checkpoint else {}
    recorded = args.dataset is None and "dataset" in meta
    if recorded:
        args.dataset = meta["dataset"]
        if args.data_dir is None:
            args.data_dir = meta.get("data_dir")
        if args.held_out is None and str(meta.get("held_out", "")).isdigit():
            args.held_out = int(meta["held_out"])
    if args.input_size is None:
        args.input_size = int(meta["input_size"]) if str(meta.get("input_size", "")).isdigit() else 32
    if args.dataset is None:
        args.dataset = "digits"
        print("timm-l2w eval: no --dataset given" + (f" and {args.checkpoint} records none" if args.checkpoint else "")
              + ": evaluating on digits (pass --dataset NAME for another)", flush=True)
    elif recorded:
        where = f" in {args.data_dir}" if args.data_dir else ""
        print(f"timm-l2w eval: data set {args.dataset}{where}, {args.input_size}x{args.input_size} images "
              f"(recorded in {args.checkpoint}; --dataset / --data-dir / --input-size choose others)", flush=True)


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
    if args.q is not None or args.flops_budget is not None or args.latency_budget is not None:
        from ..inference.policy import check_policy_request

        check_policy_request(args.q, args.flops_budget, args.exit_rule, args.latency_budget)
    if args.latency_table is not None:  # a table from elsewhere: readable before any work
        from timm_l2w_runtime.latency import read_latency_table

        if args.latency_budget is None:
            raise ValueError("--latency-table is the table of a latency budget: pass --latency-budget MS with it")
        read_latency_table(args.latency_table)
    heldout_loader, test_loader, info = create_eval_loaders(
        args.dataset, data_dir=args.data_dir, batch_size=args.batch_size, input_size=args.input_size,
        in_chans=args.in_chans or 3, held_out=args.held_out,
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
        raise ValueError(f"unknown model '{model_name}': choose a registered multi-exit model "
                         f"({', '.join(timm.list_models('*l2w*'))})") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.name or model_name
    print(f"timm-l2w eval: {model_name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())}) on {args.dataset}",
          flush=True)
    result = evaluate_checkpoint(
        model, heldout_loader, test_loader, checkpoint=args.checkpoint, out_dir=args.output, name=name,
        device=device, progress=not args.no_progress and sys.stderr.isatty(), input_size=tuple(info["input_size"]),
        exit_rule=args.exit_rule,
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
    if args.q is not None or args.flops_budget is not None or args.latency_budget is not None:
        from ..inference.policy import eval_policy_file

        result["files"]["policy"] = eval_policy_file(args, model, result, test_loader, info, name)
    for kind, path in result["files"].items():
        print(f"wrote {kind}: {path}")
    return 0

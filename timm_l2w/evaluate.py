"""Anytime and budgeted evaluation of a multi-exit model (docs/method.md §6).

The exit outputs of a loader are collected once (:func:`collect_exit_outputs`); anytime metrics
(:func:`anytime_metrics`) and the budgeted accuracy-vs-FLOPs curve (:func:`budgeted_evaluation`)
are then pure tensor computations on them. Thresholds come from
:func:`timm_l2w.exits.calibrate_thresholds_batch` on a held-out set and are applied on the test set
with :func:`timm_l2w.exits.exit_by_threshold`, the same code the L2W meta loss builds on.

``timm-l2w eval`` (:func:`main`) runs it on a checkpoint and writes CSV, JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .exits import (
    EXIT_RULES,
    calibrate_entropy_thresholds_batch,
    calibrate_thresholds_batch,
    check_distributions,
    check_exit_rule,
    exit_by_entropy,
    exit_by_patience,
    exit_by_threshold,
    paper_distributions,
    paper_qs,
    predictive_entropy,
)
from .files import csv_text, write_text_atomic
from .models.base import check_multi_exit_output, unwrap_model
from .state_checks import check_weights
from .validation import EVAL_SETTINGS, check_labels, check_settings

__all__ = [
    "ExitOutputs",
    "BudgetedResults",
    "exit_confidence",
    "collect_exit_outputs",
    "anytime_metrics",
    "budgeted_evaluation",
    "check_flops",
    "check_flops_input_size",
    "save_results",
    "evaluate_checkpoint",
    "main",
]


def exit_confidence(logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Max softmax probability (float32) and predicted class of one exit's ``[B, C]`` logits."""
    return F.softmax(logits.detach().float(), dim=1).max(dim=1)


@dataclass
class ExitOutputs:
    """Everything evaluation needs from one pass over a data set, per sample ``i`` and exit ``k``.

    ``confidences`` [N, K] float (max softmax), ``predictions`` [N, K] long, ``top5`` [N, K] bool
    (target among the 5 highest logits), ``losses`` [N, K] float (cross-entropy), ``targets`` [N] long;
    ``input_size`` (C, H, W) of the images when known (set by :func:`collect_exit_outputs`);
    ``entropies`` [N, K] float (predictive entropy, for the ``'entropy'`` exit rule) when known.
    """

    confidences: Tensor
    predictions: Tensor
    top5: Tensor
    losses: Tensor
    targets: Tensor
    input_size: Optional[Tuple[int, ...]] = None
    entropies: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)
        if not isinstance(self.confidences, Tensor) or self.confidences.ndim != 2:
            raise ValueError("ExitOutputs.confidences must be a [num_samples, num_exits] tensor")
        n, k = self.confidences.shape
        if n == 0:
            raise ValueError("ExitOutputs is empty: the loader gave no samples, check the data set")
        for name in ("predictions", "top5", "losses", "entropies"):
            if getattr(self, name) is not None and tuple(getattr(self, name).shape) != (n, k):
                raise ValueError(f"ExitOutputs.{name} has shape {tuple(getattr(self, name).shape)}, expected {(n, k)}")
        if tuple(self.targets.shape) != (n,):
            raise ValueError(f"ExitOutputs.targets has shape {tuple(self.targets.shape)}, expected {(n,)}")
        self.targets = check_labels(self.targets, batch=n, name="ExitOutputs.targets")

    @property
    def num_samples(self) -> int:
        return self.confidences.shape[0]

    @property
    def num_exits(self) -> int:
        return self.confidences.shape[1]

    @property
    def correct(self) -> Tensor:
        """[N, K] bool: top-1 prediction of exit k is right for sample i."""
        return self.predictions == self.targets[:, None]

    @classmethod
    def from_logits(cls, logits: Sequence[Tensor], targets: Tensor) -> "ExitOutputs":
        """Build from all K exit logits ``[B, C]`` (``model.forward_exits(x)``) and ``[B]`` integer targets."""
        logits = check_multi_exit_output(logits)
        batch, num_classes = logits[0].shape[0], logits[0].shape[-1]
        targets = check_labels(targets, num_classes, batch, "targets").to(logits[0].device)
        conf, pred, top5, loss, ent = [], [], [], [], []
        for out in logits:
            out = out.detach().float()
            c, p = exit_confidence(out)
            conf.append(c)
            pred.append(p)
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            top5.append((top == targets[:, None]).any(dim=1))
            loss.append(F.cross_entropy(out, targets, reduction="none"))
            ent.append(predictive_entropy(out))
        conf, pred, top5, loss, ent = (torch.stack(v, dim=1).cpu() for v in (conf, pred, top5, loss, ent))
        return cls(conf, pred, top5, loss, targets.cpu(), entropies=ent)

    @classmethod
    def cat(cls, parts: Sequence["ExitOutputs"]) -> "ExitOutputs":
        """Concatenate along the samples."""
        if not parts:
            raise ValueError("no ExitOutputs to concatenate: the loader gave no batches")
        fields = ("confidences", "predictions", "top5", "losses", "targets")
        sizes = {p.input_size for p in parts}
        with_entropy = all(p.entropies is not None for p in parts)
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in fields),
                   input_size=sizes.pop() if len(sizes) == 1 else None,
                   entropies=torch.cat([p.entropies for p in parts]) if with_entropy else None)


def _batch_xy(batch: Any) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        batch = (batch.get("image", batch.get("pixel_values")), batch.get("label", batch.get("target")))
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("the loader must yield (images, targets) pairs")
    return batch[0], batch[1]


def collect_exit_outputs(
    model: nn.Module, loader: Iterable, device: Optional[torch.device | str] = None, progress: bool = False
) -> ExitOutputs:
    """Run ``model`` (eval mode, inference mode) over ``loader`` once and keep every exit's outputs.

    The exits come from ``forward_exits`` of the unwrapped model (``model(x)`` in eval mode gives only
    the last exit); the model's train/eval mode is restored afterwards.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    net = unwrap_model(model)
    num_exits = getattr(net, "num_exits", None)
    forward_exits = getattr(net, "forward_exits", model)
    parts = []
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    try:
        with torch.inference_mode():
            for batch in loader:
                x, y = _batch_xy(batch)
                outputs = check_multi_exit_output(forward_exits(x.to(device)), num_exits)
                part = ExitOutputs.from_logits(outputs, y.to(device))
                part.input_size = tuple(x.shape[1:])
                parts.append(part)
    finally:
        model.train(was_training)
    return ExitOutputs.cat(parts)


def check_flops(flops: Sequence[float] | Tensor, num_exits: int) -> Tensor:
    """Return per-exit cumulative FLOPs as float64 ``[K]`` after checking length and order."""
    f = torch.as_tensor(flops, dtype=torch.float64).detach().cpu()
    if f.ndim != 1 or f.numel() != num_exits:
        raise ValueError(
            f"flops must have one cumulative value per exit ({num_exits}), got shape {tuple(f.shape)}: "
            "use timm_l2w.exit_flops(model, input_size)"
        )
    if not torch.isfinite(f).all() or (f <= 0).any() or (f[1:] <= f[:-1]).any():
        raise ValueError(
            f"flops must be positive and strictly increasing (cumulative to each exit), got {f.tolist()}"
        )
    return f


def check_flops_input_size(flops: Any, *outputs: ExitOutputs) -> None:
    """Raise a ``ValueError`` when ``flops`` (from :func:`timm_l2w.exit_flops`) were counted at another
    image size than the ``outputs`` were collected at (plain lists carry no size and are not checked)."""
    counted = getattr(flops, "input_size", None)
    for out in outputs:
        seen = out.input_size
        if counted is not None and seen is not None and tuple(counted) != tuple(seen):
            ratio = (counted[-1] * counted[-2]) / (seen[-1] * seen[-2])
            raise ValueError(
                f"the FLOPs were counted for {'x'.join(map(str, counted))} images but the outputs come from "
                f"{'x'.join(map(str, seen))} images (the FLOPs axis would be off by about {ratio:.3g}x): use "
                f"timm_l2w.exit_flops(model, input_size={tuple(seen)})")


def anytime_metrics(outputs: ExitOutputs, flops: Sequence[float] | Tensor | None = None) -> List[Dict[str, float]]:
    """One row per exit: ``exit`` (1-based), ``top1`` and ``top5`` (%), mean ``loss`` and ``flops``."""
    check_flops_input_size(flops, outputs)
    top1 = outputs.correct.double().mean(0) * 100
    top5 = outputs.top5.double().mean(0) * 100
    loss = outputs.losses.double().mean(0)
    f = check_flops(flops, outputs.num_exits) if flops is not None else None
    rows = []
    for k in range(outputs.num_exits):
        row = {"exit": k + 1, "top1": float(top1[k]), "top5": float(top5[k]), "loss": float(loss[k])}
        if f is not None:
            row["flops"] = float(f[k])
        rows.append(row)
    return rows


@dataclass
class BudgetedResults:
    """Budgeted evaluation, one entry per budget b (exit distribution) and exit k.

    Accuracies in %, FLOPs in the unit of the ``flops`` given. ``q`` is NaN for user distributions.
    ``rule`` is the exit rule: ``thresholds`` are max-softmax thresholds (``'confidence'``, exit when
    ``c >= T_k``) or entropy thresholds (``'entropy'``, exit when ``H <= T_k``). For ``'patience'``
    every budget is one patience value (``patience`` [B]); ``thresholds`` are NaN, ``q`` is NaN and
    ``distributions`` are the exit fractions the patience gives on the held-out set.
    """

    q: Tensor  # [B]
    distributions: Tensor  # [B, K]
    thresholds: Tensor  # [B, K]
    test_top1: Tensor  # [B]
    expected_flops: Tensor  # [B], on the test set
    test_exit_fractions: Tensor  # [B, K]
    heldout_top1: Tensor  # [B]
    heldout_expected_flops: Tensor  # [B]
    heldout_exit_fractions: Tensor  # [B, K]
    rule: str = "confidence"
    patience: Optional[Tensor] = None  # [B] long, rule 'patience' only

    def __len__(self) -> int:
        return self.q.shape[0]

    def rows(self) -> List[Dict[str, Any]]:
        """The results as a tidy table: one flat dict per budget (lists spread over ``_k`` columns)."""
        rows = []
        for b in range(len(self)):
            q = float(self.q[b])
            row: Dict[str, Any] = {
                "budget": b + 1,
                "rule": self.rule,
                "q": None if math.isnan(q) else q,
                "test_top1": float(self.test_top1[b]),
                "expected_flops": float(self.expected_flops[b]),
                "heldout_top1": float(self.heldout_top1[b]),
                "heldout_expected_flops": float(self.heldout_expected_flops[b]),
            }
            if self.patience is not None:
                row["patience"] = int(self.patience[b])
            for name, table in (
                ("p", self.distributions),
                ("threshold", self.thresholds),
                ("test_fraction", self.test_exit_fractions),
                ("heldout_fraction", self.heldout_exit_fractions),
            ):
                row.update({f"{name}_{k + 1}": float(v) for k, v in enumerate(table[b])})
            rows.append(row)
        return rows


def _entropies(outputs: ExitOutputs, name: str) -> Tensor:
    if outputs.entropies is None:
        raise ValueError(f"the {name} outputs carry no entropies (ExitOutputs built without them): collect them with "
                         "collect_exit_outputs or ExitOutputs.from_logits for the 'entropy' exit rule")
    return outputs.entropies


def _exits(outputs: ExitOutputs, name: str, rule: str, thresholds: Optional[Tensor], patience: Optional[Tensor]) -> Tensor:
    """``[B, N]`` exit of every sample under every budget of the rule."""
    if rule == "patience":
        return exit_by_patience(outputs.predictions, patience)
    if rule == "entropy":
        return exit_by_entropy(_entropies(outputs, name), thresholds)
    return exit_by_threshold(outputs.confidences, thresholds)


def _apply(outputs: ExitOutputs, exits: Tensor, flops: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-1 (%), expected FLOPs and exit fractions of every budget row of ``exits`` ``[B, N]``."""
    correct = outputs.correct.T.contiguous().gather(0, exits)  # [B, N]: correctness at each sample's exit
    num_budgets, num_exits = exits.shape[0], outputs.num_exits
    offsets = torch.arange(num_budgets, device=exits.device)[:, None] * num_exits
    counts = torch.bincount((exits + offsets).flatten(), minlength=num_budgets * num_exits)
    fractions = counts.view(num_budgets, num_exits).double() / exits.shape[1]  # [B, K]
    return correct.double().mean(dim=1) * 100, fractions @ flops, fractions


def budgeted_evaluation(
    heldout: ExitOutputs,
    test: ExitOutputs,
    flops: Sequence[float] | Tensor,
    distributions: Tensor | Sequence[Sequence[float]] | None = None,
    rule: str = "confidence",
    patience: Sequence[int] | Tensor | None = None,
) -> BudgetedResults:
    """The paper's budgeted (dynamic) evaluation for every distribution at once, vectorised.

    Thresholds are calibrated on ``heldout`` for each exit distribution (default: the paper's 39,
    q = j/20) and applied on ``test``; expected FLOPs are ``sum_k fraction_k * flops_k``. ``flops``
    from ``timm_l2w.exit_flops(model, test.input_size)``: FLOPs counted at another image size are refused.

    ``rule`` (:data:`timm_l2w.exits.EXIT_RULES`): ``'confidence'`` (max softmax, the paper's),
    ``'entropy'`` (thresholds on the predictive entropy, calibrated the same way) or ``'patience'``
    (no calibration: one budget per patience value, default ``1..K``; ``distributions`` not allowed).
    """
    rule = check_exit_rule(rule)
    for name, value in (("heldout", heldout), ("test", test)):
        if not isinstance(value, ExitOutputs):
            raise TypeError(f"{name} must be ExitOutputs (from collect_exit_outputs), got {type(value).__name__}")
    if heldout.num_exits != test.num_exits:
        raise ValueError(
            f"held-out outputs have {heldout.num_exits} exits but test outputs have {test.num_exits}: "
            "collect both with the same model"
        )
    num_exits = test.num_exits
    check_flops_input_size(flops, heldout, test)
    f = check_flops(flops, num_exits)
    if rule == "patience":
        if distributions is not None:
            raise ValueError("the 'patience' exit rule has no thresholds to calibrate for exit distributions: "
                             "pass patience=[...] (budgets are patience values) instead of distributions")
        ps = torch.arange(1, num_exits + 1) if patience is None else torch.as_tensor(patience).reshape(-1)
        test_top1, test_flops, test_frac = _apply(test, _exits(test, "test", rule, None, ps), f)
        held_top1, held_flops, held_frac = _apply(heldout, _exits(heldout, "held-out", rule, None, ps), f)
        nan = torch.full((len(ps),), math.nan, dtype=torch.float64)
        return BudgetedResults(nan, held_frac, torch.full((len(ps), num_exits), math.nan, dtype=torch.float64),
                               test_top1, test_flops, test_frac, held_top1, held_flops, held_frac,
                               rule=rule, patience=ps.long())
    if patience is not None:
        raise ValueError(f"patience= is for the 'patience' exit rule, not {rule!r}")
    if distributions is None:
        dist = paper_distributions(num_exits)
        q = torch.tensor(paper_qs(dist.shape[0]), dtype=torch.float64)
    else:
        dist = check_distributions(distributions, num_exits)
        q = torch.full((dist.shape[0],), math.nan, dtype=torch.float64)
    if rule == "entropy":
        thresholds = calibrate_entropy_thresholds_batch(_entropies(heldout, "held-out"), dist)
    else:
        thresholds = calibrate_thresholds_batch(heldout.confidences, dist)
    test_top1, test_flops, test_frac = _apply(test, _exits(test, "test", rule, thresholds, None), f)
    held_top1, held_flops, held_frac = _apply(heldout, _exits(heldout, "held-out", rule, thresholds, None), f)
    return BudgetedResults(q, dist, thresholds, test_top1, test_flops, test_frac, held_top1, held_flops, held_frac,
                           rule=rule)


# ----------------------------------------------------------------------------- files (I/O edge)


def _json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (inf thresholds, NaN) become the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_results(
    out_dir: Path | str,
    anytime: Optional[Sequence[Mapping[str, Any]]] = None,
    budgeted: Optional[BudgetedResults | Sequence[Mapping[str, Any]]] = None,
    name: str = "eval",
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Path]:
    """Write ``{name}_anytime.csv``, ``{name}_budgeted.csv`` and ``{name}.json`` (all tables + ``extra``).

    Returns the written paths by kind. Non-finite thresholds appear as ``inf``/``-inf`` in both formats.
    """
    out_dir = Path(out_dir)
    if isinstance(budgeted, BudgetedResults):
        budgeted = budgeted.rows()
    payload: Dict[str, Any] = dict(extra or {})
    paths: Dict[str, Path] = {}
    for kind, rows in (("anytime", anytime), ("budgeted", budgeted)):
        if rows is None:
            continue
        rows = [dict(r) for r in rows]
        payload[kind] = rows
        paths[f"{kind}_csv"] = write_text_atomic(out_dir / f"{name}_{kind}.csv", csv_text(rows))
    paths["json"] = write_text_atomic(out_dir / f"{name}.json", json.dumps(_json_safe(payload), indent=2) + "\n")
    return paths


def _load_weights(model: nn.Module, checkpoint: Path | str) -> None:
    """Load ``.safetensors`` / ``.pth`` weights into ``model`` (names every mismatched key on error)."""
    from .checkpoint import load_state_dict
    from .state_checks import check_state_dict

    state = load_state_dict(checkpoint)
    check_state_dict(model, state)
    check_weights(state, unwrap_model(model).state_dict(), Path(checkpoint))  # dtypes and finite values
    unwrap_model(model).load_state_dict(state)


def evaluate_checkpoint(
    model: nn.Module,
    heldout_loader: Iterable,
    test_loader: Iterable,
    checkpoint: Optional[Path | str] = None,
    flops: Optional[Sequence[float]] = None,
    input_size: Optional[Sequence[int]] = None,
    distributions: Tensor | Sequence[Sequence[float]] | None = None,
    out_dir: Optional[Path | str] = None,
    name: str = "eval",
    device: Optional[torch.device | str] = None,
    progress: bool = False,
    exit_rule: str = "confidence",
) -> Dict[str, Any]:
    """Anytime + budgeted evaluation of ``model`` (optionally loading ``checkpoint`` first).

    FLOPs default to :func:`timm_l2w.exit_flops` at the input size of the first test batch.
    With ``out_dir``, writes the CSV/JSON tables (:func:`save_results`) and ``{name}.png``.
    ``exit_rule`` picks the budgeted exit rule (see :func:`budgeted_evaluation`).
    Returns ``{"anytime", "budgeted", "heldout", "test", "flops", "files"}``.
    """
    check_exit_rule(exit_rule)
    if checkpoint is not None:
        _load_weights(model, checkpoint)
    if device is not None:
        model.to(device)
    heldout = collect_exit_outputs(model, heldout_loader, device=device, progress=progress)
    test = collect_exit_outputs(model, test_loader, device=device, progress=progress)
    if flops is None:
        from .flops import exit_flops

        if input_size is None:
            input_size = tuple(_batch_xy(next(iter(test_loader)))[0].shape[1:])
        flops = exit_flops(model, input_size)
    anytime = anytime_metrics(test, flops)
    budgeted = budgeted_evaluation(heldout, test, flops, distributions, rule=exit_rule)
    files: Dict[str, Path] = {}
    if out_dir is not None:
        from .plot import plot_budgeted

        extra = {"num_heldout": heldout.num_samples, "num_test": test.num_samples, "flops": list(map(float, flops)),
                 "exit_rule": exit_rule}
        files = save_results(out_dir, anytime, budgeted, name=name, extra=extra)
        files["plot"] = plot_budgeted({name: budgeted}, Path(out_dir) / f"{name}.png", anytime={name: anytime})
    return {"anytime": anytime, "budgeted": budgeted, "heldout": heldout, "test": test, "flops": list(flops), "files": files}


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    from .cli.common import DefaultsHelpFormatter, add_device, add_input_size, add_version

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
    p.add_argument("--held-out", type=int, default=None, help="held-out images for the thresholds (default: the data set's)")
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
    p.add_argument("--flops-budget", type=float, default=None,
                   help="also write <name>_policy.json for the most accurate exit distribution (patience: patience "
                        "value) whose expected FLOPs per image on the held-out set stay within this budget")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (it is off anyway when stderr is not a terminal)")
    return p


def _model_from_metadata(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    """The model name and ``create_model`` arguments: the flags, else the checkpoint's metadata."""
    from .checkpoint import read_metadata, recorded_model

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
    from .checkpoint import read_metadata

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
    from .data import create_eval_loaders

    import timm_l2w  # noqa: F401  (registers the models)

    check_settings(args, EVAL_SETTINGS)  # numbers in range before any data or model is built
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"no such file: {args.checkpoint}: pass the path of a .safetensors (or .pth) "
                                f"checkpoint, e.g. OUTPUT/model.safetensors of timm-l2w train"
                                + (" (that is a folder)" if Path(args.checkpoint).is_dir() else ""))
    model_name, kwargs = _model_from_metadata(args)  # before the data: a wrong --model is the first thing to say
    _data_from_metadata(args)
    if args.q is not None or args.flops_budget is not None:
        from .deploy.policy import check_policy_request

        check_policy_request(args.q, args.flops_budget, args.exit_rule)
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
    if args.q is not None or args.flops_budget is not None:  # the exit policy timm-l2w export reads
        from .deploy.policy import eval_policy_file

        result["files"]["policy"] = eval_policy_file(args, model, result, test_loader, info, name)
    for kind, path in result["files"].items():
        print(f"wrote {kind}: {path}")
    return 0

"""Evaluation on files: a checkpoint's weights in, the result tables (CSV, JSON) and the plot out.

:func:`evaluate_checkpoint` collects the exit outputs of a held-out and a test loader, computes the
anytime and budgeted metrics and, with an output folder, writes them (:func:`save_results`) and plots
them. ``timm-l2w eval`` (:mod:`timm_l2w.cli.eval`) is its command line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import exits
from ..files import csv_text, write_text_atomic
from ..models.base import unwrap_model
from ..state_checks import check_weights
from .metrics import BudgetedResults, anytime_metrics, budgeted_evaluation
from .outputs import batch_xy, collect_exit_outputs

__all__ = ["save_results", "load_weights", "evaluate_checkpoint"]


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


def load_weights(model: nn.Module, checkpoint: Path | str, use_ema: bool = False) -> None:
    """Load ``.safetensors`` / ``.pth`` weights (or a timm checkpoint's, its EMA ones with ``use_ema``) into
    ``model`` (names every mismatched key on error)."""
    from ..files import load_state_dict
    from ..state_checks import check_state_dict

    state = load_state_dict(checkpoint, use_ema=use_ema)
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
    use_ema: bool = False,
) -> Dict[str, Any]:
    """Anytime + budgeted evaluation of ``model`` (optionally loading ``checkpoint`` first: with ``use_ema``
    the EMA weights of a timm checkpoint, :func:`load_weights`).

    FLOPs default to :func:`timm_l2w.exit_flops` at the input size of the first test batch.
    With ``out_dir``, writes the CSV/JSON tables (:func:`save_results`) and ``{name}.png``.
    ``exit_rule`` picks the budgeted exit rule (see :func:`budgeted_evaluation`).
    Returns ``{"anytime", "budgeted", "heldout", "test", "flops", "files"}``.
    """
    exits.exit_rule(exit_rule)  # an unknown rule fails before any work
    if checkpoint is not None:
        load_weights(model, checkpoint, use_ema=use_ema)
    if device is not None:
        model.to(device)
    heldout = collect_exit_outputs(model, heldout_loader, device=device, progress=progress)
    test = collect_exit_outputs(model, test_loader, device=device, progress=progress)
    if flops is None:
        from ..flops import exit_flops

        if input_size is None:
            input_size = tuple(batch_xy(next(iter(test_loader)))[0].shape[1:])
        flops = exit_flops(model, input_size)
    anytime = anytime_metrics(test, flops)
    budgeted = budgeted_evaluation(heldout, test, flops, distributions, rule=exit_rule)
    files: Dict[str, Path] = {}
    if out_dir is not None:
        from .plots import plot_budgeted

        extra = {"num_heldout": heldout.num_samples, "num_test": test.num_samples, "flops": list(map(float, flops)),
                 "exit_rule": exit_rule}
        files = save_results(out_dir, anytime, budgeted, name=name, extra=extra)
        files["plot"] = plot_budgeted({name: budgeted}, Path(out_dir) / f"{name}.png", anytime={name: anytime})
    return {"anytime": anytime, "budgeted": budgeted, "heldout": heldout, "test": test, "flops": list(flops),
            "files": files}

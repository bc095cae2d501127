"""The fidelity study's summary: every L2W variant against equal weighting of the same seeds, on one
FLOPs grid, with intervals over seeds, the budget-by-budget gain, anytime gains, cost ratios, exit rules
and the predictor analysis, as a dict (the report files: :mod:`timm_l2w.study.report`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from timm_l2w.study.runner import (
    EXTRA_RULES,
    LABELS,
    METHOD_LABELS,
    REFERENCE,
    VARIANTS,
    result_path,
    shown,
)
from timm_l2w.study.stats import mean_std, mean_with_intervals
from timm_l2w.study.weights import predictor_summary

__all__ = ["variant_label", "load_records", "missing_runs", "cost_ratio", "run_costs", "compare_variant",
           "summarize_records", "exit_rule_summary"]

# the paper's budget distributions are q = j / 20 (j = 1..39); the training distribution is j = target_p_index
_Q_STEP = 20


def variant_label(variant: str, settings: Optional[Dict[str, Any]] = None) -> str:
    """How a variant is named in tables and plots (L2W variants by their meta interval)."""
    if variant in METHOD_LABELS:
        return METHOD_LABELS[variant]
    if VARIANTS.get(variant, (variant,))[0] != "l2w":
        return LABELS.get(variant, variant)
    interval = (settings or {}).get("meta_interval")
    return f"L2W, meta interval {interval}" if interval is not None else f"L2W ({variant})"


def load_records(out: Path, seeds: Sequence[int]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """The result files present in ``out`` for ``seeds``: ``{variant: {seed: record}}``, known variants only."""
    records: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for variant in VARIANTS:
        for seed in seeds:
            path = result_path(out, variant, seed)
            if not path.is_file():
                continue
            try:
                records.setdefault(variant, {})[seed] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{shown(path)} is not a readable result file ({exc}); delete it and rerun the "
                                 "study's command (runs whose result file exists are skipped)") from exc
    return records


def missing_runs(out: Path, variants: Sequence[str], seeds: Sequence[int],
                 records: Dict[str, Dict[int, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per variant asked for or present: the seeds without a result file and the newest checkpoint of each."""
    missing = {}
    for variant in dict.fromkeys([*variants, *records]):
        absent = [s for s in seeds if s not in records.get(variant, {})]
        if not absent:
            continue
        progress = {}
        for s in absent:
            done = sorted((out / "runs" / f"{variant}_seed{s}" / "checkpoints").glob("step_*/COMPLETE"))
            if done:
                progress[s] = int(done[-1].parent.name.split("_")[1])
        missing[variant] = {"seeds": absent, "checkpoint_step": progress}
    return missing


def cost_ratio(runs: Dict[int, Dict[str, Any]], reference: Dict[int, Dict[str, Any]], key: str) -> Dict[str, Any]:
    """Per seed, ``runs[s][key] / reference[s][key]`` (same seed, same study), and their mean.

    A pair is left out when either run was resumed (its times cover only the last segment) or lacks ``key``.
    """
    per_seed, excluded = {}, {}
    for s in sorted(set(runs) & set(reference)):
        a, b = runs[s], reference[s]
        if a.get("resumed") or b.get("resumed"):
            excluded[s] = "resumed run (times cover only its last segment)"
        elif a.get(key) is None or b.get(key) is None:
            excluded[s] = f"{key} not recorded"
        else:
            per_seed[s] = float(a[key]) / float(b[key])
    values = list(per_seed.values())
    return {"key": key, "per_seed": per_seed, "mean": float(np.mean(values)) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None, "excluded": excluded}


def run_costs(runs: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """CPU, wall and training seconds per run; means over the runs that were not resumed."""
    whole = [s for s in sorted(runs) if not runs[s].get("resumed")]
    cost: Dict[str, Any] = {"resumed_seeds": [s for s in sorted(runs) if runs[s].get("resumed")]}
    for key in ("cpu_s", "wall_s", "train_s"):
        cost[key] = {s: runs[s].get(key) for s in sorted(runs)}
        cost[f"{key}_stats"] = mean_std([runs[s][key] for s in whole if runs[s].get(key) is not None])
    return cost


def _curve(rows: Sequence[Dict[str, Any]]) -> tuple:
    """A budgeted curve's (MFLOPs, test top-1) arrays, sorted by FLOPs."""
    f = np.array([r["expected_flops"] for r in rows], dtype=np.float64) / 1e6
    a = np.array([r["test_top1"] for r in rows], dtype=np.float64)
    order = np.argsort(f, kind="stable")
    return f[order], a[order]


def _at_q(rows: Sequence[Dict[str, Any]], q: float) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if r.get("q") is not None and abs(r["q"] - q) < 1e-9), None)


def _train_q_gain(runs: Dict[int, Any], reference: Dict[int, Any], paired: Sequence[int],
                  target_p_index: Optional[int]) -> Optional[Dict[str, Any]]:
    """Test top-1 of a variant and of equal weighting at the training distribution's budget, per seed."""
    if not paired or target_p_index is None:
        return None
    q = target_p_index / _Q_STEP
    rows = {"variant": [_at_q(runs[s]["budgeted"], q) for s in paired],
            "reference": [_at_q(reference[s]["budgeted"], q) for s in paired]}
    if any(r is None for side in rows.values() for r in side):
        return None
    return {"q": q, "variant": mean_std([r["test_top1"] for r in rows["variant"]]),
            "reference": mean_std([r["test_top1"] for r in rows["reference"]]),
            "gain": mean_with_intervals([a["test_top1"] - b["test_top1"]
                                         for a, b in zip(rows["variant"], rows["reference"])]),
            "mflops": {side: mean_std([r["expected_flops"] / 1e6 for r in rows[side]]) for side in rows}}


def compare_variant(runs: Dict[int, Dict[str, Any]], reference: Dict[int, Dict[str, Any]],
                    on_grid: Dict[int, np.ndarray], on_grid_ref: Dict[int, np.ndarray]) -> Dict[str, Any]:
    """The comparison of one L2W variant against equal weighting (see ``summarize_records``)."""
    mean_v = np.mean(np.stack(list(on_grid.values())), 0)
    mean_r = np.mean(np.stack(list(on_grid_ref.values())), 0)
    gain = mean_v - mean_r
    paired = sorted(set(runs) & set(reference))
    diff = {s: on_grid[s] - on_grid_ref[s] for s in paired}
    n_budgets = min(len(r["budgeted"]) for r in [*runs.values(), *reference.values()])
    by_index = {s: np.array([runs[s]["budgeted"][b]["test_top1"] - reference[s]["budgeted"][b]["test_top1"]
                             for b in range(n_budgets)]) for s in paired}
    by_index_mean = np.mean(np.stack(list(by_index.values())), 0) if paired else None
    num_exits = min(len(r["anytime"]) for r in [*runs.values(), *reference.values()])
    settings = next(iter(runs.values()))["settings"]
    peak = {s: max(r["test_top1"] for r in runs[s]["budgeted"]) - max(r["test_top1"] for r in reference[s]["budgeted"])
            for s in paired}
    return {
        "seeds_paired": paired,
        "gain_on_grid": gain.tolist(),
        "mean_gain": float(gain.mean()),
        "share_ahead": float((gain > 0).mean()),
        "paired_gain_per_seed": {s: float(d.mean()) for s, d in diff.items()},
        "paired_mean_gain": mean_with_intervals([float(d.mean()) for d in diff.values()]),
        "paired_share_ahead_per_seed": {s: float((d > 0).mean()) for s, d in diff.items()},
        "gain_by_budget_index": by_index_mean.tolist() if paired else [],
        "gain_by_budget_index_per_seed": {s: float(d.mean()) for s, d in by_index.items()},
        "mean_gain_by_budget_index": mean_with_intervals([float(d.mean()) for d in by_index.values()]),
        "share_ahead_by_budget_index": float((by_index_mean > 0).mean()) if paired else None,
        "gain_at_training_q": _train_q_gain(runs, reference, paired, settings.get("target_p_index")),
        "anytime_gain": [mean_std([runs[s]["anytime"][k]["top1"] - reference[s]["anytime"][k]["top1"] for s in paired])
                         for k in range(num_exits)],
        "peak_gain": mean_std(list(peak.values())),
        "cost_ratio_cpu": cost_ratio(runs, reference, "cpu_s"),
        "cost_ratio_wall": cost_ratio(runs, reference, "wall_s"),
        "predictor": predictor_summary(runs),
    }


def summarize_records(records: Dict[str, Dict[int, Dict[str, Any]]], points: int = 39) -> Dict[str, Any]:
    """The study's summary from ``{variant: {seed: record}}`` (needs equal weighting and one other variant).

    Every budgeted curve goes on one grid of ``points`` FLOPs values over the range all curves cover
    (linear interpolation); per variant: mean and std over its seeds. Per other variant, against equal
    weighting: the gain of the seed-mean curves on the grid, its mean and share of grid points ahead;
    the same per seed (pairs of runs with the same seed) with t and bootstrap intervals over seeds; the
    gain budget by budget (same q, no interpolation); gain at the training q; anytime gain per exit;
    peak; cost ratios (CPU and wall seconds, resumed runs left out); the predictor analysis. Where the
    result files hold them, ``exit_rules``: every variant's curves under the other exit rules.
    """
    if REFERENCE not in records or len(records) < 2:
        raise ValueError("the summary needs equal-weighting runs and the runs of at least one other variant")
    models = {r["model"] for runs in records.values() for r in runs.values()}
    if len(models) > 1:
        raise ValueError(f"the result files mix models {sorted(models)}: summarize one model per --out folder")
    # equal weighting first, then the L2W variants by meta interval, then the other methods
    compared = sorted((v for v in records if v != REFERENCE),
                      key=lambda v: (v in METHOD_LABELS, _interval(records[v]), v))
    variants = [REFERENCE, *compared]
    curves = {v: {s: _curve(r["budgeted"]) for s, r in records[v].items()} for v in variants}
    every = [c for v in variants for c in curves[v].values()]
    lo, hi = max(f.min() for f, _ in every), min(f.max() for f, _ in every)
    if not lo < hi:
        raise ValueError("the budgeted curves do not overlap in FLOPs: nothing to compare")
    grid = np.linspace(lo, hi, points)
    on_grid = {v: {s: np.interp(grid, f, a) for s, (f, a) in curves[v].items()} for v in variants}
    settings = {v: next(iter(records[v].values()))["settings"] for v in variants}
    num_exits = min(len(r["anytime"]) for runs in records.values() for r in runs.values())
    first = next(iter(records[REFERENCE].values()))
    stacked = {v: np.stack(list(on_grid[v].values())) for v in variants}
    commits = sorted({((r.get("code") or {}).get("commit") or "not recorded")[:12]
                      for runs in records.values() for r in runs.values()})
    return {
        "model": first["model"],
        "reference": REFERENCE,
        "variants": variants,
        "labels": {v: variant_label(v, settings[v]) for v in variants},
        "seeds": {v: sorted(records[v]) for v in variants},
        "train_length": _train_length(first),
        "commits": commits,
        "settings": settings,
        "exit_mflops": [f / 1e6 for f in first["flops"]][:num_exits],
        "grid_mflops": grid.tolist(),
        "curve_mean": {v: stacked[v].mean(0).tolist() for v in variants},
        "curve_std": {v: (stacked[v].std(0, ddof=1) if len(stacked[v]) > 1 else np.zeros(points)).tolist()
                      for v in variants},
        "anytime_top1": {v: [mean_std([r["anytime"][k]["top1"] for r in records[v].values()]) for k in range(num_exits)]
                         for v in variants},
        "peak_budgeted_top1": {v: mean_std([max(row["test_top1"] for row in r["budgeted"])
                                            for r in records[v].values()])
                               for v in variants},
        "cost": {v: run_costs(records[v]) for v in variants},
        "comparisons": {v: compare_variant(records[v], records[REFERENCE], on_grid[v], on_grid[REFERENCE])
                        for v in compared},
        "exit_rules": exit_rule_summary({v: records[v] for v in variants}, [f / 1e6 for f in first["flops"]], grid),
    }


def _rule_curve(record: Dict[str, Any], rule: str) -> Optional[tuple]:
    rows = record["budgeted"] if rule == "confidence" else (record.get("budgeted_rules") or {}).get(rule)
    if not rows:
        return None
    return _curve(rows)


def exit_rule_summary(records: Dict[str, Dict[int, Dict[str, Any]]], exit_mflops: Sequence[float],
                      grid: np.ndarray) -> Optional[Dict[str, Any]]:
    """Every variant under every exit rule: test top-1 (mean ± std over seeds) at the FLOPs of each exit.

    A curve is read at a FLOPs value by linear interpolation only inside the FLOPs range it covers
    (None outside). ``mean_on_grid``: the curve's mean over the comparison grid, for the rules whose
    curves cover it (confidence and entropy); patience has only K budgets and is read at the exits.
    Returns None when no result file holds the other rules.
    """
    rules = ["confidence", *EXTRA_RULES]
    if not any(r.get("budgeted_rules") for runs in records.values() for r in runs.values()):
        return None
    table: Dict[str, Dict[str, Any]] = {}
    for v, runs in records.items():
        for rule in rules:
            curves = [c for c in (_rule_curve(r, rule) for r in runs.values()) if c is not None]
            if not curves:
                continue
            at_exit = []
            for mf in exit_mflops:
                vals = [float(np.interp(mf, f, a)) for f, a in curves if f.min() - 1e-9 <= mf <= f.max() + 1e-9]
                at_exit.append(mean_std(vals) if len(vals) == len(curves) else None)
            covers = all(f.min() <= grid[0] + 1e-9 and f.max() >= grid[-1] - 1e-9 for f, _ in curves)
            table.setdefault(v, {})[rule] = {
                "seeds": len(curves), "at_exit_mflops": at_exit,
                "mean_on_grid": mean_std([float(np.interp(grid, f, a).mean()) for f, a in curves]) if covers else None,
                "mflops_range": [min(float(f.min()) for f, _ in curves), max(float(f.max()) for f, _ in curves)]}
    return {"rules": rules, "exit_mflops": list(exit_mflops), "table": table}


def _interval(runs: Dict[int, Dict[str, Any]]) -> float:
    interval = next(iter(runs.values()))["settings"].get("meta_interval")
    return float(interval) if interval is not None else math.inf


def _train_length(record: Dict[str, Any]) -> str:
    argv = record.get("train_argv", [])
    for flag in ("--epochs", "--max-steps"):
        if flag in argv:
            return f"{flag} {argv[argv.index(flag) + 1]}"
    return "not recorded"

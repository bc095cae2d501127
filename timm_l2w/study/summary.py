"""The fidelity study's summary: every L2W variant against equal weighting of the same seeds, on one
FLOPs grid, with intervals over seeds, the budget-by-budget gain, anytime gains, cost ratios, exit rules
and the predictor analysis; written as ``summary.json`` and ``summary.md`` (plots: :mod:`timm_l2w.study.plots`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from timm_l2w.files import write_text_atomic
from timm_l2w.study.plots import plot_curves, plot_gain_vs_cost
from timm_l2w.study.runner import (
    EXTRA_RULES,
    LABELS,
    METHOD_LABELS,
    REFERENCE,
    VARIANTS,
    WEIGHTINGS,
    result_path,
    shown,
    write_json,
)
from timm_l2w.study.stats import N_BOOTSTRAP, mean_std, mean_with_intervals
from timm_l2w.study.weights import predictor_summary

__all__ = ["variant_label", "load_records", "missing_runs", "cost_ratio", "run_costs", "compare_variant",
           "summarize_records", "exit_rule_summary", "summarize", "markdown"]

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


def summarize(out: Path, seeds: Sequence[int], variants: Sequence[str] = WEIGHTINGS,
              points: int = 39) -> Optional[Dict[str, Any]]:
    """Summarize the result files in ``out`` (any subset of variants and seeds); write the report files.

    Writes ``summary.json``, ``summary.md``, ``l2w_vs_uniform.png`` (budgeted curves of every variant)
    and ``gain_vs_cost.png``. Returns None (after saying what is missing) when no comparison is possible.
    """
    records = load_records(out, seeds)
    missing = missing_runs(out, variants, seeds, records)
    if missing:
        print("missing result files: " + _missing_text(missing, records))
    try:
        summary = summarize_records(records, points)
    except ValueError as exc:
        present = ", ".join(f"{v}: seeds {sorted(r)}" for v, r in records.items()) or "none"
        print(f"nothing summarized ({exc}); result files present: {present}")
        return None
    summary["seeds_requested"] = list(seeds)
    summary["missing"] = missing
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", markdown(summary))
    plot_curves(summary, out / "l2w_vs_uniform.png")
    plot_gain_vs_cost(summary, out / "gain_vs_cost.png")
    return summary


# ----------------------------------------------------------------------------- report text and plots


def _pm(stats: Optional[Dict[str, float]], digits: int = 2, sign: bool = False) -> str:
    if stats is None:
        return "n/a"
    mean = f"{stats['mean']:{'+' if sign else ''}.{digits}f}"
    return mean if stats["n"] < 2 else f"{mean} ± {stats['std']:.{digits}f}"  # no spread from one run


def _ci(stats: Optional[Dict[str, Any]], key: str, digits: int = 3) -> str:
    """``stats[key]`` (an interval from mean_with_intervals) as text; n/a without paired seeds or with one."""
    if stats is None:
        return "n/a"
    interval = stats[key]
    return "n/a (n < 2)" if interval is None else f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def _per_seed(values: Dict[Any, float], fmt: str = "+.3f", unit: str = "") -> str:
    return ", ".join(f"{s}: {v:{fmt}}{unit}" for s, v in values.items()) or "n/a"


def _distinct_resamples(s: Dict[str, Any]) -> str:
    n = max((len(c["seeds_paired"]) for c in s["comparisons"].values()), default=0)
    if n < 2:
        return "needs 2 seeds or more"
    return f"with {n} seeds only {math.comb(2 * n - 1, n)} distinct resamples exist: a coarse interval"


def _missing_text(missing: Dict[str, Dict[str, Any]], records: Dict[str, Any]) -> str:
    parts = []
    for v, m in missing.items():
        where = "".join(f" (seed {s} at checkpoint step {step})" for s, step in m["checkpoint_step"].items())
        parts.append(f"{v} seeds {', '.join(map(str, m['seeds']))}{where}" if v in records
                     else f"{v}: no runs{where}")
    return "; ".join(parts)


def _ratio_text(ratio: Dict[str, Any]) -> str:
    if ratio["mean"] is None:
        return "n/a"
    text = f"{ratio['mean']:.2f}x ({_per_seed(ratio['per_seed'], '.2f', 'x')})"
    return text + (f"; left out: {_per_seed_text(ratio['excluded'])}" if ratio["excluded"] else "")


def _per_seed_text(reasons: Dict[Any, str]) -> str:
    return ", ".join(f"seed {s} ({why})" for s, why in reasons.items())


def markdown(s: Dict[str, Any]) -> str:
    lab, ref = s["labels"], s["reference"]
    l2w = list(s["comparisons"])
    lines = [f"# L2W vs equal weighting: {s['model']}, Fashion-MNIST 32x32, {s['train_length']}", "",
             "runs (seeds): " + "; ".join(f"{lab[v]} {s['seeds'][v]}" for v in s["variants"]),
             "missing: " + (_missing_text(s["missing"], s["seeds"]) if s.get("missing") else "none"),
             f"code: commit {', '.join(s['commits'])}", "",
             "## Budgeted gain over equal weighting", "",
             f"Grid: {len(s['grid_mflops'])} FLOPs values, {s['grid_mflops'][0]:.2f}-{s['grid_mflops'][-1]:.2f} "
             "MFLOPs (the range every curve covers; linear interpolation). *Mean gain*: mean over the grid of "
             "the difference of the seed-mean curves; *ahead*: share of grid points where that difference is "
             "> 0 (each curve's mean over the seeds it has). *Paired*: per seed both have, the mean over the "
             "grid of that seed's L2W run minus its equal-weighting run (same initialisation, data order and "
             "schedule). Intervals are 95% for the mean paired gain, "
             "over seeds only (the result files hold no per-sample outputs, so test images cannot be "
             f"resampled): Student t with n - 1 degrees of freedom, and a percentile bootstrap of {N_BOOTSTRAP} "
             f"resamples of the seeds ({_distinct_resamples(s)}).", "",
             "| variant | seeds paired | mean gain | ahead | paired gain (mean ± std) | 95% t-interval | "
             "95% bootstrap (seeds) | per seed | ahead per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for v in l2w:
        c = s["comparisons"][v]
        pg = c["paired_mean_gain"]
        lines.append(f"| {lab[v]} | {len(c['seeds_paired'])} | {c['mean_gain']:+.3f} | {100 * c['share_ahead']:.0f}% | "
                     f"{_pm(pg, 3, True)} | {_ci(pg, 'ci95_t')} | {_ci(pg, 'ci95_bootstrap')} | "
                     f"{_per_seed(c['paired_gain_per_seed'])} | "
                     f"{_per_seed({k: 100 * x for k, x in c['paired_share_ahead_per_seed'].items()}, '.0f', '%')} |")
    lines += ["", "Same comparison budget by budget (same q, thresholds from the held-out split, no "
              "interpolation; paired by seed), at the training distribution's q, and at each curve's peak:", "",
              "| variant | gain by budget index | 95% t-interval | ahead (seed-mean gain > 0) | at training q: "
              "variant / equal (MFLOPs) | gain at training q | peak: variant / equal | peak gain |",
              "|---|---|---|---|---|---|---|---|"]
    for v in l2w:
        c = s["comparisons"][v]
        bi, tq = c["mean_gain_by_budget_index"], c["gain_at_training_q"]
        at_q = ("n/a" if tq is None else
                f"q = {tq['q']:.2f}: {_pm(tq['variant'])} ({tq['mflops']['variant']['mean']:.2f}) / "
                f"{_pm(tq['reference'])} ({tq['mflops']['reference']['mean']:.2f})")
        share = c["share_ahead_by_budget_index"]
        lines.append(f"| {lab[v]} | {_pm(bi, 3, True)} | {_ci(bi, 'ci95_t')} | "
                     f"{'n/a' if share is None else f'{100 * share:.0f}%'} | {at_q} | "
                     f"{_pm(tq and tq['gain'], 2, True)} | {_pm(s['peak_budgeted_top1'][v])} / "
                     f"{_pm(s['peak_budgeted_top1'][ref])} | {_pm(c['peak_gain'], 2, True)} |")
    shown = s["variants"]
    gains = " | ".join(f"gain {lab[v]}" for v in l2w)
    lines += ["", "## Budgeted curves (test top-1 %, mean ± std over seeds; every 4th grid point, all in summary.json)",
              "",
              "| avg MFLOPs | " + " | ".join(lab[v] for v in shown) + " | " + gains + " |",
              "|---|" + "---|" * (len(shown) + len(l2w))]
    for i in range(0, len(s["grid_mflops"]), 4):
        lines.append(f"| {s['grid_mflops'][i]:.2f} | "
                     + " | ".join(f"{s['curve_mean'][v][i]:.2f} ± {s['curve_std'][v][i]:.2f}" for v in shown) + " | "
                     + " | ".join(f"{s['comparisons'][v]['gain_on_grid'][i]:+.2f}" for v in l2w) + " |")
    lines += ["", "## Anytime top-1 per exit (test %, mean ± std over seeds; gain: paired by seed)", "",
              "| exit | MFLOPs | " + " | ".join(lab[v] for v in shown) + " | " + gains + " |",
              "|---|---|" + "---|" * (len(shown) + len(l2w))]
    for k, mf in enumerate(s["exit_mflops"]):
        lines.append(f"| {k + 1} | {mf:.2f} | " + " | ".join(_pm(s["anytime_top1"][v][k]) for v in shown) + " | "
                     + " | ".join(_pm(s["comparisons"][v]["anytime_gain"][k], 2, True) for v in l2w) + " |")
    lines += _exit_rules_markdown(s)
    lines += ["", "## Cost", "",
              "CPU s: process CPU time of the run's `timm_l2w.train` call (training and the final evaluation, "
              "one thread); wall s: its wall-clock time (when runs share the machine it includes waiting); "
              "train s: the training loop's own timer. Means over runs that were not "
              "resumed. Ratio: per seed, the variant's run over the equal-weighting run of the same seed, then "
              "the mean. A resumed run's times cover only its last segment, so resumed runs are flagged and "
              "left out of the means and ratios.", "",
              "| variant | runs | resumed (seeds) | CPU s per run | wall s per run | train s per run | "
              "CPU ratio vs equal | wall ratio vs equal |", "|---|---|---|---|---|---|---|---|"]
    for v in shown:
        cost, c = s["cost"][v], s["comparisons"].get(v)
        lines.append(f"| {lab[v]} | {len(s['seeds'][v])} | {cost['resumed_seeds'] or 'none'} | "
                     f"{_pm(cost['cpu_s_stats'], 0)} | {_pm(cost['wall_s_stats'], 0)} | "
                     f"{_pm(cost['train_s_stats'], 0)} | "
                     f"{'1 (reference)' if c is None else _ratio_text(c['cost_ratio_cpu'])} | "
                     f"{'1 (reference)' if c is None else _ratio_text(c['cost_ratio_wall'])} |")
    lines += ["", "## Predictor: weight vs loss correlation per exit", "",
              "From `weights_over_training`: every checkpoint's predictor applied to that checkpoint's exit "
              "losses on 1,000 held-out images; Pearson correlation between a sample's loss and its weight. "
              "End: each seed's last checkpoint, mean [min, max] over seeds. Settled: first checkpoint step "
              "from which the seed-mean correlation keeps the sign it ends with. Trajectory: seed-mean "
              "correlation at up to 5 evenly spaced checkpoints.", ""]
    for v in l2w:
        p = s["comparisons"][v]["predictor"]
        if p is None:
            lines += [f"{lab[v]}: no weights_over_training in these runs", ""]
            continue
        picks = sorted(set(np.linspace(0, len(p["steps"]) - 1, min(5, len(p["steps"]))).round().astype(int).tolist()))
        lines += [f"{lab[v]} (seeds {p['seeds']}, last checkpoint step {_per_seed(p['end_step'], 'd')}; weights at "
                  f"the end range {p['weight_range_end'][0]:.2f}-{p['weight_range_end'][1]:.2f}):", "",
                  "| exit | corr at end | mean weight at end | settled from step | trajectory (steps "
                  + " / ".join(str(p["steps"][i]) for i in picks) + ") |", "|---|---|---|---|---|"]
        for k in range(len(p["weight_mean_end"])):
            ce = p["corr_end"]
            lines.append(f"| {k + 1} | {ce['mean'][k]:+.2f} [{ce['min'][k]:+.2f}, {ce['max'][k]:+.2f}] | "
                         f"{p['weight_mean_end'][k]:.2f} | {p['sign_settled_from_step'][k] or 'n/a'} | "
                         + " / ".join(f"{p['corr_mean_over_steps'][i][k]:+.2f}" for i in picks) + " |")
        lines.append("")
    lines += ["Plots: `l2w_vs_uniform.png` (budgeted curves, ± 1 std bands, exits with error bars), "
              "`gain_vs_cost.png` (paired mean gain with its 95% t-interval against the cost ratio).", ""]
    return "\n".join(lines)


def _exit_rules_markdown(s: Dict[str, Any]) -> List[str]:
    rules = s.get("exit_rules")
    if not rules:
        return []
    lab, mf = s["labels"], rules["exit_mflops"]
    lines = ["", "## Exit rules (test top-1 %, mean ± std over seeds)", "",
             "Every run's own held-out and test outputs under each exit rule: *confidence* (max softmax, the "
             "paper's) and *entropy* are calibrated on the held-out split for the 39 distributions; *patience* "
             "exits once the prediction has stayed the same for p consecutive exits (p = 1..K, no calibration). "
             "Each curve is read at the FLOPs of every exit (linear interpolation, only inside the FLOPs range the "
             "curve covers; n/a outside). Mean on grid: the curve's mean over the comparison grid above "
             "(n/a where the curve does not cover the whole grid).", "",
             "| variant | rule | mean on grid | "
             + " | ".join(f"at exit {k + 1} ({m:.2f} MFLOPs)" for k, m in enumerate(mf)) + " |",
             "|---|---|---|" + "---|" * len(mf)]
    for v in s["variants"]:
        for rule, row in rules["table"].get(v, {}).items():
            lines.append(f"| {lab[v]} | {rule} | {_pm(row['mean_on_grid'])} | "
                         + " | ".join(_pm(x) for x in row["at_exit_mflops"]) + " |")
    return lines

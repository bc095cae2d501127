"""The fidelity study's report: the summary of :mod:`timm_l2w.study.summary` written as ``summary.json``,
``summary.md`` (its Markdown text) and the plots of :mod:`timm_l2w.study.plots`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from timm_l2w.files import write_text_atomic
from timm_l2w.study.plots import plot_curves, plot_gain_vs_cost
from timm_l2w.study.runner import WEIGHTINGS, write_json
from timm_l2w.study.stats import N_BOOTSTRAP
from timm_l2w.study.summary import load_records, missing_runs, summarize_records

__all__ = ["summarize", "markdown"]


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

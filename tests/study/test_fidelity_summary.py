"""Summary of the fidelity study (benchmarks/fidelity.py): paired gains, intervals, cost ratios, partial results.

Every record here is synthetic, written to tmp_path: the files have the fields of the study's result
files, with accuracies chosen so the expected numbers can be worked out by hand.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("fidelity_bench", ROOT / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)

N_BUDGETS = 39
T_975_DF2 = 4.302652729749464  # Student t 97.5% quantile, 2 degrees of freedom (tables)


def _record(variant: str, seed: int, gain: Sequence[float] | float = 0.0, *, cpu_s: Optional[float] = 100.0,
            wall_s: float = 150.0, resumed: Optional[bool] = False, anytime_gain: float = 0.0,
            corr: Optional[List[List[float]]] = None, meta_interval: int = 1) -> Dict[str, Any]:
    """A result file as run_one writes it; ``gain`` is added to a fixed curve at every budget."""
    gains = [gain] * N_BUDGETS if isinstance(gain, (int, float)) else list(gain)
    budgeted = [{"budget": j, "q": j / 20, "expected_flops": 2e6 + (j - 1) * 0.25e6,
                 "test_top1": 80.0 + 0.1 * j + gains[j - 1]} for j in range(1, N_BUDGETS + 1)]
    rec: Dict[str, Any] = {
        "variant": variant, "weighting": "uniform" if variant == "uniform" else "l2w", "seed": seed,
        "model": "synthetic_net", "train_argv": ["--model", "synthetic_net", "--epochs", "1"],
        "code": {"commit": "0123456789abcdef", "timm_l2w_uncommitted_sha1": None},
        "settings": {"target_p_index": 15, "meta_interval": meta_interval},
        "wall_s": wall_s, "train_s": wall_s - 10, "flops": [2e6, 4e6, 8e6, 12e6, 16e6],
        "anytime": [{"exit": k + 1, "top1": 80.0 + k + anytime_gain} for k in range(5)],
        "budgeted": budgeted, "history": [],
    }
    if cpu_s is not None:  # the older study's files have neither cpu_s nor resumed
        rec["cpu_s"] = cpu_s
    if resumed is not None:
        rec["resumed"] = resumed
    if corr is not None:
        rec["weights_over_training"] = [
            {"step": 50 * (i + 1), "corr_loss_weight": c, "weight_mean": [1.0] * len(c),
             "weight_min": 0.5, "weight_max": 1.5} for i, c in enumerate(corr)]
    return rec


def _write(out: Path, records: Sequence[Dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        (out / f"{r['variant']}_seed{r['seed']}.json").write_text(json.dumps(r))


def _by_variant(records: Sequence[Dict[str, Any]]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    grouped: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r["variant"], {})[r["seed"]] = r
    return grouped


def test_paired_gain_interval_and_share_ahead():
    # seed 2's L2W run is behind at the first 10 budgets and ahead by 0.6 elsewhere
    seed2 = [-0.1] * 10 + [0.6] * (N_BUDGETS - 10)
    records = [_record("uniform", s) for s in range(3)] + [
        _record("l2w", 0, 0.2, anytime_gain=0.5), _record("l2w", 1, 0.4, anytime_gain=0.3),
        _record("l2w", 2, seed2, anytime_gain=0.1)]
    s = fidelity.summarize_records(_by_variant(records))
    c = s["comparisons"]["l2w"]
    g2 = sum(seed2) / N_BUDGETS
    assert c["paired_gain_per_seed"] == pytest.approx({0: 0.2, 1: 0.4, 2: g2})
    assert c["gain_by_budget_index_per_seed"] == pytest.approx({0: 0.2, 1: 0.4, 2: g2})
    assert c["paired_share_ahead_per_seed"] == pytest.approx({0: 1.0, 1: 1.0, 2: 29 / 39})
    pg = c["paired_mean_gain"]
    mean = (0.2 + 0.4 + g2) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in (0.2, 0.4, g2)) / 2)
    assert (pg["mean"], pg["std"], pg["n"]) == (pytest.approx(mean), pytest.approx(sd), 3)
    half = T_975_DF2 * sd / math.sqrt(3)
    assert pg["ci95_t"] == pytest.approx([mean - half, mean + half])
    lo, hi = pg["ci95_bootstrap"]  # resampled means of 3 seeds lie between the smallest and largest gain
    assert 0.2 - 1e-9 <= lo < mean < hi <= max(0.4, g2) + 1e-9
    # seed-mean curve: at the first 10 budgets (0.2 + 0.4 - 0.1) / 3 > 0, so ahead everywhere
    assert c["share_ahead"] == 1.0 and c["share_ahead_by_budget_index"] == 1.0
    assert c["mean_gain"] == pytest.approx(mean)
    assert [a["mean"] for a in c["anytime_gain"]] == pytest.approx([0.3] * 5)
    assert c["gain_at_training_q"]["q"] == 0.75
    assert c["gain_at_training_q"]["gain"]["mean"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)


def test_share_ahead_counts_budgets_behind():
    gain = [-0.3] * 13 + [0.3] * (N_BUDGETS - 13)
    records = [_record("uniform", 0), _record("l2w", 0, gain)]
    c = fidelity.summarize_records(_by_variant(records))["comparisons"]["l2w"]
    assert c["share_ahead"] == pytest.approx(26 / 39)
    assert c["share_ahead_by_budget_index"] == pytest.approx(26 / 39)
    assert c["mean_gain"] == pytest.approx(0.1)


def test_intervals_need_two_seeds():
    one = fidelity.mean_with_intervals([0.3])
    assert one == {"mean": 0.3, "std": 0.0, "n": 1, "ci95_t": None, "ci95_bootstrap": None}
    assert fidelity.mean_with_intervals([]) is None
    same = fidelity.mean_with_intervals([0.2, 0.2, 0.2])
    assert same["ci95_t"] == pytest.approx([0.2, 0.2]) and same["ci95_bootstrap"] == pytest.approx([0.2, 0.2])
    a, b = fidelity.mean_with_intervals([0.1, 0.5, 0.3, 0.7]), fidelity.mean_with_intervals([0.1, 0.5, 0.3, 0.7])
    assert a == b  # the bootstrap is seeded: the summary does not change between runs


def test_cost_ratio_pairs_seeds_and_leaves_out_resumed_runs():
    ref = {0: _record("uniform", 0, cpu_s=100.0), 1: _record("uniform", 1, cpu_s=110.0),
           2: _record("uniform", 2, cpu_s=120.0), 3: _record("uniform", 3, cpu_s=100.0, resumed=True)}
    runs = {0: _record("l2w", 0, cpu_s=350.0), 1: _record("l2w", 1, cpu_s=330.0),
            2: _record("l2w", 2, cpu_s=30.0, resumed=True), 3: _record("l2w", 3, cpu_s=400.0),
            4: _record("l2w", 4, cpu_s=300.0)}  # seed 4 has no equal-weighting run
    ratio = fidelity.cost_ratio(runs, ref, "cpu_s")
    assert ratio["per_seed"] == pytest.approx({0: 3.5, 1: 3.0})
    assert ratio["mean"] == pytest.approx(3.25) and (ratio["min"], ratio["max"]) == (3.0, 3.5)
    assert set(ratio["excluded"]) == {2, 3} and "resumed" in ratio["excluded"][2]
    costs = fidelity.run_costs(runs)
    assert costs["resumed_seeds"] == [2]
    assert costs["cpu_s_stats"]["n"] == 4 and costs["cpu_s_stats"]["mean"] == pytest.approx(345.0)
    # files without cpu_s (the older study): no CPU ratio, the wall-clock ratio still works
    old = {0: _record("l2w", 0, cpu_s=None, resumed=None, wall_s=600.0)}
    old_ref = {0: _record("uniform", 0, cpu_s=None, resumed=None, wall_s=150.0)}
    assert fidelity.cost_ratio(old, old_ref, "cpu_s")["mean"] is None
    assert fidelity.cost_ratio(old, old_ref, "wall_s")["per_seed"] == {0: 4.0}


def test_predictor_end_and_trajectory():
    runs = {0: _record("l2w", 0, corr=[[0.3, 0.5], [-0.2, 0.6], [-0.8, 0.7]]),
            1: _record("l2w", 1, corr=[[-0.1, -0.5], [-0.4, 0.2], [-0.6, 0.9]])}
    p = fidelity.predictor_summary(runs)
    assert p["steps"] == [50, 100, 150] and p["end_step"] == {0: 150, 1: 150}
    assert p["corr_end"]["mean"] == pytest.approx([-0.7, 0.8])
    assert (p["corr_end"]["min"], p["corr_end"]["max"]) == (pytest.approx([-0.8, 0.7]), pytest.approx([-0.6, 0.9]))
    assert p["corr_mean_over_steps"][0] == pytest.approx([0.1, 0.0])
    # exit 1: seed mean +0.1, -0.3, -0.7 -> negative from step 100; exit 2: 0.0, +0.4, +0.8 -> from step 100
    assert p["sign_settled_from_step"] == [100, 100]
    assert fidelity.predictor_summary({0: _record("l2w", 0)}) is None


def test_variants_ordered_by_interval_and_labelled():
    records = [_record("uniform", 0), _record("l2w_int100", 0, 0.1, meta_interval=100),
               _record("l2w", 0, 0.5), _record("l2w_int10", 0, 0.3, meta_interval=10)]
    s = fidelity.summarize_records(_by_variant(records))
    assert s["variants"] == ["uniform", "l2w", "l2w_int10", "l2w_int100"]
    assert s["labels"]["l2w_int10"] == "L2W, meta interval 10"
    assert {v: c["mean_gain"] for v, c in s["comparisons"].items()} == pytest.approx(
        {"l2w": 0.5, "l2w_int10": 0.3, "l2w_int100": 0.1})


def test_mixed_models_are_refused():
    other = _record("l2w", 0)
    other["model"] = "another_net"
    with pytest.raises(ValueError, match="mix models"):
        fidelity.summarize_records(_by_variant([_record("uniform", 0), other]))


def test_summarize_only_on_partial_results(tmp_path, capsys):
    out = tmp_path / "study"
    _write(out, [_record("uniform", 0, cpu_s=100.0), _record("l2w", 0, 0.4, cpu_s=330.0),
                 _record("uniform", 1, cpu_s=100.0, resumed=True), _record("l2w", 1, 0.2, cpu_s=340.0)])
    (out / "runs" / "l2w_int10_seed0" / "checkpoints" / "step_00000450").mkdir(parents=True)
    (out / "runs" / "l2w_int10_seed0" / "checkpoints" / "step_00000450" / "COMPLETE").write_text("")
    code = fidelity.main(["--summarize-only", "--out", str(out), "--seeds", "0", "1", "2",
                          "--variants", "l2w", "uniform", "l2w_int10"])
    assert code == 0
    printed = capsys.readouterr().out
    assert ("missing result files: l2w seeds 2; uniform seeds 2; l2w_int10: no runs (seed 0 at checkpoint step 450)"
            in printed)
    s = json.loads((out / "summary.json").read_text())
    assert s["missing"]["l2w_int10"] == {"seeds": [0, 1, 2], "checkpoint_step": {"0": 450}}
    assert s["seeds"] == {"uniform": [0, 1], "l2w": [0, 1]}
    c = s["comparisons"]["l2w"]
    assert c["cost_ratio_cpu"]["per_seed"] == {"0": 3.3} and "1" in c["cost_ratio_cpu"]["excluded"]
    md = (out / "summary.md").read_text()
    assert "| equal weighting | 2 | [1] |" in md  # the resumed run is flagged in the cost table
    assert "3.30x (0: 3.30x); left out: seed 1 (resumed run" in md
    assert "+0.300 ± 0.141" in md and "## Predictor" in md
    for name in ("l2w_vs_uniform.png", "gain_vs_cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_seed_says_no_interval(tmp_path):
    out = tmp_path / "one"
    _write(out, [_record("uniform", 0), _record("l2w", 0, 0.25)])
    s = fidelity.summarize(out, [0])
    assert s["comparisons"]["l2w"]["paired_mean_gain"]["ci95_t"] is None
    assert "| L2W, meta interval 1 | 1 | +0.250 | 100% | +0.250 | n/a (n < 2) | n/a (n < 2) |" in (
        out / "summary.md").read_text()


def test_nothing_to_compare_says_what_is_there(tmp_path, capsys):
    out = tmp_path / "only_l2w"
    _write(out, [_record("l2w", 0)])
    assert fidelity.summarize(out, [0, 1], ["l2w", "uniform"]) is None
    printed = capsys.readouterr().out
    assert "uniform: no runs" in printed and "l2w: seeds [0]" in printed
    assert not (out / "summary.json").exists()


def test_unreadable_result_file_is_named(tmp_path):
    out = tmp_path / "broken"
    out.mkdir()
    (out / "uniform_seed0.json").write_text('{"variant": "uni')
    with pytest.raises(SystemExit, match="uniform_seed0.json is not a readable result file"):
        fidelity.load_records(out, [0])


def test_variant_without_a_paired_seed_gets_no_paired_numbers(tmp_path):
    out = tmp_path / "unpaired"
    _write(out, [_record("uniform", 0), _record("l2w", 1, 0.5)])
    s = fidelity.summarize(out, [0, 1])
    c = s["comparisons"]["l2w"]
    assert c["mean_gain"] == pytest.approx(0.5) and c["seeds_paired"] == []
    assert c["paired_mean_gain"] is None and c["cost_ratio_cpu"]["mean"] is None
    assert s["missing"] == {"l2w": {"seeds": [0], "checkpoint_step": {}},
                            "uniform": {"seeds": [1], "checkpoint_step": {}}}
    assert "| L2W, meta interval 1 | 0 | +0.500 | 100% | n/a | n/a | n/a |" in (out / "summary.md").read_text()


def test_method_variants_and_exit_rules_are_summarized():
    """Issue 15's runs: the method variants are compared with equal weighting like the L2W variants, and
    each variant's other exit rules are read at the FLOPs of every exit inside the range they cover."""
    recs = []
    for s in (0, 1):
        recs.append(_record("uniform", s))
        method = _record("uniform_ge_kd", s, gain=0.5 + s)
        method["weighting"] = "uniform"
        # patience: one budget per p, 3.0 MFLOPs (p = 1) .. 12.0 MFLOPs (p = 5), accuracy 70 + MFLOPs
        method["budgeted_rules"] = {"patience": [{"patience": p, "expected_flops": (3.0 + 2.25 * (p - 1)) * 1e6,
                                                  "test_top1": 70.0 + 3.0 + 2.25 * (p - 1) + s} for p in range(1, 6)]}
        recs.append(method)
    s = fidelity.summarize_records(_by_variant(recs))
    assert s["labels"]["uniform_ge_kd"] == "equal weighting + GE + KD"
    assert s["comparisons"]["uniform_ge_kd"]["paired_mean_gain"]["mean"] == pytest.approx(1.0)
    table = s["exit_rules"]["table"]
    assert set(table["uniform"]) == {"confidence"}  # no other rules in its files
    pat = table["uniform_ge_kd"]["patience"]
    at = pat["at_exit_mflops"]  # exits at 2, 4, 8, 12, 16 MFLOPs; the curve covers 3-12
    assert at[0] is None and at[4] is None
    assert at[1]["mean"] == pytest.approx(70 + 4 + 0.5) and at[3]["mean"] == pytest.approx(70 + 12 + 0.5)
    assert pat["mean_on_grid"] is None  # the grid starts at 2 MFLOPs, below the patience curve
    md = fidelity._markdown({**s, "missing": {}})
    assert "| equal weighting + GE + KD | patience | n/a | n/a | 74.50 ± 0.71 |" in md

"""Latency budgets: the expected-latency model, the policy chosen for a budget in ms, the table in the policy file,
and the table measured from the predictor's own loop. No timing is asserted (timings: benchmarks/latency_budget.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.helpers import CountingModel, TinyMultiExit
from timm_l2w.evaluation import ExitOutputs, budgeted_evaluation
from timm_l2w.inference import EarlyExitPredictor
from timm_l2w.inference.latency import measure_latency_table
from timm_l2w_runtime.latency import (
    StageClock,
    TimingRule,
    check_latency_table,
    expected_latency_ms,
    interpolate_ms,
    latency_table_text,
    measure_stages,
)
from timm_l2w_runtime.policy import PolicyError, check_policy, read_policy


def small_table(**changes):
    """Two stages timed at batch 1 and 2 (ms per batch)."""
    table = {"target": "torch", "device": {"name": "test cpu"}, "model": None, "num_exits": 2,
             "input_size": [1, 8, 8], "rule": "confidence", "batch_sizes": [1, 2],
             "stage_ms": [[1.0, 1.6], [2.0, 3.0]], "stage_repeat_ms": [[0.8, 1.4], [2.0, 3.0]],
             "gather_ms": [[0.0, 0.0], [0.1, 0.15]], "call_ms": [0.2, 0.3]}
    table.update(changes)
    return table


def test_expected_latency_is_the_hand_computation_on_a_small_table():
    # half the images leave at exit 1: stage 2 is reached with probability 1/2
    fractions = [[0.5, 0.5], [1.0, 0.0]]
    # batch 1: call(1) + t_0(1) + 1/2 t_1(1), where stage 1 costs its repeat time r_0(1) when the image before
    # left at exit 1 (probability 1/2 for the first policy, 1 for the second)
    assert expected_latency_ms(small_table(), fractions, 1) == pytest.approx(
        [0.2 + (0.5 * 0.8 + 0.5 * 1.0) + 0.5 * 2.0, 0.2 + 0.8])
    # batch 2: call(2) + T_0(2) + P(one reaches stage 2) (t_1(1) + g_1(1)) + P(both reach it) t_1(2), per image
    # (the gather is paid when one of the two left at exit 1; the batch before sent nobody on with
    # probability 1/4; the second policy never runs stage 2)
    per_batch = 0.3 + (0.25 * 1.4 + 0.75 * 1.6) + 0.5 * (2.0 + 0.1) + 0.25 * 3.0
    assert expected_latency_ms(small_table(), fractions, 2) == pytest.approx([per_batch / 2, (0.3 + 1.4) / 2])
    assert expected_latency_ms(small_table(), fractions[0], 2) == pytest.approx(per_batch / 2)  # one policy: a number


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_expected_latency_is_the_mean_over_every_way_two_batches_can_leave(batch_size):
    """Enumerate the exits of a batch and of the batch before it (which decides r or t) for three stages."""
    table = small_table(num_exits=3, batch_sizes=[1, 2, 4], stage_ms=[[1, 1.5, 2.5], [2, 3, 5], [3, 4, 6]],
                        stage_repeat_ms=[[0.5, 1, 2], [1.5, 2, 4], [3, 4, 6]],
                        gather_ms=[[0, 0, 0], [0.1, 0.2, 0.3], [0.2, 0.3, 0.5]], call_ms=[0.5, 0.6, 0.8])
    fractions = np.array([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.0, 0.0, 1.0]])

    def ms(key, k, n):
        return float(interpolate_ms(table["batch_sizes"], table[key][k], [n])[0])

    def mean_over_batches(f):
        total = 0.0
        for before in itertools.product(range(3), repeat=batch_size):
            for now in itertools.product(range(3), repeat=batch_size):
                p = np.prod([f[e] for e in before + now])
                cost = float(interpolate_ms(table["batch_sizes"], table["call_ms"], [batch_size])[0])
                running = batch_size
                for k in range(3):
                    n = sum(e >= k for e in now)
                    if n == 0:
                        break
                    cost += ms("stage_repeat_ms" if max(before) <= k else "stage_ms", k, n)
                    cost += ms("gather_ms", k, n) if n < running else 0.0
                    running = n
                total += p * cost
        return total / batch_size

    expected = expected_latency_ms(table, fractions, batch_size)
    assert expected == pytest.approx([mean_over_batches(f) for f in fractions])


def test_the_table_is_piecewise_linear_in_the_batch_size_held_below_and_per_image_above():
    ms = interpolate_ms([2, 4], [[1.0, 3.0]], [1, 2, 3, 4, 8])
    assert ms.tolist() == [[1.0, 1.0, 2.0, 3.0, 6.0]]


def test_a_table_that_does_not_fit_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="times 2 stages but the model has 3 exits"):
        check_latency_table(small_table(), num_exits=3)
    with pytest.raises(ValueError, match="stage_ms must be 2 x 2"):
        check_latency_table(small_table(stage_ms=[[1.0], [2.0]]))
    with pytest.raises(ValueError, match="batch_sizes must be increasing"):
        check_latency_table(small_table(batch_sizes=[2, 1]))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        expected_latency_ms(small_table(), [0.5, 0.5], 0)


@pytest.fixture(scope="module")
def calibrated():
    """A three-exit model, its held-out outputs (later exits more accurate), a table and the 39 candidates."""
    torch.manual_seed(0)
    model = TinyMultiExit(num_exits=3, num_classes=5, in_chans=1, width=4).eval()
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 5, (200,), generator=gen)
    onehot = torch.nn.functional.one_hot(targets, 5).float()
    logits = [torch.randn(200, 5, generator=gen) + (1 + k) * 2 * onehot * torch.rand(200, 1, generator=gen)
              for k in range(3)]
    heldout = ExitOutputs.from_logits(logits, targets)
    heldout.input_size = (1, 8, 8)
    table = small_table(num_exits=3, input_size=[1, 8, 8], stage_ms=[[1.0, 1.6], [2.0, 3.0], [4.0, 6.0]],
                        stage_repeat_ms=[[0.8, 1.4], [1.8, 2.8], [4.0, 6.0]],
                        gather_ms=[[0.0, 0.0], [0.1, 0.15], [0.1, 0.15]])
    flops = [1e6, 2e6, 4e6]
    return model, heldout, table, flops


@pytest.mark.parametrize("batch_size", [1, 2, 8])
@pytest.mark.parametrize("rule", ["confidence", "patience"])
def test_from_latency_budget_picks_the_most_accurate_candidate_within_the_budget(calibrated, rule, batch_size):
    model, heldout, table, flops = calibrated
    candidates = budgeted_evaluation(heldout, heldout, flops, rule=rule)
    ms = expected_latency_ms(table, candidates.heldout_exit_fractions.numpy(), batch_size)
    top1 = candidates.heldout_top1.numpy()
    assert np.unique(np.round(ms, 6)).size > 2  # the candidates cost different amounts
    chosen = set()
    for budget in np.linspace(ms.min(), ms.max(), 6):
        predictor = EarlyExitPredictor.from_latency_budget(model, heldout, table, float(budget), batch_size,
                                                           rule=rule, flops=flops)
        expected = float(expected_latency_ms(table, predictor.calibration_fractions, batch_size))
        assert expected <= budget + 1e-9
        # nothing that fits is more accurate than the choice
        rows = [i for i in range(len(ms)) if np.allclose(candidates.heldout_exit_fractions[i].numpy(),
                                                         predictor.calibration_fractions)]
        assert rows and top1[rows].max() == pytest.approx(top1[ms <= budget + 1e-9].max())
        assert predictor.budget == {"latency_ms": float(budget), "batch_size": batch_size}
        assert predictor.latency["stage_ms"] == table["stage_ms"]
        chosen.add(tuple(np.round(predictor.calibration_fractions, 6)))
    assert len(chosen) > 1  # larger budgets choose other policies


def test_a_latency_budget_below_the_cheapest_candidate_names_it(calibrated):
    model, heldout, table, flops = calibrated
    cheapest = float(expected_latency_ms(table, budgeted_evaluation(heldout, heldout, flops)
                                         .heldout_exit_fractions.numpy(), 1).min())
    with pytest.raises(ValueError, match=f"cheapest candidate needs {cheapest:.4g} ms; raise the budget"):
        EarlyExitPredictor.from_latency_budget(model, heldout, table, cheapest * 0.9, flops=flops)
    with pytest.raises(ValueError, match="measured on 1x16x16 images but the calibration outputs come from 1x8x8"):
        EarlyExitPredictor.from_latency_budget(model, heldout, dict(table, input_size=[1, 16, 16]), 10.0, flops=flops)
    with pytest.raises(ValueError, match="budget_ms must be > 0, got -1"):
        EarlyExitPredictor.from_latency_budget(model, heldout, table, -1.0, flops=flops)


def test_the_policy_file_carries_the_table_through_save_load_and_the_torch_free_check(calibrated, tmp_path):
    model, heldout, table, flops = calibrated
    predictor = EarlyExitPredictor.from_latency_budget(model, heldout, table, 6.0, batch_size=2, flops=flops)
    path = predictor.save(tmp_path / "policy.json", input_size=(1, 8, 8))
    doc = read_policy(path)  # the runtime's reader: numpy only
    assert doc["budget"] == {"latency_ms": 6.0, "batch_size": 2}
    assert doc["latency"]["stage_ms"] == table["stage_ms"] and doc["latency"]["device"] == {"name": "test cpu"}
    assert doc["expected_latency_ms"] == pytest.approx(
        float(expected_latency_ms(table, predictor.calibration_fractions, 2)))
    assert doc["expected_latency_ms"] <= 6.0
    loaded = EarlyExitPredictor.load(path, model)
    assert loaded.latency == doc["latency"] and loaded.budget == doc["budget"]
    assert loaded.to_policy()["expected_latency_ms"] == pytest.approx(doc["expected_latency_ms"])
    with pytest.raises(PolicyError, match="latency.stage_ms must be 3 x 2"):
        check_policy(dict(doc, latency=dict(doc["latency"], stage_ms=[[1.0, 2.0]])))
    with pytest.raises(PolicyError, match="times 2 stages but the model has 3 exits"):
        check_policy(dict(doc, latency=small_table()))


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_the_table_times_every_stage_of_the_predictors_loop_on_whole_batches(rule):
    model = CountingModel(num_exits=3, num_classes=4, in_chans=1, width=4)
    table = measure_latency_table(model, (1, 8, 8), batch_sizes=(3, 1), rule=rule, repeats=2, warmup=1, rounds=2)
    assert table["batch_sizes"] == [1, 3] and table["rule"] == rule and table["target"] == "torch"
    assert table["rounds"] == 2 and table["round_spread"] >= 0
    assert all(np.asarray(table[key]).shape == (3, 2) for key in ("stage_ms", "stage_repeat_ms", "gather_ms"))
    assert table["stage_repeat_ms"][2] == table["stage_ms"][2]  # the last stage always follows the others
    assert min(map(min, table["stage_ms"])) > 0 and table["gather_ms"][0] == [0.0, 0.0]
    assert table["device"]["device"] == "cpu" and table["device"]["threads"] == torch.get_num_threads()
    assert table["input_size"] == [1, 8, 8] and table["num_exits"] == 3
    # per round and batch size, 1 + 2 calls where nobody left early (three stages on the whole batch), then calls
    # where everybody leaves at exit 1, then at exit 2; the second round after the first
    assert model.calls == [(k, b) for _ in range(2) for b in (1, 3) for stages in (3, 1, 2) for _ in range(1 + 2)
                           for k in range(stages)]
    assert "forward_stage" not in vars(model)  # the model itself is untouched
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        measure_latency_table(model, (1, 8, 8), repeats=0)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        measure_latency_table(model, (1, 8, 8), rounds=0)


def test_the_table_holds_the_slowest_rounds_medians_and_how_far_apart_the_rounds_were():
    """A fake loop of two stages on a fake clock: stage k costs (k + 1) ms per image, twice that in the first
    round (a slower machine), and one timed call of the second round stalls for 100 ms."""
    now, calls = [0.0], []
    stage_clock = StageClock(clock=lambda: now[0])

    class NobodyLeaves:
        def leave(self, k, logits, conf, pred, params, memory=None):
            return np.zeros(1, dtype=bool), memory

    timing_rule = TimingRule(NobodyLeaves())

    def predict(x):  # per round: batch 1 then 4, each (1 untimed + 3 timed) x (nobody leaves, all leave at exit 1)
        slow = 2.0 if len(calls) < 16 else 1.0
        now[0] += 0.1 if len(calls) == 17 else 0.0  # a stall before stage 1 of a timed call in round 2
        calls.append(len(x))
        for k in range(2):
            stage_clock.mark()
            now[0] += slow * (k + 1) * len(x) * 1e-3
            if timing_rule.leave(k, None, None, None, None)[0].all():
                break

    timings = measure_stages(predict, lambda b: np.zeros((b, 1)), stage_clock, timing_rule, [1, 4], num_exits=2,
                             repeats=3, warmup=1, rounds=2)
    assert calls == [1] * 8 + [4] * 8 + [1] * 8 + [4] * 8
    assert np.allclose(timings["stage_ms"], [[2.0, 8.0], [4.0, 16.0]])  # the first round's: the slower one
    assert np.allclose(timings["stage_repeat_ms"], [[2.0, 8.0], [4.0, 16.0]])
    assert np.allclose(timings["call_ms"], [0.0, 0.0]) and np.allclose(timings["gather_ms"], 0.0)  # no stall kept
    assert timings["rounds"] == 2 and timings["round_spread"] == pytest.approx(1.0)  # one round took twice the other
    table = check_latency_table({"target": "torch", "num_exits": 2, "rule": "confidence", **timings})
    text = latency_table_text(dict(table, repeats=3))
    assert "slowest of 2 rounds' medians of 3 runs, the rounds 100% apart" in text
    assert "this machine's speed moved while it was measured" in text  # over 10% apart: the note says so
    assert "speed moved" not in latency_table_text(dict(table, repeats=3, round_spread=0.05))
    with pytest.raises(ValueError, match="round_spread must be a finite number >= 0"):
        check_latency_table(dict(table, round_spread=-0.5))


def test_the_table_of_a_model_whose_state_is_a_nest_of_tensors():
    from tests.helpers import small_ranet

    model = small_ranet().eval()  # its state: {"starts": {level: map}, "outs": [maps]}
    table = measure_latency_table(model, (3, 32, 32), batch_sizes=[2], repeats=1, warmup=0)
    assert np.asarray(table["gather_ms"]).shape == (model.num_exits, 1) and min(table["gather_ms"][1]) > 0

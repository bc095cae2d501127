"""Entropy and patience exit rules (issue 15): vectorised code against per-sample reference loops,
budgeted evaluation, real early exit and the `timm-l2w eval --exit-rule` flag."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import TinyMultiExit
from timm_l2w.evaluation import ExitOutputs, budgeted_evaluation
from timm_l2w.exits import (
    agreement_run_lengths,
    calibrate_entropy_thresholds_batch,
    exit_by_entropy,
    exit_by_patience,
    exit_distribution,
    predictive_entropy,
)
from timm_l2w.inference import EarlyExitPredictor


def ref_entropy(logits_row):
    p = [math.exp(v) for v in logits_row]
    z = sum(p)
    return -sum(v / z * math.log(v / z) for v in p if v > 0)


def ref_entropy_thresholds(ent, p):
    """Per-sample loop: at each exit the floor(n p_k) lowest-entropy remaining samples leave; T_k is the
    entropy of the last of them; every remaining sample with H <= T_k counts as exited."""
    n, K = ent.shape
    remaining = set(range(n))
    T = [-math.inf] * (K - 1) + [math.inf]
    for k in range(K - 1):
        m = math.floor(n * float(p[k]))
        order = sorted(remaining, key=lambda i: (float(ent[i, k]), i))
        if m == 0 or len(order) < m:
            continue
        T[k] = float(ent[order[m - 1], k])
        remaining = {i for i in remaining if not float(ent[i, k]) <= T[k]}
    return T


def ref_exit_entropy(ent, T):
    return [next((k for k in range(len(T) - 1) if float(ent[i, k]) <= T[k]), len(T) - 1) for i in range(ent.shape[0])]


def ref_exit_patience(pred, patience):
    out = []
    for row in pred.tolist():
        run, exit_k = 0, len(row) - 1
        for k, c in enumerate(row):
            run = run + 1 if k > 0 and c == row[k - 1] else 1
            if run >= patience:
                exit_k = k
                break
        out.append(exit_k)
    return out


def test_predictive_entropy_matches_formula():
    logits = torch.randn(7, 5) * 3
    got = predictive_entropy(logits)
    assert torch.allclose(got.double(), torch.tensor([ref_entropy(r) for r in logits.tolist()], dtype=torch.float64),
                          atol=1e-5)
    assert float(predictive_entropy(torch.zeros(1, 4))) == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("K,ties", [(3, False), (4, True), (5, False)])
def test_entropy_rule_matches_reference_loop(K, ties):
    torch.manual_seed(K)
    ent = torch.rand(60, K)
    if ties:
        ent = (ent * 4).round() / 4  # many equal entropies
    for q in (0.3, 1.0, 1.7):
        p = exit_distribution(q, K)
        T = calibrate_entropy_thresholds_batch(ent, p[None])[0]
        assert T.tolist() == ref_entropy_thresholds(ent, p)
        assert exit_by_entropy(ent, T).tolist() == ref_exit_entropy(ent, T)
    # a stack of budgets gives the rows one by one
    stack = torch.stack([exit_distribution(q, K) for q in (0.5, 1.5)])
    rows = calibrate_entropy_thresholds_batch(ent, stack)
    assert torch.equal(exit_by_entropy(ent, rows)[1], exit_by_entropy(ent, rows[1]))


def test_patience_rule_matches_reference_loop():
    torch.manual_seed(0)
    pred = torch.randint(0, 3, (80, 5))
    runs = agreement_run_lengths(pred)
    for i in range(80):
        r = 1
        for k in range(5):
            r = r + 1 if k and pred[i, k] == pred[i, k - 1] else 1
            assert int(runs[i, k]) == r
    for p in (1, 2, 3, 5, 6):
        assert exit_by_patience(pred, p).tolist() == ref_exit_patience(pred, p), p
    stack = exit_by_patience(pred, [1, 2, 3])
    assert stack.shape == (3, 80) and torch.equal(stack[1], exit_by_patience(pred, 2))
    assert (exit_by_patience(pred, 1) == 0).all()
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        exit_by_patience(pred, 0)
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        exit_by_patience(pred, 1.5)


def _outputs(n, K, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, C, generator=g) * (k + 1) for k in range(K)]
    return ExitOutputs.from_logits(logits, torch.randint(0, C, (n,), generator=g)), logits


def test_budgeted_evaluation_entropy_and_patience_match_reference():
    K = 4
    held, held_logits = _outputs(50, K, seed=1)
    test, test_logits = _outputs(40, K, seed=2)
    assert torch.allclose(held.entropies, torch.stack([predictive_entropy(logit) for logit in held_logits], 1))
    flops = [1.0, 2.0, 3.0, 4.0]
    dist = torch.stack([exit_distribution(q, K) for q in (0.4, 1.0, 1.8)])
    res = budgeted_evaluation(held, test, flops, dist, rule="entropy")
    assert res.rule == "entropy"
    for b in range(3):
        T = ref_entropy_thresholds(held.entropies, dist[b])
        assert res.thresholds[b].tolist() == T
        exits = ref_exit_entropy(test.entropies, T)
        top1 = 100 * sum(int(test.predictions[i, e] == test.targets[i]) for i, e in enumerate(exits)) / 40
        assert float(res.test_top1[b]) == pytest.approx(top1)
        assert float(res.expected_flops[b]) == pytest.approx(sum(flops[e] for e in exits) / 40)
    pat = budgeted_evaluation(held, test, flops, rule="patience")
    assert pat.patience.tolist() == [1, 2, 3, 4] and math.isnan(float(pat.thresholds[0, 0]))
    for b, p in enumerate(range(1, K + 1)):
        exits = ref_exit_patience(test.predictions, p)
        top1 = 100 * sum(int(test.predictions[i, e] == test.targets[i]) for i, e in enumerate(exits)) / 40
        assert float(pat.test_top1[b]) == pytest.approx(top1)
        assert float(pat.expected_flops[b]) == pytest.approx(sum(flops[e] for e in exits) / 40)
    assert float(pat.expected_flops[0]) == 1.0 and float(pat.expected_flops[-1]) == 4.0  # p=1 first exit, p=K last
    assert pat.rows()[2]["patience"] == 3 and pat.rows()[0]["rule"] == "patience"
    with pytest.raises(ValueError, match="patience"):
        budgeted_evaluation(held, test, flops, dist, rule="patience")
    with pytest.raises(ValueError, match="unknown exit rule"):
        budgeted_evaluation(held, test, flops, rule="margin")
    bare = ExitOutputs(held.confidences, held.predictions, held.top5, held.losses, held.targets)
    with pytest.raises(ValueError, match="no entropies"):
        budgeted_evaluation(bare, test, flops, rule="entropy")
    # confidence stays the default and unchanged
    conf = budgeted_evaluation(held, test, flops, dist)
    assert conf.rule == "confidence" and conf.patience is None


def _forward_outputs(model, x):
    model.eval()
    with torch.no_grad():
        return ExitOutputs.from_logits(model.forward_exits(x), torch.zeros(len(x), dtype=torch.long))


@pytest.mark.parametrize("rule", ["entropy", "patience"])
def test_early_exit_predictor_matches_simulated_rule(rule):
    torch.manual_seed(3)
    model = TinyMultiExit(num_exits=4, num_classes=3, in_chans=3, width=6)
    calib, test_x = _forward_outputs(model, torch.randn(40, 3, 10, 10)), torch.randn(37, 3, 10, 10)
    full = _forward_outputs(model, test_x)
    rows, seen = torch.arange(len(test_x)), set()
    settings = [0.3, 0.8, 1.5] if rule == "entropy" else [1, 2, 3, 4]
    for s in settings:
        if rule == "entropy":
            predictor = EarlyExitPredictor.from_distribution(model, calib, s, rule="entropy")
            simulated = exit_by_entropy(full.entropies, predictor.thresholds)
        else:
            predictor = EarlyExitPredictor(model, rule="patience", patience=s)
            simulated = exit_by_patience(full.predictions, s)
        got = predictor.predict(test_x, batch_size=16)
        assert torch.equal(got.exit_index, simulated), s
        assert torch.equal(got.predictions, full.predictions[rows, simulated])
        seen |= set(simulated.tolist())
    assert len(seen) > 1


def test_predictor_rule_arguments_and_flops_budget():
    model = TinyMultiExit(num_exits=3, num_classes=3, in_chans=3)
    calib = _forward_outputs(model, torch.randn(30, 3, 8, 8))
    with pytest.raises(ValueError, match="patience=p"):
        EarlyExitPredictor(model, rule="patience")
    with pytest.raises(ValueError, match="no thresholds to calibrate"):
        EarlyExitPredictor.from_distribution(model, calib, 1.0, rule="patience")
    with pytest.raises(ValueError, match="needs one threshold per exit"):
        EarlyExitPredictor(model, rule="entropy")
    pred = EarlyExitPredictor.from_flops_budget(model, calib, [1.0, 2.0, 3.0], 3.0, rule="patience")
    assert pred.rule == "patience" and 1 <= pred.patience <= 3
    ent = EarlyExitPredictor.from_flops_budget(model, calib, [1.0, 2.0, 3.0], 2.0, rule="entropy")
    assert ent.rule == "entropy" and ent.thresholds.shape == (3,)


def test_a_new_rule_is_one_class_in_the_registry(monkeypatch):
    """The walkthrough of docs/architecture.md: a rule defined and registered on its own (a top-2 margin,
    with a signal ExitOutputs has no field for) works in budgeted evaluation and in the predictor."""
    from timm_l2w.exits import RULES, ExitRule, calibrate_thresholds_batch, exit_by_threshold

    class MarginRule(ExitRule):
        name, signal = "margin", "margins"

        def score(self, logits):
            top = torch.softmax(logits.detach().float(), dim=-1).topk(2, dim=-1).values
            return top[..., 0] - top[..., 1]

        def calibrate(self, signal, distributions):
            return calibrate_thresholds_batch(signal, distributions)

        def exits(self, signal, params):
            return exit_by_threshold(signal, params)

        def leave(self, k, logits, conf, pred, params, memory=None):
            return self.score(logits).double() >= params[k], None

    monkeypatch.setitem(RULES, "margin", MarginRule())
    torch.manual_seed(3)
    model = TinyMultiExit(num_exits=4, num_classes=3, in_chans=3, width=6)
    calib, test_x = _forward_outputs(model, torch.randn(40, 3, 10, 10)), torch.randn(37, 3, 10, 10)
    full = _forward_outputs(model, test_x)
    assert full.signal("margin").shape == (37, 4)
    res = budgeted_evaluation(calib, full, [1.0, 2.0, 3.0, 4.0], rule="margin")
    assert res.rule == "margin" and len(res) == 39
    predictor = EarlyExitPredictor.from_distribution(model, calib, 1.0, rule="margin")
    simulated = exit_by_threshold(full.signal("margin"), predictor.thresholds)
    assert torch.equal(predictor.predict(test_x, batch_size=16).exit_index, simulated)
    assert len(set(simulated.tolist())) > 1


def test_cli_eval_exit_rule(tmp_path, monkeypatch, capsys):
    import timm
    from safetensors.torch import save_file

    from timm_l2w.cli import main as cli_main

    trained = TinyMultiExit(num_exits=3, num_classes=10, in_chans=3)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(ckpt))
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: TinyMultiExit(num_exits=3, **kw))
    for rule, budgets in (("entropy", 39), ("patience", 3)):
        out = tmp_path / rule
        rc = cli_main(["eval", str(ckpt), "--model", "tiny", "--dataset", "digits", "--img-size", "8",
                       "--output", str(out), "--device", "cpu", "--no-progress", "--exit-rule", rule])
        assert rc == 0
        assert f"(exit rule: {rule})" in capsys.readouterr().out
        data = json.loads((out / "tiny.json").read_text())
        assert data["exit_rule"] == rule and len(data["budgeted"]) == budgets
        assert {r["rule"] for r in data["budgeted"]} == {rule}
    with pytest.raises(SystemExit):
        cli_main(["eval", str(ckpt), "--model", "tiny", "--exit-rule", "margin"])

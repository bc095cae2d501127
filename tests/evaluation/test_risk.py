"""Risk-controlled exit policies (docs/risk.md): the bounds against closed forms and exact sums, the fixed-sequence
choice, and the guarantee itself: over many calibration draws, the chosen policy's true risk exceeds EPS in at most
a DELTA share of them (plus sampling slack), while a choice without the bound does so far more often."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from timm_l2w.evaluation import ExitOutputs
from timm_l2w.evaluation.risk import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    fixed_sequence_choice,
    risk_controlled_choice,
    risk_losses,
    risk_upper_bounds,
    top1_drop_upper,
)
from timm_l2w.exits import exit_rule

FLOPS = [1.0, 2.0, 3.0, 4.0]


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) > k)`` by scipy (large ``n``; accurate for tiny tails)."""
    from scipy.stats import binom

    return float(binom.sf(k, n, p))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)`` as the plain sum (the specification, not scipy)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


# ----------------------------------------------------------------------------- the bounds


def test_clopper_pearson_matches_closed_forms_a_table_value_and_the_binomial_sum():
    delta = 0.1
    n = torch.tensor([1, 7, 50, 400])
    assert torch.allclose(clopper_pearson_upper(0, n, delta), 1 - delta ** (1 / n.double()), atol=1e-12)
    assert torch.allclose(clopper_pearson_upper(n - 1, n, delta), (1 - delta) ** (1 / n.double()), atol=1e-12)
    assert torch.equal(clopper_pearson_upper(n, n, delta), torch.ones(4, dtype=torch.float64))
    assert torch.equal(clopper_pearson_lower(0, n, delta), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(clopper_pearson_lower(n, n, delta), delta ** (1 / n.double()), atol=1e-12)
    assert float(clopper_pearson_upper(1, 10, 0.05)) == pytest.approx(0.3942, abs=1e-4)  # 1/10, exact 90% CI's top
    assert float(clopper_pearson_lower(1, 10, 0.05)) == pytest.approx(0.0051, abs=1e-4)  # and its bottom
    for k, size in [(0, 30), (3, 20), (12, 40), (29, 30)]:
        upper = float(clopper_pearson_upper(k, size, delta))
        assert binomial_cdf(k, size, upper) == pytest.approx(delta, abs=1e-9)  # P(Bin(n, u) <= k) = delta
        assert binomial_cdf(k, size, upper + 1e-6) < delta < binomial_cdf(k, size, upper - 1e-6)
        lower = float(clopper_pearson_lower(k + 1, size, delta))
        assert 1 - binomial_cdf(k, size, lower) == pytest.approx(delta, abs=1e-9)  # P(Bin(n, l) >= k + 1) = delta


def test_the_top1_drop_bound_is_the_worse_share_upper_bound_minus_the_better_share_lower_bound():
    worse, better, n, delta = torch.tensor([0, 4, 30, 10]), torch.tensor([0, 1, 28, 30]), 300, 0.1
    want = clopper_pearson_upper(worse, n, delta / 2) - clopper_pearson_lower(better, n, delta / 2)
    assert torch.equal(top1_drop_upper(worse, better, n, delta), want)
    assert ((worse - better) / n < want).all()
    losses = torch.zeros(4, n, dtype=torch.float64)  # the same counts as per-image losses in {-1, 0, 1}
    for row, (w, b) in enumerate(zip(worse.tolist(), better.tolist())):
        losses[row, :w], losses[row, w:w + b] = 1, -1
    assert torch.equal(risk_upper_bounds("top1-drop", losses, delta), want)
    assert torch.equal(risk_upper_bounds("disagreement", losses.abs(), delta),
                       clopper_pearson_upper(worse + better, n, delta))


def test_fixed_sequence_choice_is_the_last_candidate_before_the_first_failure():
    passed = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert fixed_sequence_choice(passed).tolist() == [1, -1, 3, 2]  # a later pass after a failure does not count


def test_losses_compare_each_sample_with_the_last_exit():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])]
    out = ExitOutputs.from_logits(logits, torch.tensor([1, 0, 0]))  # exit 1 predicts 0, 1, 0; the last 1, 1, 1
    exits = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 0]])
    assert risk_losses(out, exits, "disagreement").tolist() == [[1, 0, 1], [0, 0, 0], [1, 0, 1]]
    # wrong early: [1, 1, 0]; wrong at the last exit: [0, 1, 1]
    assert risk_losses(out, exits, "top1-drop").tolist() == [[1, 0, -1], [0, 0, 0], [1, 0, -1]]
    assert risk_losses(out, exits[0], "disagreement").tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="unknown risk 'accuracy'"):
        risk_losses(out, exits, "accuracy")


# ----------------------------------------------------------------------------- the guarantee, known risks


def nested_counts(rng: np.random.Generator, n: int, risks: np.ndarray, draws: int) -> np.ndarray:
    """Loss counts ``[draws, B]`` of n samples per draw where candidate j's 0/1 loss is ``1[U < risks[j]]`` for one
    uniform U per sample (a cheaper candidate disagrees wherever a dearer one does), so candidate j's true risk is
    exactly ``risks[j]``; the counts are nested, as for real exit policies."""
    edges = np.concatenate([[0.0], risks, [1.0]])
    cells = rng.multinomial(n, np.diff(edges), size=draws)  # samples with U in each interval
    return cells.cumsum(axis=1)[:, :-1]


def test_coverage_and_efficiency_on_known_disagreement_risks():
    """Nine candidates, most expensive first, true risks known exactly; EPS = 0.1, DELTA = 0.1, n = 10000, 4000 draws.

    Asserted: (1) the share of draws whose chosen candidate has a true risk above EPS (only candidates 6 and later,
    0.1005 first, can be such) is at most DELTA + 3 standard errors; (2) choosing the cheapest candidate whose
    empirical risk is within EPS (no bound) does that in over 40% of the draws, so (1) is not met by a problem
    that is easy; (3) the choice is never more than one step dearer than the oracle's (candidate 5, the last with
    a true risk within EPS): candidates 0-4 sit at least 0.025 below EPS, where the bound (about 0.004 above the
    empirical risk here) lets a candidate fail with probability under 1e-14 per draw. (3) can fail only by that
    chance (computed below: the union over the five candidates and 4000 draws), or if the bound were looser than
    its maths; with risks closer together than the bound's slack the choice may be several steps dearer.
    """
    risks = np.array([0.0, 0.02, 0.04, 0.06, 0.075, 0.0995, 0.1005, 0.13, 0.2])
    eps, delta, n, draws = 0.1, 0.1, 10_000, 4000
    counts = nested_counts(np.random.default_rng(0), n, risks, draws)
    chosen = fixed_sequence_choice(clopper_pearson_upper(counts, n, delta) <= eps).numpy()
    violated = risks[chosen] > eps
    slack = 3 * math.sqrt(delta * (1 - delta) / draws)
    assert violated.mean() <= delta + slack, violated.mean()
    naive = fixed_sequence_choice(torch.from_numpy(counts / n <= eps)).numpy()
    assert (risks[naive] > eps).mean() > 0.4
    oracle = int(np.nonzero(risks <= eps)[0].max())
    # the chance that one of candidates 0-4 fails its test in some draw: P(count > largest count that passes)
    passing = int(np.nonzero(clopper_pearson_upper(np.arange(n), n, delta).numpy() <= eps)[0].max())
    assert draws * sum(binomial_tail(passing, n, r) for r in risks[:oracle]) < 1e-10
    assert (chosen >= oracle - 1).all() and (chosen >= 0).all()
    assert set(np.unique(chosen)) <= {oracle - 1, oracle, oracle + 1}


def test_coverage_on_a_known_top1_drop():
    """Losses in {-1, 0, 1}: candidate j is worse than the last exit on ``a_j`` of the samples and better on 0.02,
    so its true top-1 drop is ``a_j - 0.02``. The chosen one's drop exceeds EPS in at most DELTA (+ 3 s.e.) of the
    draws, while the cheapest candidate whose empirical drop is within EPS exceeds it in over 40%. The bound (the
    worse share's upper bound minus the better share's lower bound, each at DELTA / 2) sits about 0.007 above the
    empirical drop here, more than the 0.0095 between candidates 4 and 5 minus the sampling noise allows, so the
    choice is candidate 4 or 5 mostly and never below 3 (0.03 below EPS: over 6 standard deviations of the
    empirical drop above the bound's slack, under 1e-9 per draw)."""
    worse = np.array([0.0, 0.03, 0.06, 0.09, 0.11, 0.1195, 0.1205, 0.15, 0.25])
    better, eps, delta, n, draws = 0.02, 0.1, 0.1, 10_000, 4000
    rng = np.random.default_rng(1)
    plus = nested_counts(rng, n, worse, draws)
    minus = rng.binomial(n - plus[:, -1:], better / (1 - worse[-1]))  # the "better" samples lie outside every a_j
    chosen = fixed_sequence_choice(top1_drop_upper(plus, minus, n, delta) <= eps).numpy()
    true = worse - better
    assert (true[chosen] > eps).mean() <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert (chosen >= 3).all()
    naive = fixed_sequence_choice(torch.from_numpy((plus - minus) / n <= eps)).numpy()
    assert (true[naive] > eps).mean() > 0.4


# ----------------------------------------------------------------------------- the guarantee, end to end


def synthetic_population(size: int = 50_000, num_exits: int = 4, num_classes: int = 10, seed: int = 0) -> ExitOutputs:
    """Exit outputs of a made-up model: later exits see more of the class signal, every exit shares part of its
    noise (so exits agree more than chance), and samples differ in how easy they are."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (size,), generator=g)
    onehot = torch.nn.functional.one_hot(targets, num_classes).float()
    ease = torch.rand(size, 1, generator=g) * 2
    shared = torch.randn(size, num_classes, generator=g)
    logits = [shared + 0.5 * torch.randn(size, num_classes, generator=g) + (2.0 + k) * ease * onehot
              for k in range(num_exits)]
    return ExitOutputs.from_logits(logits, targets)


@pytest.mark.parametrize("rule, risk, eps", [("confidence", "disagreement", 0.1), ("entropy", "top1-drop", 0.1),
                                             ("patience", "disagreement", 0.11)])
def test_the_chosen_policy_keeps_its_risk_on_the_population_in_all_but_delta_of_the_draws(rule, risk, eps):
    """Calibration sets of 1000 drawn with replacement from a population of 50,000 are i.i.d. draws from it, so a
    policy's true risk is its risk on the whole population. Over 200 draws the chosen policy's true risk exceeds EPS
    in at most DELTA (+ 3 s.e.) of them; the thresholds are refitted on every draw (on half of it). For patience, the
    candidate p = 2 has a true disagreement of 0.113, just over EPS: about DELTA of the draws may choose it."""
    population, delta, draws, size = synthetic_population(), 0.1, 200, 1000
    rule_obj, g = exit_rule(rule), torch.Generator().manual_seed(1)
    true_chosen, true_naive = [], []
    for draw in range(draws):
        calibration = population.subset(torch.randint(0, population.num_samples, (size,), generator=g))
        choice = risk_controlled_choice(calibration, FLOPS, eps, 1 - delta, risk, rule, seed=draw)
        naive = int(fixed_sequence_choice(choice.empirical_risk <= eps))
        params = choice.thresholds if rule_obj.calibrated else choice.patience
        picked = params[[choice.chosen, naive]]
        true = risk_losses(population, rule_obj.exits(population.signal(rule_obj), picked), risk).mean(dim=1)
        true_chosen.append(float(true[0]))
        true_naive.append(float(true[1]))
        assert choice.expected_flops[choice.chosen] <= choice.expected_flops[0]
    violated = (torch.tensor(true_chosen) > eps).double().mean()
    assert violated <= delta + 3 * math.sqrt(delta * (1 - delta) / draws), violated
    if rule_obj.calibrated:  # 39 candidates close together: without the bound, a third or more of the draws go over
        assert (torch.tensor(true_naive) > eps).double().mean() > 0.25
        assert torch.tensor(true_chosen).mean() > 0.6 * eps  # not needlessly timid: about 2/3-3/4 of EPS is used

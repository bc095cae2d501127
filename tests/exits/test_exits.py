import math

import pytest
import torch

from timm_l2w.exits import (
    assign_exits,
    calibrate_thresholds,
    check_distribution,
    exit_by_threshold,
    exit_distribution,
    paper_distributions,
)


def reference_assign(conf, p):
    """Plain loop of the assignment in docs/method.md §4 (stable descending order for ties)."""
    n, K = conf.shape
    exit_of = [K - 1] * n
    taken = [False] * n
    for k in range(K - 1):
        m = math.floor(n * float(p[k]))
        order = sorted(range(n), key=lambda i: -float(conf[i, k]))  # Python's sort is stable
        chosen = [i for i in order if not taken[i]][:m]
        for i in chosen:
            exit_of[i], taken[i] = k, True
    return exit_of


def test_paper_distribution_values():
    p = exit_distribution(0.75, 5)
    assert torch.allclose(p, torch.tensor([0.3278, 0.2458, 0.1844, 0.1383, 0.1037], dtype=torch.float64), atol=1e-4)
    assert paper_distributions(5).shape == (39, 5)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("ties", [False, True])
def test_assign_matches_reference_loop_and_counts(K, ties):
    g = torch.Generator().manual_seed(K)
    for trial in range(5):
        n = int(torch.randint(1, 60, (1,), generator=g))
        conf = torch.rand(n, K, generator=g)
        if ties:
            conf = (conf * 4).round() / 4
        p = exit_distribution(0.2 + 0.4 * trial, K)
        got = assign_exits(conf, p)
        assert got.tolist() == reference_assign(conf, p)
        counts = torch.bincount(got, minlength=K).tolist()
        expected = [math.floor(n * float(p[k])) for k in range(K - 1)]
        assert counts[:-1] == expected and counts[-1] == n - sum(expected)


def test_thresholds_follow_paper():
    conf = torch.tensor([[0.9, 0.1], [0.8, 0.9], [0.8, 0.2], [0.1, 0.3]])
    T = calibrate_thresholds(conf, [0.5, 0.5])
    assert T[0].item() == pytest.approx(0.8) and T[1] == -math.inf
    # ">=": all three samples at 0.8 or more exit first (ties beyond floor(n p))
    assert exit_by_threshold(conf, T).tolist() == [0, 0, 0, 1]
    T0 = calibrate_thresholds(conf, [0.1, 0.9])  # floor(4 * 0.1) = 0 -> +inf, nobody exits
    assert T0[0] == math.inf and exit_by_threshold(conf, T0).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "p, match",
    [([0.5, 0.6], "sum to 1"), ([0.5, 0.5, 0.0], "one entry per exit"), ([-0.5, 1.5], "non-negative")],
)
def test_bad_distribution(p, match):
    with pytest.raises(ValueError, match=match):
        check_distribution(p, 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="q must be > 0"):
        exit_distribution(0.0, 5)
    with pytest.raises(ValueError, match="empty"):
        assign_exits(torch.zeros(0, 3), [1 / 3] * 3)
    with pytest.raises(ValueError, match="one threshold per exit"):
        exit_by_threshold(torch.rand(4, 3), [0.5, -math.inf])

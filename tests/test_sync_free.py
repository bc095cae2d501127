"""The sync-free L2W update (issue 24, item 1): the static-shape path computes exactly what the previous
path computed, and the hot path reads nothing back from the device.

The reference functions below are the previous implementations, kept here verbatim in behaviour, so the
comparison is against the code as it was, not against the new code.
"""
from __future__ import annotations

import pytest
import torch

from timm_l2w.exits import assign_exits, assign_exits_static, check_distribution, exit_counts, exit_distribution
from timm_l2w.validation import LabelError, check_labels


def _assign_exits_before(conf: torch.Tensor, p) -> torch.Tensor:
    """The previous assign_exits: counts read with .tolist(), candidates cut with int(remaining.sum())."""
    n, num_exits = conf.shape
    p = check_distribution(p, num_exits)
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long)
    remaining = torch.ones(n, dtype=torch.bool)
    for k, count in enumerate([int(c) for c in torch.floor(n * p).tolist()][:-1]):
        if count == 0:
            continue
        masked = torch.where(remaining, conf[:, k], torch.full_like(conf[:, k], -torch.inf))
        chosen = torch.sort(masked, descending=True, stable=True).indices[: int(remaining.sum())][:count]
        exit_index[chosen] = k
        remaining[chosen] = False
    return exit_index


@pytest.mark.parametrize("ties", [False, True])
def test_static_exit_assignment_is_the_previous_one(ties):
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(1, 70, (1,), generator=g))
        k = int(torch.randint(1, 8, (1,), generator=g))
        conf = torch.rand(n, k, generator=g, dtype=torch.float64)
        if ties:  # few distinct values: the stable order decides
            conf = (conf * 3).round() / 3
        if trial % 3 == 0:
            conf = conf.float()
        p = exit_distribution(0.05 + 1.9 * float(torch.rand(1, generator=g)), k)
        expected = _assign_exits_before(conf, p)
        assert torch.equal(assign_exits(conf, p), expected)
        assert torch.equal(assign_exits_static(conf, exit_counts(n, tuple(p.tolist()))), expected)


def test_exit_counts_are_floor_n_p_computed_on_the_host():
    p = exit_distribution(0.75, 5)
    for n in (1, 7, 32, 512, 1000):
        assert list(exit_counts(n, p)) == [int(c) for c in torch.floor(n * p).tolist()]
        assert exit_counts(n, tuple(p.tolist())) == exit_counts(n, p)
    for bad, words in (((0.5, 0.6), "sum to 1"), ((float("nan"), 1.0), "finite"), ((1.5, -0.5), "non-negative")):
        with pytest.raises(ValueError, match=words):
            exit_counts(8, bad)


def test_label_check_stays_clear_on_the_cpu():
    assert torch.equal(check_labels(torch.tensor([0, 3, 1]), 4), torch.tensor([0, 3, 1]))
    with pytest.raises(LabelError, match=r"in \[0, 3\] for the 4-class heads, got values from 0 to 4"):
        check_labels(torch.tensor([0, 4, 1]), 4)
    with pytest.raises(LabelError, match="negative values"):
        check_labels(torch.tensor([-1, 2]), 4)

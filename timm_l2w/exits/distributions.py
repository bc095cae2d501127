"""Exit distributions (the budgets), confidence-based exit assignment and threshold calibration.

One implementation, shared by the L2W meta loss (:func:`assign_exits`) and by budgeted evaluation
(:func:`calibrate_thresholds`, :func:`exit_by_threshold`). Scores are ``[N, K]`` tensors (sample i,
exit k), usually the max softmax probability of each exit; a higher score leaves earlier. The exit
rules built on these functions are in :mod:`timm_l2w.exits.rules`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..validation import Range, check_number

__all__ = [
    "exit_distribution",
    "paper_distributions",
    "paper_qs",
    "check_distribution",
    "assign_exits",
    "assign_exits_static",
    "exit_counts",
    "distribution_values",
    "check_distributions",
    "calibrate_thresholds",
    "calibrate_thresholds_batch",
    "exit_by_threshold",
    "check_scores",
]


def exit_distribution(q: float, num_exits: int) -> Tensor:
    """Target share of samples per exit: ``p_k ∝ q**k`` for k = 1..K, normalised (float64)."""
    q = check_number(q, "q", Range(0, low_open=True, hint="q < 1 front-loads, q > 1 back-loads the exits"))
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    p = torch.tensor(float(q), dtype=torch.float64) ** torch.arange(1, num_exits + 1, dtype=torch.float64)
    return p / p.sum()


def paper_qs(count: int = 39) -> List[float]:
    """The paper's budgets: q = j/20 for j = 1..39."""
    return [j / 20 for j in range(1, count + 1)]


def paper_distributions(num_exits: int) -> Tensor:
    """The 39 distributions of the paper as a ``[39, K]`` float64 tensor (row j-1 is q = j/20)."""
    return torch.stack([exit_distribution(q, num_exits) for q in paper_qs()])


def check_distribution(p: Tensor | Sequence[float], num_exits: int) -> Tensor:
    """Return ``p`` as a float64 tensor after checking it is a distribution over ``num_exits`` exits."""
    p = torch.as_tensor(p, dtype=torch.float64).detach().cpu()
    if p.ndim != 1 or p.numel() != num_exits:
        raise ValueError(f"exit distribution must have one entry per exit ({num_exits}), got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"exit distribution must be finite and non-negative, got {p.tolist()}")
    if abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(f"exit distribution must sum to 1, got sum {float(p.sum()):.6g}: normalise it first")
    return p


def check_scores(conf: Tensor, name: str = "confidences") -> None:
    """Raise a ``ValueError`` unless ``conf`` is a non-empty, finite ``[num_samples, num_exits]`` tensor."""
    if not isinstance(conf, Tensor) or conf.ndim != 2:
        shape = tuple(conf.shape) if isinstance(conf, Tensor) else type(conf).__name__
        raise ValueError(f"{name} must be a [num_samples, num_exits] tensor, got {shape}")
    if conf.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if not torch.isfinite(conf).all():
        raise ValueError(f"{name} contains NaN or inf: check the model outputs")


def distribution_values(p: Tensor | Sequence[float], num_exits: int) -> Tuple[float, ...]:
    """``p`` as a tuple of Python floats after the checks of :func:`check_distribution`; a tuple of floats is
    checked in Python (no tensor, so a hot loop that keeps ``p`` as a tuple reads nothing from a device)."""
    if isinstance(p, tuple) and all(type(v) is float for v in p):
        if len(p) != num_exits:
            raise ValueError(f"exit distribution must have one entry per exit ({num_exits}), got shape ({len(p)},)")
        if not all(math.isfinite(v) and v >= 0 for v in p):
            raise ValueError(f"exit distribution must be finite and non-negative, got {list(p)}")
        if abs(math.fsum(p) - 1.0) > 1e-6:
            raise ValueError(f"exit distribution must sum to 1, got sum {math.fsum(p):.6g}: normalise it first")
        return p
    return tuple(check_distribution(p, num_exits).tolist())


def exit_counts(n: int, p: Tensor | Sequence[float], num_exits: Optional[int] = None) -> Tuple[int, ...]:
    """``floor(n * p_k)`` for every exit (the last entry is unused: the last exit takes the rest).

    Computed on the host from ``n`` and ``p`` alone (float64, as ``torch.floor(n * p)``), so it is known
    before any confidence is: the exit assignment has static shapes. ``p`` is checked as
    :func:`check_distribution` checks it (for ``num_exits`` exits, default ``len(p)``; a tuple of floats
    without building a tensor).
    """
    values = distribution_values(p, len(p) if num_exits is None else num_exits)
    return tuple(int(math.floor(n * v)) for v in values)


def assign_exits_static(conf: Tensor, counts: Sequence[int]) -> Tensor:
    """:func:`assign_exits` with the counts given (:func:`exit_counts`): no check, no host read.

    Static shapes: for exit k the samples already assigned are masked to ``-inf``, one stable descending
    sort orders the rest, and the first ``counts[k]`` go to exit k (a fixed-size slice; the counts of
    the earlier exits leave at least that many unassigned, since they sum to at most ``n``). The
    assignment is scattered into the result without data-dependent indexing. ``conf`` must be finite.
    """
    n, num_exits = conf.shape
    conf = conf.detach()
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long, device=conf.device)
    remaining = torch.ones(n, dtype=torch.bool, device=conf.device)
    for k, count in enumerate(counts[: num_exits - 1]):
        if count == 0:
            continue
        masked = torch.where(remaining, conf[:, k], torch.full_like(conf[:, k], -torch.inf))
        chosen = torch.sort(masked, descending=True, stable=True).indices[:count]
        exit_index.scatter_(0, chosen, k)
        remaining.scatter_(0, chosen, False)
    return exit_index


def assign_exits(conf: Tensor, p: Tensor | Sequence[float]) -> Tensor:
    """Assign every sample to an exit (docs/method.md §4, confidence-based exit assignment).

    For k = 1..K-1 in order, the ``floor(n * p_k)`` not-yet-assigned samples with the highest
    confidence at exit k go to exit k; the last exit takes every sample left. Returns ``[N]`` long.
    (Checks ``conf`` and ``p``, then :func:`assign_exits_static`.)
    """
    check_scores(conf)
    n, num_exits = conf.shape
    return assign_exits_static(conf, exit_counts(n, p, num_exits))


def check_distributions(distributions: Tensor | Sequence[Sequence[float]], num_exits: int) -> Tensor:
    """Return a ``[B, K]`` float64 stack of exit distributions after checking every row."""
    rows = torch.as_tensor(distributions, dtype=torch.float64).detach().cpu()
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(
            f"distributions must be a [num_budgets, num_exits] table with at least one row, "
            f"got shape {tuple(rows.shape)}"
        )
    return torch.stack([check_distribution(row, num_exits) for row in rows])


def calibrate_thresholds_batch(conf: Tensor, distributions: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """Thresholds for many distributions at once: ``[B, K]`` float64 (see :func:`calibrate_thresholds`).

    Vectorised over the budgets: per exit, one sort of the held-out confidences serves every budget;
    the ``floor(n * p_k)``-th not-yet-exited sample is found with a cumulative count in that order.
    """
    check_scores(conf, "held-out confidences")
    n, num_exits = conf.shape
    dist = check_distributions(distributions, num_exits)
    conf = conf.detach()
    counts = torch.floor(n * dist).to(torch.long).T.contiguous().to(conf.device)  # [K, B]
    num_budgets = dist.shape[0]
    thresholds = torch.full((num_budgets, num_exits), torch.inf, dtype=torch.float64, device=conf.device)
    thresholds[:, -1] = -torch.inf
    remaining = torch.ones(num_budgets, n, dtype=torch.bool, device=conf.device)
    for k in range(num_exits - 1):
        values, order = torch.sort(conf[:, k], descending=True, stable=True)
        rank = remaining.index_select(1, order).cumsum(dim=1, dtype=torch.int32)  # rank among the remaining
        count = counts[k]
        valid = (count > 0) & (rank[:, -1] >= count)
        # first rank >= count
        position = torch.searchsorted(rank, count[:, None].to(torch.int32).contiguous()).squeeze(1).clamp_(max=n - 1)
        t_k = torch.where(valid, values[position], torch.full_like(values[position], torch.inf))
        thresholds[:, k] = t_k.to(torch.float64)
        remaining &= ~(conf[:, k][None] >= t_k[:, None])  # t_k holds confidence values: exact in conf's dtype
    return thresholds.cpu()


def calibrate_thresholds(conf: Tensor, p: Tensor | Sequence[float]) -> Tensor:
    """Thresholds ``T[K]`` on a held-out set (docs/method.md §6, budgeted evaluation).

    Walking the not-yet-exited samples by descending confidence at exit k, ``T_k`` is the confidence
    of the ``floor(n * p_k)``-th one (``+inf`` if that count is 0 or not enough samples remain);
    then every sample with ``c >= T_k`` counts as exited. ``T_K = -inf``. Returns float64 ``[K]``.
    """
    check_scores(conf, "held-out confidences")
    p = check_distribution(p, conf.shape[1])
    return calibrate_thresholds_batch(conf, p[None])[0]


def exit_by_threshold(conf: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """Exit of every sample: the first k with ``conf[i, k] >= T_k`` (the last exit takes the rest).

    ``thresholds`` is ``[K]`` (returns ``[N]`` long) or a ``[B, K]`` stack, one row per budget
    (returns ``[B, N]``).
    """
    check_scores(conf)
    num_exits = conf.shape[1]
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=conf.device)
    if thresholds.ndim not in (1, 2) or thresholds.shape[-1] != num_exits:
        raise ValueError(
            f"need one threshold per exit ({num_exits}), got shape {tuple(thresholds.shape)}"
        )
    if torch.isnan(thresholds).any():
        raise ValueError("thresholds contain NaN: use +inf for an exit nobody should leave at")
    conf = conf.T.to(torch.float64).contiguous()  # [K, N]
    running = torch.ones((*thresholds.shape[:-1], conf.shape[1]), dtype=torch.bool, device=conf.device)
    exits = torch.zeros(running.shape, dtype=torch.long, device=conf.device)
    for k in range(num_exits - 1):  # a sample's exit = the number of exits it passed without leaving
        running &= conf[k] < thresholds[..., k, None]
        exits += running
    return exits

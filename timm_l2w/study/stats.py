"""Uncertainty of a paired comparison: over seeds (Student t, bootstrap) and over test images (bootstrap)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["N_BOOTSTRAP", "mean_std", "mean_with_intervals", "t_interval", "seeds_for_half_width",
           "paired_bootstrap"]

N_BOOTSTRAP = 10000  # resamples of the seeds in mean_with_intervals


def mean_std(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """Mean, sample std (0 for one value) and n; None for no values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def t_interval(values: Any, level: float = 0.95, axis: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student t interval (n - 1 degrees of freedom) of ``values`` along ``axis`` (vectorised).

    The bounds are NaN for fewer than 2 values; with zero spread they equal the mean.
    """
    from scipy import stats as sps

    v = np.asarray(values, dtype=np.float64)
    n = v.shape[axis]
    mean = v.mean(axis=axis)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy()
    half = sps.t.ppf(0.5 + level / 2, n - 1) * v.std(axis=axis, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def seeds_for_half_width(std: float, half_width: float, level: float = 0.95, most: int = 1000) -> Optional[int]:
    """The fewest seeds whose Student t interval is narrower than ``± half_width`` at this seed ``std``
    (None when even ``most`` seeds are not enough; 2 when the seeds do not scatter)."""
    from scipy import stats as sps

    if std <= 0:
        return 2
    for n in range(2, most + 1):
        if sps.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n) < half_width:
            return n
    return None


def mean_with_intervals(values: Sequence[float], seed: int = 0) -> Optional[Dict[str, Any]]:
    """Mean, std and n of ``values`` (one per seed) with two 95% intervals for the mean.

    ``ci95_t``: Student t interval (n - 1 degrees of freedom); ``ci95_bootstrap``: percentile interval of
    the mean over ``N_BOOTSTRAP`` resamples of the values with replacement. Both are None for n < 2.
    """
    stats = mean_std(values)
    if stats is None:
        return None
    stats.update(ci95_t=None, ci95_bootstrap=None)
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return stats
    from scipy import stats as sps

    _, lo, hi = t_interval(v)
    stats["ci95_t"] = [float(lo), float(hi)]
    if v.std(ddof=1) > 0:
        boot = sps.bootstrap((v,), np.mean, n_resamples=N_BOOTSTRAP, method="percentile",
                             confidence_level=0.95, rng=np.random.default_rng(seed))
        stats["ci95_bootstrap"] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    else:
        stats["ci95_bootstrap"] = [float(v.mean()), float(v.mean())]
    return stats


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, level: float = 0.95,
                     seed: int = 0) -> Dict[str, np.ndarray]:
    """Paired bootstrap over test samples of accuracy (%) of ``a`` and ``b`` (``[S, B, N]`` correctness:
    seeds, budgets, samples; accuracy is averaged over seeds).

    Every replicate resamples the N test samples once and applies the same resample to both and to
    every seed and budget. Returns point estimates and ``level`` percentile intervals: ``a``, ``b``,
    ``diff`` (a - b) per budget ``[B]`` with ``*_lo`` / ``*_hi``, and ``mean_diff`` (over budgets).
    It holds the seeds fixed: the seed-to-seed spread is not in these intervals (:func:`t_interval`).
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be [seeds, budgets, samples] of one shape, got {a.shape} and {b.shape}")
    n = a.shape[-1]
    per_a, per_b = a.mean(axis=0).astype(np.float64), b.mean(axis=0).astype(np.float64)  # [B, N]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)
    boot_a, boot_b = counts @ per_a.T * (100.0 / n), counts @ per_b.T * (100.0 / n)  # [R, B]
    tail = (1 - level) / 2 * 100
    out: Dict[str, np.ndarray] = {}
    for name, point, boot in (("a", per_a.mean(1) * 100, boot_a), ("b", per_b.mean(1) * 100, boot_b),
                              ("diff", (per_a - per_b).mean(1) * 100, boot_a - boot_b)):
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = point, *np.percentile(boot, [tail, 100 - tail], axis=0)
    mean = (boot_a - boot_b).mean(axis=1)
    out["mean_diff"] = np.array(out["diff"].mean())
    out["mean_diff_lo"], out["mean_diff_hi"] = np.percentile(mean, [tail, 100 - tail])
    return out

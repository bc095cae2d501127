"""What a seeded comparison of L2W against equal weighting can tell: the per-budget correctness of each
test image and the verdict over seeds and test images (``timm-l2w demo`` prints it)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["LEVEL", "PAPER_GAIN", "budget_correctness", "verdict"]

LEVEL = 95  # % of every interval
PAPER_GAIN = 1.0  # points: about the paper's budgeted gain on CIFAR-100 after full training


def budget_correctness(test: Any, thresholds: Any) -> np.ndarray:
    """``[B, N]`` bool: is test sample n right at the exit the thresholds of budget b send it to."""
    from ..exits import exit_by_threshold

    exits = exit_by_threshold(test.confidences, thresholds)  # [B, N]
    return test.correct.T.contiguous().gather(0, exits).numpy()


def verdict(per_seed: Sequence[float], seed_lo: float, seed_hi: float, image_lo: float, image_hi: float,
            seeds_needed: Optional[int]) -> str:
    """What the seeds can tell about L2W - equal weighting (mean over the 39 budgets, top-1 points).

    ``per_seed``: the paired difference of every seed; ``seed_lo``/``seed_hi``: its Student t interval
    (NaN with one seed); ``image_lo``/``image_hi``: the paired bootstrap interval over the test images;
    ``seeds_needed``: seeds for an interval of about ``± PAPER_GAIN`` at this spread.
    """
    d = np.asarray(per_seed, dtype=np.float64)
    mean, n = float(d.mean()), d.size
    image = f"the test images alone give [{image_lo:+.2f}, {image_hi:+.2f}]"
    if n < 2:
        return (f"one seed: {mean:+.2f} points, and {image}; but another seed (or another machine's rounding) is "
                f"another training run, and one seed cannot say how far runs scatter: run --seeds 4 or more.")
    agree = int((np.sign(d) == np.sign(mean)).sum())
    spread = float(d.std(ddof=1))
    need = (f"about {seeds_needed} seeds" if seeds_needed else "more than 1,000 seeds")
    if seed_lo > 0 or seed_hi < 0:
        side = "ahead of" if mean > 0 else "behind"
        return (f"L2W is {side} equal weighting by {abs(mean):.2f} points on average over the 39 budgets, and the "
                f"{LEVEL}% interval over the {n} seeds [{seed_lo:+.2f}, {seed_hi:+.2f}] excludes zero ({agree} of {n} "
                f"seeds on that side; seeds scatter by {spread:.2f} points). At this size (a few minutes of training) "
                f"that is what these seeds show, not the paper's full-training result (about +{PAPER_GAIN:.0f} point "
                f"on CIFAR-100); see benchmarks/RESULTS.md for a larger study.")
    narrower = " (narrower: the seeds, not the test images, dominate the uncertainty)" \
        if image_hi - image_lo < seed_hi - seed_lo else ""
    return (f"no difference these {n} seeds can detect: L2W - equal weighting is {mean:+.2f} points on average, "
            f"{LEVEL}% interval over the seeds [{seed_lo:+.2f}, {seed_hi:+.2f}], which contains zero ({agree} of {n} "
            f"seeds on the side of the mean; seeds scatter by {spread:.2f} points); {image}{narrower}. To resolve a "
            f"difference of {PAPER_GAIN:.0f} point (the paper's gain on CIFAR-100 after full training) at this spread "
            f"would take {need}; see benchmarks/RESULTS.md for a larger study.")

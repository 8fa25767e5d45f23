"""Means with 95% bootstrap intervals over held-out videos, and paired differences between methods.

Every score is a table [videos, replicates] (a replicate varies the post-tuning seed and the sampling seed). The
videos are the unit that is resampled: a replicate of the same video is not an independent draw of the world, so
each bootstrap sample draws videos with replacement and keeps all of their replicates. NaN cells (a position error
where the object was never found) are left out of the means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over videos x replicates, its 95% bootstrap interval, and the mean of each replicate."""

    mean: float
    low: float
    high: float
    per_replicate: tuple[float, ...]

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "per_replicate": list(self.per_replicate)}


def nanmean(values: np.ndarray, axis=None) -> np.ndarray | float:
    """Mean without NaN cells; NaN where a slice has none (no warning)."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    count = finite.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap(scores: np.ndarray, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `scores` [videos, replicates] and its percentile interval over `resamples` resamplings of videos."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"bootstrap needs scores [videos, replicates], got shape {scores.shape}")
    picks = np.random.default_rng(seed).integers(scores.shape[0], size=(resamples, scores.shape[0]))
    # Sums and counts per video first, so each resample is a weighted sum instead of a gather of its cells.
    finite = np.isfinite(scores)
    sums, counts = np.where(finite, scores, 0.0).sum(axis=1), finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    means = means[np.isfinite(means)]
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail]) if len(means) else (np.nan, np.nan)
    return Estimate(float(nanmean(scores)), float(low), float(high),
                    tuple(float(m) for m in nanmean(scores, axis=0)))


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> Estimate:
    """`a - b` cell by cell (same videos and replicates: the same first frame and sampling noise), bootstrapped."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {a.shape} and {b.shape}")
    return bootstrap(a - b, resamples, seed)

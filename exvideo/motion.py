"""SVD's motion-bucket conditioning computed from a clip, as ExVideo's reference does.

With the clip's pixels in [-1, 1], take the standard deviation over time at every pixel and channel, average it into
one score, and return the index of the largest threshold (of 128, `data/motion_bucket_thresholds.txt`) that is
<= the score. The standard deviation is torch's default (Bessel-corrected), as in the reference.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch


@lru_cache(maxsize=1)
def motion_bucket_thresholds() -> torch.Tensor:
    """The 128 score thresholds, ascending, starting at 0."""
    text = resources.files("exvideo").joinpath("data/motion_bucket_thresholds.txt").read_text()
    return torch.tensor([float(v) for v in text.split()], dtype=torch.float64)


def motion_score(pixels: torch.Tensor) -> float:
    """Mean over pixels and channels of the per-pixel standard deviation over time; `pixels` [T, ...] in [-1, 1]."""
    if pixels.shape[0] < 2:
        raise ValueError(f"motion score needs at least 2 frames, got {pixels.shape[0]}")
    return pixels.double().std(dim=0).mean().item()


def bucket_of_score(score: float) -> int:
    """Index of the largest threshold <= `score` (0..127)."""
    return int((motion_bucket_thresholds() <= score).sum().item()) - 1


def motion_bucket_id(pixels: torch.Tensor) -> tuple[int, float]:
    """(bucket index in 0..127, score) of a clip [T, C, H, W] (or [T, H, W, C]) with values in [-1, 1]."""
    score = motion_score(pixels)
    return bucket_of_score(score), score

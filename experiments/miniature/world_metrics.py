"""Metrics only this world allows: where the object should be is known, so generated videos can be scored on it.

The object is found by its colour against the known background: a pixel is the object's when it is closer to the
object's colour than to the true background at that place, and differs from that background by more than
`BACKGROUND_MARGIN` (a VAE-blurred, slightly desaturated object still counts; an object that turned grey or into
another palette colour does not). It is "present" in a frame when that mask covers at least `MIN_AREA_FRACTION` of
its true area; its position is the mask's centroid.
"""

from __future__ import annotations

import numpy as np

from experiments.miniature.statistics import nanmean
from experiments.miniature.world import WorldVideo, background, render

BACKGROUND_MARGIN = 60.0  # RGB distance; palette colours are >= 150 away from the background
MIN_AREA_FRACTION = 0.3


def locate(frames: np.ndarray, video: WorldVideo) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of uint8 [T, H, W, 3]: the centroid (x, y) of the object ([T, 2], NaN if absent) and its area in
    pixels [T]."""
    pixels = frames.astype(np.float32)
    to_object = np.linalg.norm(pixels - np.array(video.colour, dtype=np.float32), axis=-1)
    to_background = np.linalg.norm(pixels - background(video).astype(np.float32), axis=-1)
    mask = (to_object < to_background) & (to_background > BACKGROUND_MARGIN)
    area = mask.sum(axis=(1, 2)).astype(np.float32)
    ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask * xs).sum(axis=(1, 2)) / area
        cy = (mask * ys).sum(axis=(1, 2)) / area
    return np.stack([cx, cy], axis=1), area


def frame_scores(frames: np.ndarray, video: WorldVideo) -> dict[str, np.ndarray]:
    """Per frame of a generated video [T, H, W, 3] against the world's truth for its first frame: `present`
    (bool), `position_error_px` (distance of the found object to its true centre, NaN where absent),
    `psnr_to_truth` (dB) and `colour_shift` (mean absolute difference of the frame's mean colour, RGB levels)."""
    if frames.shape[1:3] != (video.size, video.size):
        raise ValueError(f"frames are {frames.shape[1:3]} but the world video is {video.size}x{video.size}")
    truth = render(video, len(frames))
    true_area = locate(truth[:1], video)[1][0]
    centres, area = locate(frames, video)
    present = area >= MIN_AREA_FRACTION * true_area
    error = np.linalg.norm(centres - video.positions(len(frames)), axis=1)
    error[~present] = np.nan
    pixels, expected = frames.astype(np.float32), truth.astype(np.float32)
    mse = (((pixels - expected) / 255) ** 2).mean(axis=(1, 2, 3))
    shift = np.abs(pixels.mean(axis=(1, 2)) - expected.mean(axis=(1, 2))).mean(axis=1)
    return {"present": present, "position_error_px": error, "psnr_to_truth": 10 * np.log10(1 / np.maximum(mse, 1e-10)),
            "colour_shift": shift}


def world_metrics(frames: np.ndarray, video: WorldVideo) -> dict[str, float]:
    """Scores of a generated video [T, H, W, 3] against the world's truth for its first frame (see `summarise`)."""
    return summarise(frame_scores(frames, video))


def summarise(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """One video's scores from its `frame_scores`.

    position_error_px: mean distance of the found object to its true centre, over frames where it is present
    (NaN if never); .last: the same over the last quarter of the frames; present_fraction: frames where the
    object is present; survives: 1 if it is present (so with its colour kept) in the last frame; psnr_to_truth:
    PSNR (dB) of the generated frames against the true frames, and .last over the last quarter.
    """
    present, error, psnr = scores["present"], scores["position_error_px"], scores["psnr_to_truth"]
    last = slice(len(present) - max(len(present) // 4, 1), len(present))
    return {
        "position_error_px": float(nanmean(error)), "position_error_px.last": float(nanmean(error[last])),
        "present_fraction": float(present.mean()), "survives": float(present[-1]),
        "psnr_to_truth": float(psnr.mean()), "psnr_to_truth.last": float(psnr[last].mean()),
    }

"""Weight-free metrics on constructed videos whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from evaluation_videos import fading_to_grey_video, static_video, texture, translating_video

from pipelines.evaluate.metrics import (
    PSNR_CAP_DB, farneback_flow, flicker_curve, psnr, segment_slices, ssim, video_metrics,
)


def test_static_video_has_zero_flicker_and_zero_motion():
    metrics = video_metrics(static_video(num_frames=6))
    assert metrics.scalars["flicker"] == 0.0
    assert metrics.scalars["motion"] < 0.01  # Farneback leaves ~0.003 px of numerical noise
    assert metrics.scalars["warp_error"] < 1e-3
    np.testing.assert_allclose(metrics.curves["ssim_to_first"], 1.0, atol=1e-6)
    assert metrics.curves["flicker"].shape == (5,) and metrics.curves["contrast"].shape == (6,)


@pytest.mark.parametrize("dx, dy", [(2, 1), (-1, 3)])
def test_global_translation_gives_flow_of_that_size_and_direction(dx, dy):
    frames = translating_video(dx, dy, num_frames=5)
    flow = farneback_flow(frames[1], frames[2])
    inner = flow[16:-16, 16:-16]  # borders lose the content that left the frame
    np.testing.assert_allclose(np.median(inner.reshape(-1, 2), axis=0), [dx, dy], atol=0.2)
    metrics = video_metrics(frames)
    assert metrics.scalars["flow_dx"] == pytest.approx(dx, abs=0.5)
    assert metrics.scalars["flow_dy"] == pytest.approx(dy, abs=0.5)
    assert metrics.scalars["motion"] == pytest.approx(np.hypot(dx, dy), rel=0.25)
    # Warping along the flow explains the motion: far smaller error than the raw frame difference.
    assert metrics.scalars["warp_error"] < 0.3 * metrics.scalars["flicker"]


def test_fading_to_grey_shows_drift():
    frames = fading_to_grey_video(num_frames=12)
    metrics = video_metrics(frames)
    contrast, saturation = metrics.curves["contrast"], metrics.curves["saturation"]
    assert np.all(np.diff(contrast) < 0) and contrast[-1] < 0.01
    assert np.all(np.diff(saturation) < 0) and saturation[-1] < 0.01
    assert metrics.scalars["contrast_ratio_last_to_first"] < 0.35
    assert metrics.scalars["saturation_ratio_last_to_first"] < 0.35
    assert metrics.scalars["contrast.last"] < metrics.scalars["contrast.middle"] < metrics.scalars["contrast.first"]
    assert np.all(np.diff(metrics.curves["ssim_to_first"]) < 0)
    for channel in ("mean_r", "mean_g", "mean_b"):
        assert metrics.curves[channel][-1] == pytest.approx(0.5, abs=0.01)


def test_identical_frame0_gives_perfect_fidelity_and_a_different_one_does_not():
    frames = static_video(num_frames=3)
    perfect = video_metrics(frames, conditioning=frames[0].copy()).scalars
    assert perfect["frame0_psnr"] == PSNR_CAP_DB and perfect["frame0_ssim"] == pytest.approx(1.0, abs=1e-6)
    other = texture(64, 64, seed=7)
    assert psnr(frames[0], other) < 20 and ssim(frames[0], other) < 0.5
    # A conditioning image at another size is resized to the video's size first, as SVD's pipeline does.
    upscaled = np.repeat(np.repeat(frames[0], 2, axis=0), 2, axis=1)
    assert video_metrics(frames, conditioning=upscaled).scalars["frame0_psnr"] > 40


def test_flicker_counts_every_changed_pixel():
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    frames[1] = 255
    np.testing.assert_allclose(flicker_curve(frames), [1.0, 1.0])


def test_segments_are_first_middle_last_quarter():
    assert segment_slices(8) == {"first": slice(0, 2), "middle": slice(3, 5), "last": slice(6, 8)}
    assert segment_slices(2) == {"first": slice(0, 1), "middle": slice(0, 1), "last": slice(1, 2)}


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((4, 8, 8), np.uint8), "uint8 frames shaped"),
    (np.zeros((1, 8, 8, 3), np.uint8), "at least 2 frames"),
])
def test_bad_frames_are_refused_with_a_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        video_metrics(bad)

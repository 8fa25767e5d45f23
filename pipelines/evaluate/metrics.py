"""Per-video metrics that need no model weights: flicker, optical flow, frame-0 fidelity and drift over time.

Frames are RGB uint8 arrays `[T, H, W, 3]`. Intensities are measured on a 0..1 scale, flow in pixels per frame.
Curves are indexed by frame (length T) or by transition t -> t+1 (length T-1); every curve is also summarised over
the first, middle and last quarter of the video, so degradation late in a long video shows as a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Identical images have no finite PSNR (zero error); they score this cap, a common convention.
PSNR_CAP_DB = 100.0
SEGMENTS = ("first", "middle", "last")
# ITU-R BT.601 luma weights, as OpenCV's RGB->gray conversion uses.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Curves with one value per transition t -> t+1 (the others have one per frame); they are placed at frame t+1.
TRANSITION_CURVES = frozenset(
    {"flicker", "motion", "flow_dx", "flow_dy", "warp_error", "ssim_to_previous", "clip_to_previous"}
)


@dataclass
class VideoMetrics:
    """Scalar metrics (name -> value) and curves over frame index (name -> 1-D array) of one video."""

    scalars: dict[str, float] = field(default_factory=dict)
    curves: dict[str, np.ndarray] = field(default_factory=dict)


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Return `frames` if it is a uint8 `[T, H, W, 3]` video with at least two frames, else raise naming the problem."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"expected RGB uint8 frames shaped [T, H, W, 3], got {got}")
    if frames.shape[0] < 2:
        raise ValueError(f"a video needs at least 2 frames for temporal metrics, got {frames.shape[0]}")
    return frames


def _unit(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) / 255.0


def segment_slices(length: int) -> dict[str, slice]:
    """First, middle and last quarter of a curve of `length` points (each at least one point)."""
    quarter = max(1, length // 4)
    middle_start = max(0, (length - quarter) // 2)
    return {
        "first": slice(0, quarter),
        "middle": slice(middle_start, middle_start + quarter),
        "last": slice(length - quarter, length),
    }


def curve_frame_index(name: str, curve: np.ndarray) -> np.ndarray:
    """The frame index of each point of curve `name`: 0..T-1 for per-frame curves, 1..T-1 for transitions."""
    return np.arange(len(curve)) + (1 if name in TRANSITION_CURVES else 0)


def flicker_curve(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames (0..1 scale), one value per transition."""
    frames = check_frames(frames)
    # Pair by pair on uint8: no float copy of the whole video.
    return np.asarray([cv2.absdiff(a, b).mean() / 255.0 for a, b in zip(frames[:-1], frames[1:])], dtype=np.float32)


def farneback_flow(previous: np.ndarray, following: np.ndarray) -> np.ndarray:
    """Dense flow `[H, W, 2]` (dx, dy in pixels) with `previous(y, x) ~ following(y + dy, x + dx)`; RGB uint8 inputs."""
    return cv2.calcOpticalFlowFarneback(
        cv2.cvtColor(previous, cv2.COLOR_RGB2GRAY), cv2.cvtColor(following, cv2.COLOR_RGB2GRAY), None,
        pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0,
    )


def warping_error(previous: np.ndarray, following: np.ndarray, flow: np.ndarray) -> float:
    """Mean absolute error (0..1) between `previous` and `following` warped back along `flow`.

    Only pixels whose flow target lies inside the frame count: content entering across the border has no source.
    """
    height, width = flow.shape[:2]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    warped = cv2.remap(_unit(following), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    if not inside.any():
        return float("nan")
    return float(np.abs(warped - _unit(previous))[inside].mean())


def flow_curves(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per transition: mean flow magnitude, mean dx, mean dy (pixels per frame) and warping error."""
    frames = check_frames(frames)
    motion, dx, dy, warp = [], [], [], []
    for previous, following in zip(frames[:-1], frames[1:]):
        flow = farneback_flow(previous, following)
        motion.append(np.linalg.norm(flow, axis=-1).mean())
        dx.append(flow[..., 0].mean())
        dy.append(flow[..., 1].mean())
        warp.append(warping_error(previous, following, flow))
    as_array = lambda values: np.asarray(values, dtype=np.float32)  # noqa: E731
    return {"motion": as_array(motion), "flow_dx": as_array(dx), "flow_dy": as_array(dy), "warp_error": as_array(warp)}


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two same-sized uint8 RGB images, capped at PSNR_CAP_DB."""
    mse = float(((_unit(image) - _unit(reference)) ** 2).mean())
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * np.log10(1.0 / mse))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) averaged over
    pixels and RGB channels, for two same-sized uint8 images; 1.0 means identical."""
    a, b = _unit(image), _unit(reference)
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    covariance = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` (uint8 RGB) at `height` x `width`, as SVD's pipeline resizes its conditioning image."""
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def drift_curves(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame colour statistics and similarity to frame 0; per transition similarity to the previous frame.

    A video fading to grey shows falling `contrast` and `saturation`, and `ssim_to_first` falling with it.
    """
    frames = check_frames(frames)
    unit = _unit(frames)
    luma = unit @ LUMA
    channel_max, channel_min = unit.max(axis=-1), unit.min(axis=-1)
    saturation = np.where(channel_max > 0, (channel_max - channel_min) / np.maximum(channel_max, 1e-8), 0.0)
    means = unit.mean(axis=(1, 2))
    return {
        "mean_r": means[:, 0], "mean_g": means[:, 1], "mean_b": means[:, 2],
        "brightness": luma.mean(axis=(1, 2)),
        "contrast": luma.std(axis=(1, 2)),
        "saturation": saturation.mean(axis=(1, 2)).astype(np.float32),
        "ssim_to_first": np.asarray([ssim(frame, frames[0]) for frame in frames], dtype=np.float32),
        "ssim_to_previous": np.asarray([ssim(b, a) for a, b in zip(frames[:-1], frames[1:])], dtype=np.float32),
    }


def segment_summary(curves: dict[str, np.ndarray]) -> dict[str, float]:
    """`<curve>.<segment>`: the mean of each curve over its first, middle and last quarter."""
    summary = {}
    for name, curve in curves.items():
        for segment, part in segment_slices(len(curve)).items():
            summary[f"{name}.{segment}"] = float(np.nanmean(curve[part]))
    return summary


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def video_metrics(frames: np.ndarray, conditioning: np.ndarray | None = None) -> VideoMetrics:
    """Every weight-free metric of one video; frame-0 fidelity only when the conditioning image is given."""
    frames = check_frames(frames)
    curves = {"flicker": flicker_curve(frames), **flow_curves(frames), **drift_curves(frames)}
    scalars = {
        "num_frames": float(len(frames)),
        "flicker": float(curves["flicker"].mean()),
        "motion": float(curves["motion"].mean()),
        "flow_dx": float(curves["flow_dx"].mean()),
        "flow_dy": float(curves["flow_dy"].mean()),
        "warp_error": float(np.nanmean(curves["warp_error"])),
        "ssim_to_previous": float(curves["ssim_to_previous"].mean()),
    }
    summary = segment_summary(curves)
    scalars.update(summary)
    # The "grey video" failure: contrast and saturation of the last quarter against the first.
    for name in ("contrast", "saturation"):
        scalars[f"{name}_ratio_last_to_first"] = _ratio(summary[f"{name}.last"], summary[f"{name}.first"])
    if conditioning is not None:
        reference = resize_to(conditioning, *frames.shape[1:3])
        scalars["frame0_psnr"] = psnr(frames[0], reference)
        scalars["frame0_ssim"] = ssim(frames[0], reference)
    return VideoMetrics(scalars, curves)

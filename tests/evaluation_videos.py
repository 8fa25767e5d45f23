"""Constructed videos with known answers for the evaluation tests, and an mp4 writer (imageio-ffmpeg's ffmpeg)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import ffmpeg
import imageio_ffmpeg
import numpy as np
from PIL import Image


def texture(height: int, width: int, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    """A smooth random colour texture (uint8 RGB): structure at every place, so optical flow is well defined."""
    noise = np.random.default_rng(seed).normal(size=(height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).round().astype(np.uint8)


def static_video(num_frames: int = 8, size: int = 64) -> np.ndarray:
    return np.repeat(texture(size, size)[None], num_frames, axis=0)


def translating_video(dx: int, dy: int, num_frames: int = 8, size: int = 64) -> np.ndarray:
    """Content moving by (dx, dy) pixels per frame: a window sliding the other way over a larger texture."""
    margin = 4 + num_frames * max(abs(dx), abs(dy))
    canvas = texture(size + 2 * margin, size + 2 * margin, seed=1)
    frames = [canvas[margin - t * dy: margin - t * dy + size, margin - t * dx: margin - t * dx + size]
              for t in range(num_frames)]
    return np.stack(frames)


def fading_to_grey_video(num_frames: int = 12, size: int = 64) -> np.ndarray:
    """Frame 0 a colourful texture, the last frame flat mid-grey, linearly blended in between."""
    start = texture(size, size, seed=2).astype(np.float32)
    alphas = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None, None, None]
    return ((1 - alphas) * start + alphas * 127.5).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """Encode RGB uint8 frames as H.264 mp4 (yuv420p), as the generation stage writes them."""
    _, height, width, _ = frames.shape
    (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
        .output(str(path), vcodec="libx264", pix_fmt="yuv420p", r=fps, crf=12)
        .overwrite_output()
        .run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), input=frames.tobytes(), quiet=True)
    )
    return path


def write_generated(folder: Path, video_id: str, frames: np.ndarray, method: str, seed: int = 0,
                    run: str | None = None, fps: int = 8) -> Path:
    """A generated video as the generation stage leaves it: `<id>.mp4`, `<id>.png` (frame 0) and `<id>.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(frames, folder / f"{video_id}.mp4", fps)
    Image.fromarray(frames[0]).save(folder / f"{video_id}.png")
    record = {"id": video_id, "method": method, "num_frames": len(frames), "fps": fps, "seed": seed,
              "first_frame": f"{video_id}.png"}
    if run is not None:
        record["run"] = run
    (folder / f"{video_id}.json").write_text(json.dumps(record))
    return folder / f"{video_id}.mp4"

"""A synthetic video corpus for tests and the demo: real H.264 mp4 files written by ffmpeg, plus broken ones.

Each good video shows a coloured disc and square bouncing over a gradient at its own speed, size, frame rate and
length, so motion buckets, clip windows and resizing all get varied input. The broken files cover what real
corpora contain: a missing file, zero bytes, text named .mp4, a truncated stream, a clip too short for the
requested length, a tiny frame, a portrait frame and a variable frame rate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np


@dataclass(frozen=True)
class VideoSpec:
    """One synthetic video: frame size, rate, length and how fast its shapes move (pixels per frame)."""

    name: str
    width: int = 64
    height: int = 64
    fps: float = 24.0
    num_frames: int = 24
    speed: float = 2.0
    caption: str = ""
    variable_frame_rate: bool = False


def render_frames(spec: VideoSpec, seed: int = 0) -> np.ndarray:
    """uint8 frames [T, H, W, 3]: a gradient background with a disc and a square bouncing at `spec.speed`."""
    rng = np.random.default_rng(seed)
    h, w = spec.height, spec.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    background = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), np.full_like(x, 0.3)], axis=-1) * 200
    colours = rng.integers(60, 256, size=(2, 3)).astype(np.float32)
    radius = max(min(h, w) // 6, 2)
    start = rng.uniform(radius, [w - radius, h - radius], size=(2, 2))
    direction = rng.normal(size=(2, 2))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    frames = np.empty((spec.num_frames, h, w, 3), dtype=np.uint8)
    for t in range(spec.num_frames):
        frame = background.copy()
        for shape, (colour, origin, heading) in enumerate(zip(colours, start, direction)):
            cx, cy = bounce(origin + heading * spec.speed * t, (w, h), radius)
            if shape == 0:
                inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
            else:
                inside = (abs(x - cx) <= radius) & (abs(y - cy) <= radius)
            frame[inside] = colour
        frames[t] = frame.astype(np.uint8)
    return frames


def bounce(position: np.ndarray, size: tuple[int, int], radius: int) -> tuple[float, float]:
    """Reflect a free-moving position back into the frame, as a ball bouncing off the walls."""
    out = []
    for p, extent in zip(position, size):
        span = max(extent - 2 * radius, 1)
        q = (p - radius) % (2 * span)
        out.append(radius + (q if q <= span else 2 * span - q))
    return out[0], out[1]


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, variable_frame_rate: bool = False,
              preset: str = "ultrafast") -> Path:
    """Encode uint8 frames [T, H, W, 3] as H.264 mp4 with the imageio-ffmpeg binary, atomically.

    With `variable_frame_rate`, the second half of the frames is shown three times as long as the first half
    (timestamps rewritten, frames kept), which is how screen recordings and phone videos often look. `preset` is
    x264's speed/size trade-off: "ultrafast" for tests, "medium" (x264's default) for realistic decode cost.
    """
    path = Path(path)
    num_frames, height, width, _ = frames.shape
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
    options = {"vcodec": "libx264", "pix_fmt": "yuv420p", "movflags": "+faststart", "format": "mp4",
               "preset": preset}
    if variable_frame_rate:
        half = num_frames // 2
        stream = stream.filter("setpts", f"if(lt(N,{half}),N,{half}+3*(N-{half}))/({fps}*TB)")
        options["fps_mode"] = "vfr"
    tmp = path.with_name(f".{path.name}.tmp")
    (stream.output(str(tmp), **options).overwrite_output()
     .run(cmd=imageio_ffmpeg.get_ffmpeg_exe(), input=frames.tobytes(), quiet=True))
    os.replace(tmp, path)
    return path


GOOD_VIDEOS = (
    VideoSpec("calm_square", fps=24, num_frames=24, speed=0.5, caption="a slow red disc drifting"),
    VideoSpec("fast_wide", width=96, height=64, fps=30, num_frames=36, speed=6.0, caption="shapes racing across"),
    VideoSpec("medium_long", fps=25, num_frames=48, speed=2.0, caption=""),
    VideoSpec("big_frame", width=128, height=96, fps=24, num_frames=30, speed=3.0, caption="a bouncing square"),
    VideoSpec("portrait", width=64, height=96, fps=24, num_frames=24, speed=2.0, caption="a tall phone video"),
)

BROKEN_VIDEOS = (
    "missing.mp4", "zero_bytes.mp4", "not_a_video.mp4", "truncated.mp4", "too_short.mp4", "tiny.mp4", "vfr.mp4",
)


def write_corpus(root: str | os.PathLike, good: tuple[VideoSpec, ...] = GOOD_VIDEOS, broken: bool = True,
                 seed: int = 0) -> Path:
    """Write videos under `root/videos` and a JSON-list manifest `root/metadata.json`; return the manifest path.

    The manifest uses the reference corpora's layout (`path` relative to the manifest, caption under `cap`).
    With `broken`, it also lists the files named in BROKEN_VIDEOS (one of which does not exist).
    """
    root = Path(root)
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, spec in enumerate(good):
        write_mp4(videos / f"{spec.name}.mp4", render_frames(spec, seed + i), spec.fps)
        entries.append({"path": f"videos/{spec.name}.mp4", "cap": spec.caption})
    if broken:
        _write_broken(videos, seed)
        entries += [{"path": f"videos/{name}", "cap": f"broken: {name}"} for name in BROKEN_VIDEOS]
    manifest = root / "metadata.json"
    manifest.write_text(json.dumps(entries, indent=1))
    return manifest


def _write_broken(videos: Path, seed: int) -> None:
    (videos / "zero_bytes.mp4").write_bytes(b"")
    (videos / "not_a_video.mp4").write_text("this is a text file that only has a video's name\n" * 20)
    full = write_mp4(videos / "truncated.mp4", render_frames(VideoSpec("t", num_frames=48, speed=3), seed), 24)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 3])
    write_mp4(videos / "too_short.mp4", render_frames(VideoSpec("s", num_frames=3), seed), 24)
    write_mp4(videos / "tiny.mp4", render_frames(VideoSpec("tiny", width=16, height=16, num_frames=24), seed), 24)
    write_mp4(videos / "vfr.mp4", render_frames(VideoSpec("v", num_frames=24), seed), 24, variable_frame_rate=True)

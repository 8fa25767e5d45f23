"""Writing outputs atomically: H.264 mp4 through ffmpeg-python with the imageio-ffmpeg binary, PNG, JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np
import PIL.Image


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name next to `path` to write to; it becomes `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def discard_temporary(folder: Path) -> list[str]:
    """Delete what `atomic_path` writers killed mid-write (a lost node, a killed worker) left in `folder`.

    Call it only when no writer is running: a live writer's temporary file looks the same.
    """
    left = sorted(folder.glob(".*.tmp-*")) if folder.is_dir() else []
    for path in left:
        path.unlink(missing_ok=True)
    return [path.name for path in left]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` and move the result to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, record: dict) -> Path:
    return write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def write_png(path: str | os.PathLike, image: PIL.Image.Image) -> Path:
    return write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int = 17) -> Path:
    """Encode uint8 frames `[T, H, W, 3]` as H.264 (yuv420p) at `fps`, every frame kept, written atomically."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    count, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")

    def encode(tmp: Path) -> None:
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        stream = stream.output(str(tmp), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf, r=fps,
                               movflags="+faststart")
        try:
            ffmpeg.run(stream, cmd=imageio_ffmpeg.get_ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes(),
                       capture_stdout=True, capture_stderr=True, overwrite_output=True)
        except ffmpeg.Error as exc:
            tail = exc.stderr.decode(errors="replace")[-800:]
            raise RuntimeError(f"ffmpeg could not write {path} ({count} frames {width}x{height}): {tail}") from None

    return write_atomically(path, encode)

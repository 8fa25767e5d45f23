"""Probe a video with decord: frames, rate, size, duration, and whether it can feed the requested clips.

Every way a source can be unusable raises SourceError with a ledger code, checked cheapest first: the file
(missing, empty), the container (not a video, corrupt), then the stream against the config (too short, too
small, portrait, variable frame rate).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import decord
import numpy as np
import pyarrow.fs as pafs
from decord import VideoReader

from preprocessing.config import PreprocessConfig
from preprocessing.ledger import SourceError
from preprocessing.manifest import filesystem_and_path

# FFmpeg would print its own complaint about every unreadable file (moov atom not found, partial file) to the
# worker's stderr; the ledger already records each one with its reason.
decord.logging.set_level(decord.logging.QUIET)

# Leading bytes of the containers videos come in, to tell "not a video" from "a damaged video".
_SIGNATURES = (
    (4, b"ftyp"),                 # mp4, mov, m4v, 3gp
    (0, b"\x1a\x45\xdf\xa3"),     # matroska, webm
    (0, b"RIFF"),                 # avi
    (0, b"FLV"),
    (0, b"\x00\x00\x01\xba"),     # mpeg program stream
    (0, b"\x47"),                 # mpeg transport stream
)


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learnt about a source."""

    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class VideoFile:
    """A source's bytes or local path, so decord can open it more than once (probe, then decode resized)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        """`uri` on the filesystem its scheme names, or a path inside `filesystem` when one is given."""
        self.uri = uri
        try:
            fs, path = (filesystem, uri) if filesystem is not None else filesystem_and_path(uri)
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise SourceError("probe", "missing_file", f"no file at {uri}")
            if info.size == 0:
                raise SourceError("probe", "empty_file", f"{uri} has zero bytes")
            self._local = path if isinstance(fs, pafs.LocalFileSystem) else None
            self._data = None
            if self._local is None:
                with fs.open_input_stream(path) as stream:
                    self._data = stream.read()
        except (OSError, ValueError) as exc:  # permissions, network, an unknown URI scheme
            raise SourceError("probe", "read_error", f"cannot read {uri}: {exc}") from None

    def head(self, size: int = 16) -> bytes:
        if self._data is not None:
            return self._data[:size]
        with open(self._local, "rb") as handle:
            return handle.read(size)

    def reader(self, width: int = -1, height: int = -1, threads: int = 1) -> VideoReader:
        """A decord reader; with width and height, frames are scaled inside the decoder."""
        source = self._local if self._local is not None else io.BytesIO(self._data)
        return VideoReader(source, width=width, height=height, num_threads=threads)


def _looks_like_video(head: bytes) -> bool:
    return any(head[offset:offset + len(magic)] == magic for offset, magic in _SIGNATURES)


def _decoder_message(exc: Exception) -> str:
    """decord's error text without its timestamp and source-file prefix."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", first_line)[:300]


def _frame_interval_spread(reader: VideoReader) -> float:
    """(95th - 5th percentile of frame intervals) / median interval: 0 for a perfectly constant rate."""
    starts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    intervals = np.diff(starts)
    if len(intervals) < 2:
        return 0.0
    low, median, high = np.percentile(intervals, [5, 50, 95])
    return float((high - low) / median) if median > 0 else float("inf")


def probe(video: VideoFile, cfg: PreprocessConfig) -> VideoInfo:
    """Open `video` and check it against `cfg`; raise SourceError naming the first problem found."""
    try:
        reader = video.reader(threads=cfg.decode_threads)
        height, width = reader[0].shape[:2]
        info = VideoInfo(len(reader), float(reader.get_avg_fps()), int(width), int(height))
        spread = _frame_interval_spread(reader)
    except Exception as exc:  # decord raises RuntimeError, DECORDError or AssertionError depending on the damage
        message = _decoder_message(exc)
        if _looks_like_video(video.head()):
            raise SourceError("probe", "corrupt_stream",
                              f"{video.uri} has a video container header but cannot be read: {message}") from None
        raise SourceError("probe", "not_a_video",
                          f"{video.uri} is not a video container the decoder knows: {message}") from None
    if info.num_frames < cfg.clip_span:
        raise SourceError("probe", "too_short",
                          f"{info.num_frames} frames ({info.duration:.2f} s), but one clip of {cfg.num_frames} "
                          f"frames at stride {cfg.frame_stride} spans {cfg.clip_span}")
    upscale = max(cfg.width / info.width, cfg.height / info.height)
    if upscale > cfg.max_upscale:
        raise SourceError("probe", "too_small",
                          f"{info.width}x{info.height} must be upscaled {upscale:.2f}x to cover "
                          f"{cfg.width}x{cfg.height} (max_upscale {cfg.max_upscale})")
    if info.height > info.width and not cfg.allow_portrait:
        raise SourceError("probe", "portrait", f"{info.width}x{info.height} is portrait and allow_portrait is off")
    if cfg.reject_variable_frame_rate and spread > cfg.frame_rate_tolerance:
        raise SourceError("probe", "variable_frame_rate",
                          f"frame intervals spread {spread:.2f} of the median (tolerance "
                          f"{cfg.frame_rate_tolerance}); average {info.fps:.2f} fps")
    return info

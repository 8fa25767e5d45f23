"""Decode a clip with decord, scaled in the decoder, then centre-cropped to the target size; and its motion bucket.

The short side is scaled to the target inside the decoder (ffmpeg's scaler, in decord's thread), which is several
times faster than decoding at native size and resizing afterwards (benchmarks/RESULTS.md, "Clip decode +
resize"). The crop then only drops pixels, so the frames reach the encoder without a second interpolation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from decord._ffi.base import DECORDError

from exvideo.motion import bucket_of_score, motion_score
from preprocessing.probe import VideoFile

# Frames decoded per call before cropping into the clip's buffer.
_DECODE_CHUNK = 16
# Rows per slice when scoring motion: keeps the float64 copy that the score takes to a few hundred MB at 512x512.
_MOTION_ROWS = 64


def scaled_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """(width, height) after scaling so the frame covers the target with its aspect ratio kept."""
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def centre_crop_box(width: int, height: int, target_width: int, target_height: int) -> list[int]:
    """[left, top, width, height] of the centred target-sized window in a (width x height) frame."""
    return [(width - target_width) // 2, (height - target_height) // 2, target_width, target_height]


class ClipDecoder:
    """Decodes clips of one video at the target size: scaled to cover it, then centre-cropped.

    Scaling happens in the decoder. decord's in-decoder scaler mis-sizes a few output widths (16, 24, 48, 72 among
    them: its buffer check fails with "must exactly match"); for those the video is decoded at native size and
    scaled with torch (antialiased bilinear) instead, so every size works and the common ones stay fast.
    """

    def __init__(self, video: VideoFile, width: int, height: int, target_width: int, target_height: int,
                 threads: int = 1):
        self.video, self.threads = video, threads
        self.width, self.height = scaled_size(width, height, target_width, target_height)
        self.crop = centre_crop_box(self.width, self.height, target_width, target_height)
        self.scaled_in_decoder = True
        self._reader = video.reader(width=self.width, height=self.height, threads=threads)

    def _frames(self, frame_indices: list[int]) -> np.ndarray:
        if self.scaled_in_decoder:
            try:
                return self._reader.get_batch(frame_indices).asnumpy()
            except DECORDError as exc:
                if "must exactly match" not in str(exc):
                    raise
                self.scaled_in_decoder, self._reader = False, self.video.reader(threads=self.threads)
        native = torch.from_numpy(self._reader.get_batch(frame_indices).asnumpy()).permute(0, 3, 1, 2).float()
        scaled = F.interpolate(native, size=(self.height, self.width), mode="bilinear", antialias=True)
        return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def clip(self, frame_indices: list[int]) -> np.ndarray:
        """uint8 frames [T, H, W, 3] of `frame_indices` at the target size."""
        left, top, width, height = self.crop
        out = np.empty((len(frame_indices), height, width, 3), dtype=np.uint8)
        # In chunks: a whole 128-frame batch at the scaled size is a fresh ~180 MB allocation per clip, whose page
        # faults cost more system time than the copy saves.
        for start in range(0, len(frame_indices), _DECODE_CHUNK):
            frames = self._frames(frame_indices[start:start + _DECODE_CHUNK])
            if frames.shape[1] != self.height or frames.shape[2] != self.width:
                raise ValueError(f"decoder returned {frames.shape[2]}x{frames.shape[1]} frames, expected "
                                 f"{self.width}x{self.height}")
            out[start:start + len(frames)] = frames[:, top:top + height, left:left + width]
        return out


def clip_motion(frames: np.ndarray) -> tuple[int, float]:
    """(motion bucket, score) of uint8 frames [T, H, W, 3] exactly as `exvideo.motion` defines it on [-1, 1] pixels.

    The mean over pixels of the per-pixel std over time is a mean of equal-weighted parts, so it is computed over
    row slices and combined by pixel count: the same number without a full float64 copy of the clip.
    """
    total, count = 0.0, 0
    for top in range(0, frames.shape[1], _MOTION_ROWS):
        part = torch.from_numpy(frames[:, top:top + _MOTION_ROWS]).float() / 127.5 - 1
        pixels = part[0].numel()
        total += motion_score(part) * pixels
        count += pixels
    score = total / count
    return bucket_of_score(score), score

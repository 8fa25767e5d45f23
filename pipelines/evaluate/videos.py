"""Finding generated videos and their JSON records, and decoding them with decord.

The generation stage leaves, per video, `<stem>.mp4` and `<stem>.json` (same stem) and usually the first-frame PNG
the video was conditioned on. A video without a record, a record without a video, an unreadable file or a frame
count that disagrees with the record is reported with its reason; the others are evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field, ValidationError


class VideoRecord(BaseModel):
    """The fields of a generation record that evaluation uses; any others are kept but not read."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str
    method: str
    # The generation job's records say `frames` and keep the first frame under `outputs`.
    num_frames: int = Field(ge=1, validation_alias=AliasChoices("num_frames", "frames"))
    fps: float = Field(gt=0)
    seed: int
    run: str | None = None
    conditioning_image: Path | None = Field(
        None, validation_alias=AliasChoices("conditioning_image", "first_frame", "first_frame_png", "image",
                                      AliasPath("outputs", "first_frame")),
    )


@dataclass
class GeneratedVideo:
    """One video to evaluate: its files, its record, and (after `decode`) its frames."""

    video_path: Path
    record: VideoRecord
    run: str

    @property
    def conditioning_path(self) -> Path | None:
        image = self.record.conditioning_image
        if image is None:
            return None
        # Records name the image relative to their own folder unless the path is absolute.
        return image if image.is_absolute() else self.video_path.parent / image


@dataclass
class Skipped:
    """An input that was not evaluated, and why."""

    path: Path
    reason: str


def find_videos(folder: Path) -> tuple[list[GeneratedVideo], list[Skipped]]:
    """Every `<stem>.mp4` with a valid `<stem>.json` in `folder` (sorted by name), and what was skipped and why."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"videos folder {folder} does not exist; point videos_dir at the generation output")
    found, skipped = [], []
    for video_path in sorted(folder.glob("*.mp4")):
        record_path = video_path.with_suffix(".json")
        if not record_path.is_file():
            skipped.append(Skipped(video_path, f"no record {record_path.name} beside the video"))
            continue
        try:
            record = VideoRecord.model_validate(json.loads(record_path.read_text()))
        except (json.JSONDecodeError, ValidationError) as exc:
            skipped.append(Skipped(record_path, f"invalid record: {_first_line(exc)}"))
            continue
        found.append(GeneratedVideo(video_path, record, record.run or folder.name))
    for record_path in sorted(folder.glob("*.json")):
        if not record_path.with_suffix(".mp4").is_file():
            skipped.append(Skipped(record_path, f"record without a video ({record_path.with_suffix('.mp4').name})"))
    return found, skipped


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def read_frames(path: Path) -> np.ndarray:
    """Every frame of a video file as RGB uint8 `[T, H, W, 3]` (decord); ValueError if it cannot be decoded."""
    import decord  # imported lazily: decord loads its native library on import

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        return reader.get_batch(list(range(len(reader)))).asnumpy()
    except (decord.DECORDError, RuntimeError) as exc:
        raise ValueError(f"{path} cannot be decoded: {_first_line(exc)}") from None


def decode(video: GeneratedVideo) -> np.ndarray:
    """All frames of the video; ValueError if it is unreadable or its frame count differs from the record's."""
    frames = read_frames(video.video_path)
    if len(frames) != video.record.num_frames:
        raise ValueError(
            f"{video.video_path} has {len(frames)} frames but its record says num_frames={video.record.num_frames}"
        )
    return frames


def load_conditioning(video: GeneratedVideo) -> np.ndarray | None:
    """The conditioning (first-frame) image as RGB uint8, or None when the record names none."""
    path = video.conditioning_path
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"{video.record.id}: conditioning image {path} named by its record does not exist")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))

"""The shard sample contract (docs/method.md, section 4): one cached training clip as WebDataset entries.

Preprocessing writes these, re-sharding copies and filters them, training reads them. Each sample is

    __key__            unique, stable key of the clip (source hash + clip index)
    latents.npy        float16 [T, 4, H/8, W/8]: VAE posterior mean times the VAE scaling factor
    cond_latent.npy    float16 [4, H/8, W/8]: unscaled VAE latent (posterior mode) of frame 0
    image_embeds.npy   float16 [1, D]: CLIP image embedding of frame 0
    json               the ClipRecord below

Arrays are `.npy` written without pickling and read with `allow_pickle=False`: loading a shard never runs code.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from exvideo.objective import LatentBatch, added_time_ids

ARRAYS = ("latents", "cond_latent", "image_embeds")


class SampleFormatError(ValueError):
    """A shard sample does not follow the contract; the message names the key and the problem."""


@dataclass
class ClipRecord:
    """Provenance and conditioning of one clip; stored as the sample's `json` entry."""

    source: str
    fps: float
    frame_indices: list[int]
    motion_bucket: int
    caption: str = ""
    motion_score: float = 0.0
    crop: list[int] = field(default_factory=list)  # [left, top, width, height] in the resized frame
    height: int = 0
    width: int = 0
    config_hash: str = ""
    encoder_fingerprint: str = ""
    vae_scaling_factor: float = 0.18215

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


@dataclass
class LatentClip:
    """One decoded sample."""

    key: str
    latents: np.ndarray
    cond_latent: np.ndarray
    image_embeds: np.ndarray
    record: ClipRecord


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(clip: LatentClip) -> dict[str, bytes | str]:
    """The WebDataset entries of a clip, ready for `webdataset.TarWriter.write`."""
    _check_shapes(clip)
    entries: dict[str, bytes | str] = {"__key__": clip.key}
    for name in ARRAYS:
        entries[f"{name}.npy"] = _npy_bytes(getattr(clip, name).astype(np.float16))
    entries["json"] = json.dumps(asdict(clip.record), sort_keys=True).encode()
    return entries


def decode_sample(sample: dict) -> LatentClip:
    """Parse raw WebDataset entries (bytes per extension) into a LatentClip, checking the contract."""
    key = sample.get("__key__", "<no key>")
    missing = [f"{n}.npy" for n in ARRAYS if f"{n}.npy" not in sample] + ([] if "json" in sample else ["json"])
    if missing:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise SampleFormatError(f"sample {key} lacks {missing} (has {present})")
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
        except ValueError as exc:
            raise SampleFormatError(f"sample {key}: {name}.npy is not a plain .npy array: {exc}") from None
    try:
        record = ClipRecord(**json.loads(sample["json"]))
    except (TypeError, ValueError) as exc:
        raise SampleFormatError(f"sample {key}: json record is invalid: {exc}") from None
    clip = LatentClip(key=key, record=record, **arrays)
    _check_shapes(clip)
    return clip


def _check_shapes(clip: LatentClip) -> None:
    lat, cond, emb = clip.latents, clip.cond_latent, clip.image_embeds
    if lat.ndim != 4 or cond.ndim != 3 or emb.ndim != 2 or emb.shape[0] != 1:
        raise SampleFormatError(
            f"sample {clip.key}: expected latents [T,C,h,w], cond_latent [C,h,w], image_embeds [1,D]; got "
            f"{lat.shape}, {cond.shape}, {emb.shape}"
        )
    if lat.shape[1:] != cond.shape:
        raise SampleFormatError(f"sample {clip.key}: latents {lat.shape} and cond_latent {cond.shape} disagree")
    if lat.shape[0] != clip.record.num_frames:
        raise SampleFormatError(
            f"sample {clip.key}: {lat.shape[0]} latent frames but the record lists {clip.record.num_frames}"
        )


def collate(clips: list[LatentClip], noise_aug: float = 0.0, fps: float | None = None) -> LatentBatch:
    """Stack clips of equal shape into a training batch: motion bucket from each clip's record, and fps `fps` for
    every clip, or each clip's own (its record) when None."""
    shapes = {c.latents.shape for c in clips}
    if len(shapes) != 1:
        raise SampleFormatError(f"cannot batch clips of different shapes {sorted(shapes)}; use batch size 1 or bucket")
    return LatentBatch(
        latents=torch.from_numpy(np.stack([c.latents for c in clips])).float(),
        cond_latent=torch.from_numpy(np.stack([c.cond_latent for c in clips])).float(),
        image_embeds=torch.from_numpy(np.stack([c.image_embeds for c in clips])).float(),
        added_time_ids=added_time_ids(
            torch.tensor([c.record.fps if fps is None else fps for c in clips]),
            torch.tensor([c.record.motion_bucket for c in clips]),
            noise_aug=noise_aug,
        ),
    )

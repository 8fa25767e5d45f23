"""The shard sample contract (docs/method.md, section 4): one cached training clip as WebDataset entries.

Preprocessing writes these, re-sharding copies and filters them, training reads them. Each sample is

    __key__            unique, stable key of the clip (source hash + clip index)
    latents.npy        float16 [T, 4, H/8, W/8]: VAE posterior mean times the VAE scaling factor
    json               the ClipRecord below; its `model_family` says which conditioning entries follow

and the family's conditioning:

    svd          cond_latent.npy    float16 [4, H/8, W/8]: unscaled VAE latent (posterior mode) of frame 0
                 image_embeds.npy   float16 [1, D]: CLIP image embedding of frame 0
    animatediff  text_embeds.npy    float16 [L, D]: CLIP text encoder's last hidden state of the caption

Arrays are `.npy` written without pickling and read with `allow_pickle=False`: loading a shard never runs code.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from exvideo.motion_objective import TextLatentBatch
from exvideo.objective import LatentBatch, added_time_ids

# The array entries of a sample, per model family.
FAMILY_ARRAYS = {"svd": ("latents", "cond_latent", "image_embeds"), "animatediff": ("latents", "text_embeds")}
ALL_ARRAYS = tuple(dict.fromkeys(name for names in FAMILY_ARRAYS.values() for name in names))


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
    model_family: str = "svd"  # shards written before AnimateDiff was served have no field: they are SVD's

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


@dataclass
class LatentClip:
    """One decoded sample: the latents, and the conditioning arrays of its family (the others are None)."""

    key: str
    latents: np.ndarray
    record: ClipRecord
    cond_latent: np.ndarray | None = None
    image_embeds: np.ndarray | None = None
    text_embeds: np.ndarray | None = None

    @property
    def arrays(self) -> tuple[str, ...]:
        """Names of the array entries this clip's family stores."""
        return family_arrays(self.record.model_family, self.key)


def family_arrays(family: str, key: str) -> tuple[str, ...]:
    if family not in FAMILY_ARRAYS:
        raise SampleFormatError(f"sample {key}: model_family {family!r} is not one of {sorted(FAMILY_ARRAYS)}")
    return FAMILY_ARRAYS[family]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(clip: LatentClip) -> dict[str, bytes | str]:
    """The WebDataset entries of a clip, ready for `webdataset.TarWriter.write`."""
    _check_shapes(clip)
    entries: dict[str, bytes | str] = {"__key__": clip.key}
    for name in clip.arrays:
        entries[f"{name}.npy"] = _npy_bytes(getattr(clip, name).astype(np.float16))
    entries["json"] = json.dumps(asdict(clip.record), sort_keys=True).encode()
    return entries


def decode_sample(sample: dict) -> LatentClip:
    """Parse raw WebDataset entries (bytes per extension) into a LatentClip, checking the contract."""
    key = sample.get("__key__", "<no key>")
    present = sorted(k for k in sample if not k.startswith("__"))
    if "json" not in sample:
        raise SampleFormatError(f"sample {key} lacks ['json'] (has {present})")
    try:
        record = ClipRecord(**json.loads(sample["json"]))
    except (TypeError, ValueError) as exc:
        raise SampleFormatError(f"sample {key}: json record is invalid: {exc}") from None
    names = family_arrays(record.model_family, key)
    missing = [f"{n}.npy" for n in names if f"{n}.npy" not in sample]
    if missing:
        raise SampleFormatError(f"sample {key} ({record.model_family}) lacks {missing} (has {present})")
    arrays = {}
    for name in names:
        try:
            arrays[name] = np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False)
        except ValueError as exc:
            raise SampleFormatError(f"sample {key}: {name}.npy is not a plain .npy array: {exc}") from None
    clip = LatentClip(key=key, record=record, **arrays)
    _check_shapes(clip)
    return clip


def _check_shapes(clip: LatentClip) -> None:
    absent = [name for name in clip.arrays if getattr(clip, name) is None]
    if absent:
        raise SampleFormatError(f"sample {clip.key}: a {clip.record.model_family} clip needs {absent}")
    lat = clip.latents
    if clip.record.model_family == "animatediff":
        if lat.ndim != 4 or clip.text_embeds.ndim != 2:
            raise SampleFormatError(f"sample {clip.key}: expected latents [T,C,h,w], text_embeds [L,D]; got "
                                    f"{lat.shape}, {clip.text_embeds.shape}")
    else:
        cond, emb = clip.cond_latent, clip.image_embeds
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


def collate(clips: list[LatentClip], noise_aug: float = 0.0,
            fps: float | None = None) -> LatentBatch | TextLatentBatch:
    """Stack clips of equal shape and family into a training batch of that family.

    SVD: motion bucket from each clip's record, and fps `fps` for every clip, or each clip's own (its record)
    when None. AnimateDiff: latents and caption embeddings.
    """
    shapes = {c.latents.shape for c in clips}
    if len(shapes) != 1:
        raise SampleFormatError(f"cannot batch clips of different shapes {sorted(shapes)}; use batch size 1 or bucket")
    families = {c.record.model_family for c in clips}
    if len(families) != 1:
        raise SampleFormatError(f"cannot batch clips of different model families {sorted(families)}")
    if families == {"animatediff"}:
        return TextLatentBatch(latents=torch.from_numpy(np.stack([c.latents for c in clips])).float(),
                               text_embeds=torch.from_numpy(np.stack([c.text_embeds for c in clips])).float())
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

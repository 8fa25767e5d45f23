"""The preprocessing and re-sharding stages' typed configurations, and the hash that ties an output folder to
preprocessing's. Torch-free, like every stage's config module: a spec validates without loading a model library."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from exvideo.config import StageConfig, operational

# Bump when the bytes a run writes change for the same config (sample layout, window choice, resize rule).
FORMAT_VERSION = 1


class PreprocessConfig(StageConfig):
    """Corpus -> WebDataset latent shards. Sizes default to the reference's training clips (128 x 512 x 512)."""

    input: str = Field(..., description="manifest (.json list, .jsonl, .csv, .parquet) or a folder of videos; "
                                        "local path or any URI pyarrow opens (s3://, gs://, hdfs://)")
    output: Path = Field(..., description="output folder (local): shards, index, ledger, run manifest")
    model: Path = Field(..., description="local diffusers-format checkpoint (SVD or AnimateDiff) whose VAE and "
                                         "CLIP encoder to use")
    family: Literal["svd", "animatediff"] | None = Field(
        None, description="the model's family; unset: read from the checkpoint's model_index.json")
    default_prompt: str | None = Field(
        None, min_length=1, description="AnimateDiff: caption of clips whose manifest row has none (unset: such "
                                        "sources go to the ledger)")

    # What a clip is.
    num_frames: int = Field(128, ge=2)
    frame_stride: int = Field(1, ge=1, description="take every n-th source frame")
    clips_per_video: int = Field(1, ge=1, description="1: the first window only; n: up to n windows per video")
    clip_spacing: int | None = Field(None, ge=1, description="source frames between window starts "
                                                             "(default: the window's span, so windows never overlap)")
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)

    # Which sources are accepted.
    max_upscale: float = Field(2.0, gt=0, description="refuse sources whose short side must grow more than this")
    allow_portrait: bool = True
    reject_variable_frame_rate: bool = True
    frame_rate_tolerance: float = Field(0.2, gt=0, description="largest relative spread of frame intervals "
                                                               "(5th to 95th percentile) still called constant")

    # Encoding.
    encode_batch_size: int = operational(1, ge=1, description="clips per encoder call")
    # The VAE encoder is per frame, so how many frames share a forward pass bounds memory and nothing else.
    vae_chunk_frames: int = operational(16, ge=1, description="frames per VAE forward pass (bounds memory)")
    encode_actors: int = operational(1, ge=1, description="size of the encoder actor pool")
    encode_device: Literal["auto", "cpu", "cuda"] = operational("auto")
    gpus_per_actor: float = operational(1.0, gt=0, le=1)
    encode_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    # Decoding and output.
    decode_threads: int = operational(1, ge=0, description="decord threads per decode task (0: decord decides)")
    shard_max_samples: int = Field(64, ge=1)
    shard_max_bytes: int = Field(1 << 30, ge=1)

    # Where it runs.
    ray_address: str | None = operational(None, description="existing Ray cluster; none starts a local Ray")
    progress: bool = operational(True)

    @property
    def clip_span(self) -> int:
        """Source frames one clip covers, first to last inclusive."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def content_fields(self) -> dict:
        """The output fields that decide what the run writes (not output or model), JSON-ready."""
        # Where the output and the weights live is not what the run writes: a moved folder stays resumable, and
        # the encoder's weights (and so the model's family) are checked by their own fingerprint.
        data = self.output_fields(exclude={"output", "model", "family"})
        data["format_version"] = FORMAT_VERSION
        return data

    def content_hash(self) -> str:
        """Short hash of `content_fields`; shards, index and records carry it."""
        return hashlib.sha256(json.dumps(self.content_fields(), sort_keys=True).encode()).hexdigest()[:16]


class ReshardConfig(StageConfig):
    """Which samples to keep, in what order, in shards of what size."""

    input: Path = Field(..., description="a shard set: a folder with index.parquet and shards/")
    output: Path
    shard_max_samples: int = Field(64, ge=1)
    shard_max_bytes: int = Field(1 << 30, ge=1)
    motion_bucket_min: int = Field(0, ge=0, le=127)
    motion_bucket_max: int = Field(127, ge=0, le=127)
    sources: list[str] = Field(default_factory=list, description="keep sources matching any of these globs")
    require_caption: bool = False
    keys_file: Path | None = Field(None, description="keep only the keys listed in this file, one per line")
    shuffle_seed: int | None = Field(None, description="shuffle with this seed; none keeps the input order")
    ray_address: str | None = operational(None, description="existing Ray cluster; none starts a local Ray")
    progress: bool = operational(True)

    @model_validator(mode="after")
    def _filters_can_keep_something(self) -> "ReshardConfig":
        if self.motion_bucket_min > self.motion_bucket_max:
            raise ValueError(f"motion_bucket_min {self.motion_bucket_min} > motion_bucket_max "
                             f"{self.motion_bucket_max}: no sample could pass")
        if self.keys_file is not None and not self.keys_file.is_file():
            raise ValueError(f"keys_file {self.keys_file} does not exist; give a file with one sample key per line")
        return self

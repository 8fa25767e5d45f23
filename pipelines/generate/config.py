"""The generation job's typed configuration (`exvideo generate`, the workflow's generate section).

Torch-free, like every stage's config module: a spec validates without loading a model library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from exvideo.config import StageConfig, operational
from exvideo.speed_options import SpeedOptions
from pipelines.generate.params import GenerationParams


class GenerateJobConfig(StageConfig):
    """A generation job: where rows come from and outputs go, the model, and the default per-video parameters."""

    input: Path = Field(Path("rows.jsonl"),
                        description="rows (.jsonl, .csv, .parquet), one video each: its id and an image or a prompt")
    output: Path = Path("runs/generate")
    model: Path = Field(Path("checkpoints/stable-video-diffusion-img2vid-xt"),
                        description="local diffusers checkpoint: SVD (image-to-video) or AnimateDiff (text-to-video)")
    family: Literal["svd", "animatediff"] | None = Field(
        None, description="the checkpoint's family; unset: read from its model_index.json (none: SVD)")
    adapter: Path | None = Field(None, description="post-tuned adapter: exvideo train's or the reference layout")
    # Without an adapter, exvideo extends the UNet to this many frames with the identity initialisation.
    table_frames: int = Field(128, ge=2)
    text_to_image: Path | None = Field(
        None, description="SVD only: local diffusers text-to-image pipeline that makes prompt rows' first frames")
    text_to_image_steps: int = Field(30, ge=1)
    params: GenerationParams = GenerationParams()
    # Model replicas; default one per GPU in the Ray cluster, or one on the CPU when there is none.
    workers: int | None = operational(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = operational("auto")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # How the UNet computes (exvideo.speed): layout, attention backend, compiled blocks, batched guidance.
    speed: SpeedOptions = operational(default_factory=SpeedOptions)
    ray_address: str | None = operational(None)

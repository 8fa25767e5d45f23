"""The training stage's configuration: one typed object, the single source of truth for a run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from exvideo.config import StageConfig, default_tracking_uri, operational
from exvideo.families import checkpoint_family
from exvideo.speed_options import SpeedOptions, compiles_on, refuse_generation_switches


class TrainConfig(StageConfig):
    """Post-tuning of the ExVideo temporal modules on cached latent shards.

    A run is identified by `storage_path` / `name`: re-running the same command resumes it from its latest checkpoint.
    """

    svd_dir: Path = Field(description="local diffusers-format checkpoint, SVD or AnimateDiff (only its unet/ is "
                                      "loaded, and AnimateDiff's scheduler/, whose noise schedule is the objective's)")
    family: Literal["svd", "animatediff"] | None = Field(
        None, description="the checkpoint's family; unset: read from its model_index.json")
    shards: str = Field(description="shard directory, glob ('data/*.tar') or brace pattern ('shard-{000..009}.tar')")
    storage_path: Path = Path("runs/train")
    name: str = "exvideo"

    num_frames: int = Field(128, ge=2, description="length of the position tables (the longest video it can make)")
    base_frames: int | None = Field(None, ge=3, description="clip length the base model was trained on (unset: the "
                                                            "family's, SVD 25, AnimateDiff 16); the position table "
                                                            "keeps these positions and bounces later frames")
    trainable: Literal["temporal", "all"] = Field(
        "temporal", description="temporal: ExVideo post-tuning; all: train every weight of the plain (unextended) "
                                "UNet, to train a base model from scratch; checkpoints then hold every UNet tensor")
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1, description="clips per worker per step")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    cond_dropout: float = Field(0.0, ge=0, le=1, description="probability of dropping SVD's image conditioning (CFG)")
    ema_decay: float | None = Field(0.9, gt=0, lt=1, description="EMA of trainable weights, updated at checkpoints")
    seed: int = 0
    shuffle_buffer: int = Field(0, ge=0, description="samples held for shuffling within a worker's stream (0: off)")
    fps_condition: int | Literal["clip"] = Field(
        30, description="fps in SVD's micro-conditioning: a number for every clip (30, as the reference trains), or "
                        "clip: each clip's own rate (source fps / frame stride); the adapter records it and "
                        "generation defaults to it")

    # An output field, unlike the other counts: each worker adds batch_size clips of its own shards to every step,
    # so the worker count sets the global batch and which clips each step sees.
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = operational(False)
    cpus_per_worker: float = operational(1, gt=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: frozen weights in bf16, autocast forward")
    gradient_checkpointing: bool = operational(True)
    speed: SpeedOptions = operational(default_factory=SpeedOptions, description="how the UNet computes (exvideo.speed)")
    zero_optimizer: bool = operational(False, description="shard AdamW state across workers (ZeroRedundancyOptimizer)")
    # An output field: in bf16 the low modes train bf16 working weights (bf16 gradients, bf16 checkpointed adapter)
    # where the default mode keeps fp32 trainable weights under autocast. In fp32 they give AdamW's updates to float32
    # rounding only: the host's AdamW kernel rounds differently from the GPU's, and Adam's division by the running
    # gradient size lets such differences grow where gradients are near zero.
    memory: Literal["default", "low", "lowest"] = Field(
        "default", description="low: AdamW state and fp32 master weights of the trainable tensors in host memory, "
                               "the GPU holding only their working copies in the run's precision; lowest: also the "
                               "tensors the forward saves for backward (pipelines/train/offload.py). For 24 GiB "
                               "cards, at the cost of host copies and a CPU AdamW every step")

    # An output field: the EMA weights are updated at checkpoints.
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = operational(3, ge=1, description="checkpoints kept besides the best adapter")
    max_failures: int = operational(2, ge=-1, description="worker failures to recover from (-1: unlimited)")
    max_nonfinite: int = operational(5, ge=1, description="consecutive non-finite steps before the run stops")
    log_every: int = operational(10, ge=1)

    tracking_uri: str | None = operational(None, description="MLflow store; default: sqlite file in storage_path")
    experiment: str = operational("exvideo-train")
    ray_address: str | None = operational(None, description="existing Ray cluster; none starts a local Ray")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.zero_optimizer and self.num_workers < 2:
            raise ValueError("zero_optimizer shards optimizer state across workers; it needs num_workers >= 2")
        if self.zero_optimizer and self.memory != "default":
            raise ValueError(f"memory={self.memory} keeps the whole AdamW state in host memory, zero_optimizer shards "
                             "it across GPUs: choose one (memory=low saves more GPU memory)")
        # Refuses compile_blocks=true with selective checkpointing now rather than in every worker.
        compiles_on(self.speed, "cuda" if self.use_gpu else "cpu",
                    self.gradient_checkpointing and self.speed.checkpointing == "selective")
        refuse_generation_switches(self.speed)
        if self.fps_condition != "clip" and not 1 <= self.fps_condition <= 240:
            raise ValueError(f"fps_condition {self.fps_condition} must be 1..240 (SVD conditions on fps - 1) or clip")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision bf16 is for GPUs; on CPU use precision=fp32")
        return self

    @property
    def model_family(self) -> str:
        """The checkpoint's family: as declared, else read from its model_index.json; a bare UNet folder is SVD's."""
        return checkpoint_family(self.svd_dir, self.family)

    @property
    def run_dir(self) -> Path:
        return self.storage_path / self.name

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri(self.storage_path)

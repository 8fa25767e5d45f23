"""Per-video generation parameters: one typed object, the same for the Python API, the CLI and each batch row."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from exvideo.config import StageConfig

# ExVideo extends the UNet; the three training-free baselines run the unchanged base model.
Method = Literal["exvideo", "direct", "chain", "windows"]
BASELINES = ("direct", "chain", "windows")


class SecondPass(StageConfig):
    """Video-to-video refinement at a higher resolution: re-noise the upscaled video to `strength`, denoise again.

    As the reference: the pass's `steps` are spread over the last `strength` of the sampling schedule (its noise
    levels are the Karras levels at `linspace(1 - strength, 1, steps)`), not cut from the full schedule.
    """

    height: int = Field(1024, ge=8, multiple_of=8)
    width: int = Field(1024, ge=8, multiple_of=8)
    strength: float = Field(0.5, gt=0, le=1)


class GenerationParams(StageConfig):
    """Everything that decides one video. Defaults are the reference inference settings (docs/method.md, section 3).

    `fps`, `renormalize` and `contrast` left unset take the loaded adapter's sampling defaults
    (`pipelines.generate.defaults`): the reference's for the released checkpoint, what training recorded for ours.
    """

    method: Method = "exvideo"
    num_frames: int = Field(128, ge=2)
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    steps: int = Field(50, ge=1)
    fps: int | None = Field(None, ge=1, le=240, description="micro-conditioning and mp4 frame rate; unset: the adapter's")
    motion_bucket_id: int = Field(127, ge=0, le=255)
    noise_aug_strength: float = Field(0.02, ge=0)
    # Guidance ramps linearly over the frames from min to max; both <= 1 skips the unconditional branch.
    min_guidance: float = Field(2.0, ge=0)
    max_guidance: float = Field(2.0, ge=0)
    seed: int = Field(0, ge=0, lt=2**63)
    # Before decoding, as the reference: optionally give each frame's latent the video's mean/std, then scale all
    # latents by `contrast`. Unset: the adapter's defaults.
    renormalize: bool | None = None
    contrast: float | None = Field(None, gt=0)
    # Frame conditioning: frame index -> image path, or `video.mp4#N` for frame N of a video. At every step the
    # given frames' latents replace the video's, noised to the current level.
    frames: dict[int, str] = Field(default_factory=dict)
    # Longer than the adapter's position table: successive windows of the table's length, each conditioned on the
    # last `overlap` frames of the one before. Unset: a length above the table is an error.
    overlap: int | None = Field(None, ge=1)
    # VAE decode over time in overlapping windows (bounded memory); optionally tiled in space (pixels).
    decode_window: int = Field(8, ge=1)
    decode_stride: int = Field(4, ge=1)
    decode_tile: int | None = Field(None, ge=16, multiple_of=8)
    decode_tile_overlap: int = Field(32, ge=0, multiple_of=8)
    # Baselines: clip length of the base model (chain, windows) and the step between windows (windows).
    clip_frames: int = Field(25, ge=2)
    window_stride: int = Field(12, ge=1)
    second_pass: SecondPass | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParams:
        if self.decode_stride > self.decode_window:
            raise ValueError(f"decode_stride {self.decode_stride} exceeds decode_window {self.decode_window}: "
                             "frames between windows would never be decoded")
        if self.window_stride >= self.clip_frames:
            raise ValueError(f"window_stride {self.window_stride} must be below clip_frames {self.clip_frames} so "
                             "neighbouring windows overlap")
        bad = sorted(index for index in self.frames if not 0 <= index < self.num_frames)
        if bad:
            raise ValueError(f"frames indices {bad} lie outside the video's {self.num_frames} frames (0.."
                             f"{self.num_frames - 1})")
        if self.frames and self.method == "chain":
            raise ValueError("frames: chain conditions each clip on the previous clip's last frame; give frames to "
                             "method exvideo, direct or windows")
        if self.overlap is not None and self.method not in ("exvideo", "direct"):
            raise ValueError(f"overlap continues a video window after window, for method exvideo (windows of the "
                             f"position table) or direct (windows of clip_frames); {self.method!r} already makes "
                             "any length its own way: leave overlap unset")
        if self.decode_tile is not None and self.decode_tile_overlap >= self.decode_tile:
            raise ValueError(f"decode_tile_overlap {self.decode_tile_overlap} must be below decode_tile "
                             f"{self.decode_tile}")
        return self

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch runs (diffusers' rule: some frame's scale exceeds 1)."""
        return max(self.min_guidance, self.max_guidance) > 1

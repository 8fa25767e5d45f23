"""Per-video generation parameters: one typed object, the same for the Python API, the CLI and each batch row.

One object serves both model families. SVD (image-to-video) and AnimateDiff (text-to-video) share the method
name `exvideo` and the fields that say what video to make (length, size, steps, fps, seed); every other field is
read by one family only (`FAMILY_FIELDS`), and `check_family` refuses a method or a set field the model's family
does not have, so nothing is silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from exvideo.config import StageConfig

# ExVideo extends the UNet (either family); the training-free baselines run the unchanged base model: three for
# SVD, two for AnimateDiff (pipelines.generate.text_to_video).
Method = Literal["exvideo", "direct", "chain", "windows", "naive", "freenoise"]
BASELINES = ("direct", "chain", "windows")
TEXT_TO_VIDEO_BASELINES = ("naive", "freenoise")
FAMILY_METHODS = {"svd": ("exvideo", *BASELINES), "animatediff": ("exvideo", *TEXT_TO_VIDEO_BASELINES)}
FAMILY_NAMES = {"svd": "SVD (image-to-video)", "animatediff": "AnimateDiff (text-to-video)"}


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

    Fields are grouped by the family that reads them: both, SVD only, AnimateDiff only (`FAMILY_FIELDS`).
    `fps`, `renormalize` and `contrast` left unset take the loaded model's sampling defaults
    (`pipelines.generate.defaults`): the reference's for the released checkpoint, what training recorded for ours.
    """

    # Both families.
    method: Method = "exvideo"
    num_frames: int = Field(128, ge=2)
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    steps: int = Field(50, ge=1)
    fps: int | None = Field(None, ge=1, le=240, description="mp4 frame rate, and SVD's micro-conditioning; unset: "
                            "the model's sampling default")
    # SVD only, except seed (both).
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
    # AnimateDiff only. Classifier-free guidance on the prompt, at AnimateDiff's usual scale (<= 1 skips the
    # unconditional branch), against `negative_prompt` ("" is the empty prompt).
    negative_prompt: str = ""
    guidance_scale: float = Field(7.5, ge=0)
    # freenoise: frames between the starts of its 16-frame windows (below 16, so windows overlap).
    freenoise_stride: int = Field(4, ge=1)
    # The VAE decodes this many frames at a time (it works frame by frame, so chunks only bound memory).
    decode_chunk_size: int = Field(16, ge=1)

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


# Fields one family reads and the other would ignore; the rest (method, num_frames, height, width, steps, fps, seed)
# both read.
FAMILY_FIELDS = {
    "svd": ("motion_bucket_id", "noise_aug_strength", "min_guidance", "max_guidance", "renormalize", "contrast",
            "frames", "overlap", "decode_window", "decode_stride", "decode_tile", "decode_tile_overlap",
            "clip_frames", "window_stride", "second_pass"),
    "animatediff": ("negative_prompt", "guidance_scale", "freenoise_stride", "decode_chunk_size"),
}


def check_family_method(method: Method, family: str) -> None:
    """Refuse a method a model of `family` does not have, naming the method's family and the model's methods."""
    if family not in FAMILY_METHODS:
        raise ValueError(f"unknown model family {family!r}; exvideo serves {sorted(FAMILY_METHODS)}")
    if method not in FAMILY_METHODS[family]:
        owner = next(name for name, methods in FAMILY_METHODS.items() if method in methods)
        raise ValueError(f"method {method!r} is a {FAMILY_NAMES[owner]} method, but the model is "
                         f"{FAMILY_NAMES[family]}; its methods are {', '.join(FAMILY_METHODS[family])}")


def check_family(params: GenerationParams, family: str) -> None:
    """Refuse a method, or a field set away from its default, that a model of `family` cannot use; name the
    family each belongs to and what the model's family offers instead."""
    check_family_method(params.method, family)
    for other, fields in FAMILY_FIELDS.items():
        if other == family:
            continue
        foreign = [name for name in fields if getattr(params, name)
                   != GenerationParams.model_fields[name].get_default(call_default_factory=True)]
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: {FAMILY_NAMES[other]} parameter(s), but the model is "
                             f"{FAMILY_NAMES[family]}, which would ignore them; leave them unset")

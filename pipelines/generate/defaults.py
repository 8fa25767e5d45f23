"""Sampling defaults that depend on the weights: frame rate, renormalisation and contrast before decoding.

The released ExVideo checkpoint was trained at fps 30 on latents encoded with another factor than the one it is
decoded with, and the reference compensates at inference by renormalising every frame's latent and scaling all of
them by 1.2. Adapters trained here use the VAE's own factor throughout, so they need neither; their metadata records
the fps their training conditioned on. `GenerationParams` fields left unset take these values, and every video's
record says which applied and why (docs/method.md, section 3). AnimateDiff has no latent post-processing: its
defaults set only the frame rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.generate.params import GenerationParams

# The fps SVD-family models are sampled at unless something says otherwise: the reference's ExVideo setting.
DEFAULT_FPS = 30


@dataclass(frozen=True)
class SamplingDefaults:
    """Values for the `GenerationParams` fields a caller left unset, and why they are these (None: the field does
    not apply to the model, and stays unset)."""

    fps: int
    renormalize: bool | None
    contrast: float | None
    why: str

    def apply(self, params: GenerationParams) -> tuple[GenerationParams, dict]:
        """`params` with its unset fields filled; and a record of what was filled and why."""
        filled = {name: getattr(self, name) for name in ("fps", "renormalize", "contrast")
                  if getattr(params, name) is None and getattr(self, name) is not None}
        return params.model_copy(update=filled), {"filled": filled, "why": self.why}


REFERENCE_CHECKPOINT = SamplingDefaults(
    DEFAULT_FPS, True, 1.2,
    "released ExVideo checkpoint layout: the reference's post_normalize=True and contrast_enhance_scale=1.2 "
    "(compensating its training latent scale), and fps 30, which it was trained with")
BASE_MODEL = SamplingDefaults(
    DEFAULT_FPS, False, 1.0, "no adapter: the base model's latents decoded as they are, at fps 30")

# AnimateDiff has no fps conditioning; 8 fps is the rate its videos are usually shown at (diffusers counts its
# default 16 frames as 2 seconds).
ANIMATEDIFF = SamplingDefaults(8, None, None, "AnimateDiff: mp4 at 8 fps, the rate its 16-frame clips are usually "
                               "shown at; renormalize and contrast are SVD's and do not apply")


def defaults_for_adapter(metadata: dict[str, str]) -> SamplingDefaults:
    """The sampling defaults of a loaded adapter, from what `exvideo.load_adapter` returned (its layout and file
    metadata)."""
    if metadata["layout"] == "reference":
        return REFERENCE_CHECKPOINT
    policy = metadata.get("fps_condition")
    if policy is None:
        return SamplingDefaults(DEFAULT_FPS, False, 1.0, "adapter trained here (one latent scale, so no "
                                "renormalisation or contrast); its metadata predates fps_condition: fps 30")
    fps = int(metadata["fps"])
    trained = f"each clip's fps, most often {fps}" if policy == "clip" else f"fps {policy} for every clip"
    return SamplingDefaults(fps, False, 1.0, f"adapter trained here (one latent scale, so no renormalisation or "
                            f"contrast), conditioned on {trained} (fps_condition={policy})")

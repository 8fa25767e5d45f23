"""One video from Python: `generate_video(pipeline, image, ...)` for SVD, `generate_text_video(pipeline, prompt,
...)` for AnimateDiff."""

from __future__ import annotations

import os

import PIL.Image

from pipelines.generate.params import GenerationParams
from pipelines.generate.pipeline import GeneratedVideo, LongVideoPipeline
from pipelines.generate.text_to_video import TextToVideoPipeline


def _with_overrides(params: GenerationParams | None, overrides: dict) -> GenerationParams:
    base = (params or GenerationParams()).model_dump()
    return GenerationParams.model_validate({**base, **overrides})


def generate_video(pipeline: LongVideoPipeline, image: PIL.Image.Image | str | os.PathLike,
                   params: GenerationParams | None = None, **overrides) -> GeneratedVideo:
    """Generate one video from a first frame (an image or its path) with an SVD pipeline.

    `overrides` are `GenerationParams` fields applied on top of `params` (default: the reference settings), e.g.
    `generate_video(pipe, "cat.png", num_frames=64, seed=3, method="windows")`; they are validated.
    """
    params = _with_overrides(params, overrides)
    if not isinstance(image, PIL.Image.Image):
        with PIL.Image.open(image) as opened:
            image = opened.convert("RGB")
    return pipeline.generate(image, params)


def generate_text_video(pipeline: TextToVideoPipeline, prompt: str, params: GenerationParams | None = None,
                        **overrides) -> GeneratedVideo:
    """Generate one video from a prompt with an AnimateDiff pipeline; `overrides` as for `generate_video`, e.g.
    `generate_text_video(pipe, "a red kite", num_frames=128, method="freenoise")`."""
    return pipeline.generate(prompt, _with_overrides(params, overrides))

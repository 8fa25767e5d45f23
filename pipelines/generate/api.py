"""One video from Python: `generate_video(pipeline, image, num_frames=128, ...)`."""

from __future__ import annotations

import os

import PIL.Image

from pipelines.generate.params import GenerationParams
from pipelines.generate.pipeline import GeneratedVideo, LongVideoPipeline


def generate_video(pipeline: LongVideoPipeline, image: PIL.Image.Image | str | os.PathLike,
                   params: GenerationParams | None = None, **overrides) -> GeneratedVideo:
    """Generate one video from a first frame (an image or its path).

    `overrides` are `GenerationParams` fields applied on top of `params` (default: the reference settings), e.g.
    `generate_video(pipe, "cat.png", num_frames=64, seed=3, method="windows")`; they are validated.
    """
    base = (params or GenerationParams()).model_dump()
    params = GenerationParams.model_validate({**base, **overrides})
    if not isinstance(image, PIL.Image.Image):
        with PIL.Image.open(image) as opened:
            image = opened.convert("RGB")
    return pipeline.generate(image, params)

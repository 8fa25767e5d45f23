"""Long-video generation: the ExVideo pipeline, training-free baselines, first frames from text, the batch job.

Public API:
    load_pipeline, generate_video, GenerationParams   - one video from Python
    LongVideoPipeline, GeneratedVideo                 - the diffusers pipeline subclass and its result
    write_mp4                                         - H.264 mp4 through ffmpeg-python, written atomically
    GenerateJobConfig, run_generate_job               - the Ray Data batch job (`exvideo generate`)
"""

import importlib

from pipelines.generate.api import generate_video
from pipelines.generate.loading import load_pipeline
from pipelines.generate.params import GenerationParams, SecondPass
from pipelines.generate.pipeline import GeneratedVideo, LongVideoPipeline

# The batch job needs Ray and ffmpeg; import them only when asked, so the pipeline itself runs without them.
_LAZY = {"GenerateJobConfig": "job", "run_generate_job": "job", "write_mp4": "video_io"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pipelines.generate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipelines.generate' has no attribute {name!r}")

__all__ = [
    "GenerateJobConfig", "GeneratedVideo", "GenerationParams", "LongVideoPipeline", "SecondPass", "generate_video",
    "load_pipeline", "run_generate_job", "write_mp4",
]

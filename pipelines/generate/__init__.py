"""Long-video generation: the ExVideo pipeline, training-free baselines, first frames from text, the batch job.

Public API:
    load_pipeline, generate_video, GenerationParams   - one video from Python
    LongVideoPipeline, GeneratedVideo                 - the diffusers pipeline subclass and its result
    write_mp4                                         - H.264 mp4 through ffmpeg-python, written atomically
    GenerateJobConfig, run_generate_job               - the Ray Data batch job (`exvideo generate`)

Names are imported on first use: reading a generation config (`params`) needs neither torch nor Ray.
"""

import importlib

_EXPORTS = {
    "GenerateJobConfig": "job", "GeneratedVideo": "pipeline", "GenerationParams": "params",
    "LongVideoPipeline": "pipeline", "SecondPass": "params", "generate_video": "api", "load_pipeline": "loading",
    "run_generate_job": "job", "write_mp4": "video_io",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pipelines.generate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipelines.generate' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

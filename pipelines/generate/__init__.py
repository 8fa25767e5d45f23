"""Long-video generation: the ExVideo pipeline, training-free baselines, first frames from text, the batch job.

Public API:
    load_pipeline, GenerationParams                   - the pipeline of a checkpoint's family, its parameters
    generate_video, generate_text_video               - one video from Python: SVD from an image, AnimateDiff
                                                        from a prompt
    LongVideoPipeline, TextToVideoPipeline            - the SVD and AnimateDiff diffusers pipeline subclasses
    GeneratedVideo                                    - their result
    load_text_to_video                                - the AnimateDiff loader load_pipeline dispatches to
    write_mp4                                         - H.264 mp4 through ffmpeg-python, written atomically
    GenerateJobConfig, run_generate_job               - the Ray Data batch job (`exvideo generate`)

Names are imported on first use: reading a generation config (`params`) needs neither torch nor Ray.
"""

import importlib

_EXPORTS = {
    "GenerateJobConfig": "config", "GeneratedVideo": "pipeline", "GenerationParams": "params",
    "LongVideoPipeline": "pipeline", "SecondPass": "params", "TextToVideoPipeline": "text_to_video",
    "generate_text_video": "api", "generate_video": "api", "load_pipeline": "loading",
    "load_text_to_video": "loading", "run_generate_job": "job", "write_mp4": "video_io",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pipelines.generate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipelines.generate' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

"""Long-video generation: the ExVideo pipeline, training-free baselines, first frames from text, the batch job.

Public API:
    load_pipeline, generate_video, GenerationParams   - one video from Python
    LongVideoPipeline, GeneratedVideo                 - the diffusers pipeline subclass and its result
    write_mp4                                         - H.264 mp4 through ffmpeg-python, written atomically
    GenerateJobConfig, run_generate_job               - the Ray Data batch job (`exvideo generate`)
"""

from pipelines.generate.api import generate_video
from pipelines.generate.job import GenerateJobConfig, run_generate_job
from pipelines.generate.loading import load_pipeline
from pipelines.generate.params import GenerationParams, SecondPass
from pipelines.generate.pipeline import GeneratedVideo, LongVideoPipeline
from pipelines.generate.video_io import write_mp4

__all__ = [
    "GenerateJobConfig", "GeneratedVideo", "GenerationParams", "LongVideoPipeline", "SecondPass", "generate_video",
    "load_pipeline", "run_generate_job", "write_mp4",
]

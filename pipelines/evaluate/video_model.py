"""An ExVideo adapter as an MLflow pyfunc model: image in, video out.

The model's artifacts are the adapter file and (unless the base checkpoint is referenced by path) the local SVD
checkpoint directory. `predict` takes a DataFrame with an `image` column of image paths and returns RGB uint8
videos `[N, T, H, W, 3]`; generation parameters are pyfunc params with the reference defaults (DESIGN.md).
The model is logged from code (`video_model_entry.py`), not pickled; loading it needs this project's package
installed, where its class lives.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from PIL import Image

from exvideo import SVDComponents, load_adapter, load_svd

# Reference inference defaults (DESIGN.md section 2); num_frames defaults to the adapter's table length.
GENERATION_DEFAULTS = {
    "height": 512, "width": 512, "num_inference_steps": 50, "fps": 30, "motion_bucket_id": 127,
    "noise_aug_strength": 0.02, "min_guidance_scale": 2.0, "max_guidance_scale": 2.0, "seed": 0,
    "decode_chunk_size": 8,
}
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "pillow", "numpy", "mlflow")


def generate_video(svd: SVDComponents, image: Image.Image, num_frames: int, height: int, width: int,
                   num_inference_steps: int, fps: int, motion_bucket_id: int, noise_aug_strength: float,
                   min_guidance_scale: float, max_guidance_scale: float, seed: int, decode_chunk_size: int,
                   ) -> np.ndarray:
    """One video from one image with diffusers' SVD pipeline around the (extended) components; RGB uint8 frames.

    Kept as the single generation call of the model so the project's long-video pipeline can replace it.
    """
    output = svd.pipeline()(
        image, height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
        fps=fps, motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
        min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
        decode_chunk_size=decode_chunk_size, output_type="np",
        generator=torch.Generator(svd.unet.device).manual_seed(seed),
    )
    return (np.asarray(output.frames[0]) * 255).round().clip(0, 255).astype(np.uint8)


class ExVideoModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads the SVD checkpoint and the adapter once, then generates a video per input image."""

    def load_context(self, context) -> None:
        svd_dir = context.artifacts.get("svd") or (context.model_config or {}).get("svd_dir")
        if not svd_dir:
            raise ValueError("the model has neither an `svd` artifact nor `svd_dir` in its model_config")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.svd = load_svd(svd_dir, device=device)
        load_adapter(self.svd.unet, context.artifacts["adapter"])
        self.num_frames = int(self.svd.unet.config.get("exvideo_num_frames") or 25)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        """`model_input`: DataFrame with an `image` column of image file paths; returns `[N, T, H, W, 3]` uint8."""
        if "image" not in getattr(model_input, "columns", ()):
            raise ValueError("model input must be a DataFrame with an `image` column of image file paths")
        settings = {**GENERATION_DEFAULTS, "num_frames": self.num_frames, **(params or {})}
        videos = []
        for path in model_input["image"]:
            if not Path(path).is_file():
                raise ValueError(f"input image {path} does not exist")
            with Image.open(path) as image:
                videos.append(generate_video(self.svd, image.convert("RGB"), **settings))
        return np.stack(videos)


def model_signature(num_frames: int) -> ModelSignature:
    """Input `image` (path), output uint8 videos, and every generation setting as a param with its default."""
    params = [ParamSpec(name, "long" if isinstance(value, int) else "double", value)
              for name, value in {**GENERATION_DEFAULTS, "num_frames": num_frames}.items()]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1, 3))]),
        params=ParamSchema(params),
    )


def log_video_model(adapter: Path, svd_dir: Path, num_frames: int, bundle_base: bool = True,
                    name: str = "exvideo-model") -> mlflow.models.model.ModelInfo:
    """Log the adapter as a pyfunc model under the active run.

    `bundle_base` copies the SVD checkpoint into the model (self-contained; fine for small or shared stores);
    otherwise the model records `svd_dir` and loads the base from there (full SVD-XT is ~10 GB).
    """
    artifacts = {"adapter": str(Path(adapter).resolve())}
    model_config = None
    if bundle_base:
        artifacts["svd"] = str(Path(svd_dir).resolve())
    else:
        model_config = {"svd_dir": str(Path(svd_dir).resolve())}
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(Path(__file__).with_name("video_model_entry.py")), artifacts=artifacts,
        model_config=model_config,
        signature=model_signature(num_frames),
        pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS],
    )

"""An ExVideo adapter as an MLflow pyfunc model: image in, video out, by the same path as `exvideo generate`.

The model's artifacts are the adapter file and (unless the base checkpoint is referenced by path) the local SVD
checkpoint directory. Loading builds the project's `LongVideoPipeline` with `load_pipeline` (base + adapter, the
`SpeedOptions`, dtype and device of the model_config), and `predict` makes each video with
`pipeline.generate(image, params)`, the generation job's own call: the same image, params, device and dtype (and, on
the CPU, torch thread count) give bitwise the frames the job makes (its records' `frames_sha256`). `predict` takes
a DataFrame with an `image` column of image paths and returns RGB uint8 videos `[N, T, H, W, 3]`.

Params: the signature is derived from `GenerationParams` (`model_signature`), each field with its default (the
reference inference settings, docs/method.md, section 3), so the model has no defaults of its own. Scalars map to
long/double/boolean/string; `num_frames` defaults to the adapter's table length; `decode_tile` (None: no spatial
tiling) is a long whose default is None, as are `fps`, `renormalize`, `contrast` and `overlap` (None: the adapter's
sampling defaults, or no continuation); the nested `second_pass` is a JSON string of `SecondPass` fields
(`'{"height": 1024, "width": 1024, "strength": 0.5}'`; default None: no second pass), because MLflow's object
params cannot default to None, and `frames` a JSON object of frame index -> image path (default `{}`). Every call is validated by `GenerationParams`, so a bad value is an error naming the
field; `method` must be `exvideo` (the model holds an adapter). MLflow itself drops params the signature does not
name, with a warning, before `predict` sees them.

model_config: `speed` (`SpeedOptions` fields), `dtype` and `device` ("auto": bfloat16 on a GPU, float32 on the CPU;
the first GPU if any), and `svd_dir` when the base is not bundled; `mlflow.pyfunc.load_model(uri, model_config=...)`
overrides them where the model is loaded. The model is logged from code (`video_model_entry.py`), not pickled;
loading it needs this project's package installed, where its class lives.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import PIL.Image
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from exvideo import SpeedOptions, extended_num_frames
from exvideo.config import describe_errors
from pipelines.generate.loading import load_pipeline
from pipelines.generate.params import GenerationParams

REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "pillow", "numpy", "mlflow")
# MLflow param types of the scalar types GenerationParams' fields hold (a Literal takes its values' type).
PARAM_TYPES = {int: "long", float: "double", bool: "boolean", str: "string"}


def _options(annotation) -> list:
    """The types a field may hold, None left out (`int | None` -> [int])."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [option for option in typing.get_args(annotation) if option is not type(None)]
    return [annotation]


def _nested_model(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (`SecondPass | None` -> SecondPass), or None for a scalar field."""
    options = _options(annotation)
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
        return options[0]
    return None


# Fields passed as JSON strings: nested models, which MLflow's object params could not leave at None, and mappings
# (`frames`), whose integer keys MLflow's object params would not keep.
JSON_PARAMS = tuple(name for name, field in GenerationParams.model_fields.items()
                    if _nested_model(field.annotation) or typing.get_origin(field.annotation) is dict)


def _param_spec(name: str, field: FieldInfo, num_frames: int) -> ParamSpec:
    default = num_frames if name == "num_frames" else field.get_default(call_default_factory=True)
    if name in JSON_PARAMS:
        if default is None or isinstance(default, dict):
            return ParamSpec(name, "string", None if default is None else json.dumps(default))
        return ParamSpec(name, "string", default.model_dump_json())
    options = _options(field.annotation)
    scalar = options[0] if len(options) == 1 else None
    if typing.get_origin(scalar) is typing.Literal:
        scalar = type(typing.get_args(scalar)[0])
    if scalar not in PARAM_TYPES:
        raise TypeError(f"GenerationParams.{name} has type {field.annotation}, which has no MLflow param type; "
                        "map it in pipelines/evaluate/video_model.py")
    return ParamSpec(name, PARAM_TYPES[scalar], default)


def generation_params(defaults: GenerationParams, params: dict | None = None) -> GenerationParams:
    """One predict call's parameters: the model's defaults, then the caller's `params`, validated as one
    `GenerationParams`, so an error names each bad field. Only method `exvideo` runs: the model holds an adapter."""
    values = {**defaults.model_dump(), **(params or {})}
    for name in JSON_PARAMS:
        if isinstance(values.get(name), str):
            try:
                values[name] = json.loads(values[name])
            except json.JSONDecodeError as exc:
                raise ValueError(f"param {name} must be a JSON object of its fields or null, got "
                                 f"{values[name]!r}: {exc}") from None
    try:
        result = GenerationParams.model_validate(values)
    except ValidationError as exc:
        raise ValueError(f"invalid generation params: {describe_errors(exc)}") from None
    if result.method != "exvideo":
        raise ValueError(f"method {result.method!r} cannot run in this model: it holds an ExVideo adapter, so method "
                         "must be 'exvideo'; run the baselines with `exvideo generate` on the base checkpoint")
    return result


def _speed(config: dict) -> SpeedOptions:
    try:
        return TypeAdapter(SpeedOptions).validate_python(config.get("speed") or {})
    except ValidationError as exc:
        raise ValueError(f"invalid model_config: {describe_errors(exc, 'speed')}") from None


class ExVideoModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: builds the generation pipeline (base + adapter) once, then makes a video per input image."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        svd_dir = context.artifacts.get("svd") or config.get("svd_dir")
        if not svd_dir:
            raise ValueError("the model has neither an `svd` artifact nor `svd_dir` in its model_config")
        self.pipeline = load_pipeline(svd_dir, context.artifacts["adapter"], "exvideo",
                                      device=config.get("device", "auto"), dtype=config.get("dtype", "auto"),
                                      speed=_speed(config))
        self.pipeline.set_progress_bar_config(disable=True)
        self.defaults = GenerationParams(num_frames=extended_num_frames(self.pipeline.unet))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        """`model_input`: DataFrame with an `image` column of image file paths; returns `[N, T, H, W, 3]` uint8."""
        if "image" not in getattr(model_input, "columns", ()):
            raise ValueError("model input must be a DataFrame with an `image` column of image file paths")
        settings = generation_params(self.defaults, params)
        videos = []
        for path in model_input["image"]:
            if not Path(path).is_file():
                raise ValueError(f"input image {path} does not exist")
            with PIL.Image.open(path) as image:
                videos.append(self.pipeline.generate(image.convert("RGB"), settings).frames)
        return np.stack(videos)


def model_signature(num_frames: int) -> ModelSignature:
    """Input `image` (path), output uint8 videos, and every `GenerationParams` field as a param with its default
    (`num_frames`: the adapter's table length; nested models as JSON strings, see the module docstring)."""
    params = [_param_spec(name, field, num_frames) for name, field in GenerationParams.model_fields.items()]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1, 3))]),
        params=ParamSchema(params),
    )


def log_video_model(adapter: Path, svd_dir: Path, num_frames: int, bundle_base: bool = True,
                    name: str = "exvideo-model", speed: SpeedOptions = SpeedOptions(), dtype: str = "auto",
                    device: str = "auto") -> mlflow.models.model.ModelInfo:
    """Log the adapter as a pyfunc model under the active run.

    `bundle_base` copies the SVD checkpoint into the model (self-contained; fine for small or shared stores);
    otherwise the model records `svd_dir` and loads the base from there (full SVD-XT is ~10 GB). `speed`, `dtype`
    and `device` go to the model_config, which `load_pipeline` reads when the model is loaded.
    """
    artifacts = {"adapter": str(Path(adapter).resolve())}
    model_config = {"speed": asdict(speed), "dtype": dtype, "device": device}
    if bundle_base:
        artifacts["svd"] = str(Path(svd_dir).resolve())
    else:
        model_config["svd_dir"] = str(Path(svd_dir).resolve())
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(Path(__file__).with_name("video_model_entry.py")), artifacts=artifacts,
        model_config=model_config,
        signature=model_signature(num_frames),
        pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS],
    )

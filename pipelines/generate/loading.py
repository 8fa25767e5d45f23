"""Building a generation pipeline from a local checkpoint and an optional ExVideo adapter: a `LongVideoPipeline`
for SVD (image-to-video), a `TextToVideoPipeline` for AnimateDiff (text-to-video)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from exvideo import (
    SpeedOptions,
    checkpoint_family,
    extend_unet,
    extended_num_frames,
    load_adapter,
    load_animatediff,
    load_svd,
)
from pipelines.generate.defaults import BASE_MODEL, defaults_for_adapter
from pipelines.generate.params import BASELINES, Method, check_family_method
from pipelines.generate.pipeline import LongVideoPipeline
from pipelines.generate.text_to_video import TextToVideoPipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU (what the reference timings use) and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_adapter_file(adapter: str | os.PathLike) -> None:
    if not Path(adapter).is_file():
        raise FileNotFoundError(f"adapter {adapter} does not exist; pass the .safetensors file train wrote")


def load_pipeline(model: str | os.PathLike, adapter: str | os.PathLike | None = None, method: Method = "exvideo",
                  table_frames: int = 128, device: str = "auto", dtype: str = "auto",
                  speed: SpeedOptions = SpeedOptions(), family: str | None = None,
                  ) -> LongVideoPipeline | TextToVideoPipeline:
    """Load a local checkpoint as the pipeline of its family (`family`, else `checkpoint_family`), ready for
    `method`.

    SVD gives a `LongVideoPipeline`, AnimateDiff a `TextToVideoPipeline` (`load_text_to_video`, which `speed` does
    not apply to). exvideo: the UNet is extended and the adapter loaded (without an adapter it is extended to
    `table_frames` with the identity initialisation, which reproduces the base model up to its training length).
    Baselines run the unchanged base UNet, so they refuse an adapter. `speed` picks how the UNet computes
    (exvideo.speed). The pipeline's `sampling_defaults` come from the adapter (pipelines.generate.defaults).
    """
    family = checkpoint_family(model, family)
    check_family_method(method, family)
    if family == "animatediff":
        return load_text_to_video(model, adapter, method, table_frames, device, dtype)
    torch_device = resolve_device(device)
    svd = load_svd(model, dtype=resolve_dtype(dtype, torch_device), device=torch_device)
    if method in BASELINES:
        if adapter is not None or extended_num_frames(svd.unet) is not None:
            raise ValueError(f"method {method!r} is a training-free baseline of the base model: drop the adapter "
                             "and point model at a base SVD checkpoint")
    defaults = BASE_MODEL
    if adapter is not None:
        _check_adapter_file(adapter)
        defaults = defaults_for_adapter(load_adapter(svd.unet, adapter))
    elif method not in BASELINES and extended_num_frames(svd.unet) is None:
        extend_unet(svd.unet, table_frames)
    svd.unet.requires_grad_(False)
    pipeline = LongVideoPipeline(vae=svd.vae, image_encoder=svd.image_encoder, unet=svd.unet,
                                 scheduler=svd.scheduler, feature_extractor=svd.feature_extractor)
    pipeline = pipeline.to(torch_device)
    pipeline.set_speed(speed)
    pipeline.sampling_defaults = defaults
    return pipeline


def load_text_to_video(model: str | os.PathLike, adapter: str | os.PathLike | None = None,
                       method: Method = "exvideo", table_frames: int = 128, device: str = "auto",
                       dtype: str = "auto") -> TextToVideoPipeline:
    """Load a local AnimateDiff checkpoint as a `TextToVideoPipeline` ready for `method`.

    exvideo: the adapter is loaded into the UNet, or without one the UNet is extended to `table_frames` with the
    identity initialisation (the base model up to its 16 training frames). The baselines (naive, freenoise) run the
    unchanged base UNet, so they refuse an adapter.
    """
    check_family_method(method, "animatediff")
    if method != "exvideo" and adapter is not None:
        raise ValueError(f"method {method!r} is a training-free baseline of the base model: drop the adapter and "
                         "point model at a base AnimateDiff checkpoint")
    torch_device = resolve_device(device)
    parts = load_animatediff(model, dtype=resolve_dtype(dtype, torch_device), device=torch_device)
    if adapter is not None:
        _check_adapter_file(adapter)
        load_adapter(parts.unet, adapter)
    elif method == "exvideo":
        extend_unet(parts.unet, table_frames)
    parts.unet.requires_grad_(False)  # the extension's new tensors are created trainable
    pipeline = TextToVideoPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, motion_adapter=parts.motion_adapter, scheduler=parts.scheduler)
    return pipeline.to(torch_device)

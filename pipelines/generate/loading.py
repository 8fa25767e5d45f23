"""Building a `LongVideoPipeline` from a local SVD checkpoint and an optional ExVideo adapter."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from exvideo import SpeedOptions, extend_unet, extended_num_frames, load_adapter, load_svd
from pipelines.generate.defaults import BASE_MODEL, defaults_for_adapter
from pipelines.generate.params import BASELINES, Method
from pipelines.generate.pipeline import LongVideoPipeline

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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the adapter fingerprint recorded with every video)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pipeline(model: str | os.PathLike, adapter: str | os.PathLike | None = None, method: Method = "exvideo",
                  table_frames: int = 128, device: str = "auto", dtype: str = "auto",
                  speed: SpeedOptions = SpeedOptions()) -> LongVideoPipeline:
    """Load a local SVD checkpoint as a `LongVideoPipeline` ready for `method`.

    exvideo: the UNet is extended and the adapter loaded (without an adapter it is extended to `table_frames`
    with the identity initialisation, which reproduces the base model for up to 25 frames). Baselines run the
    unchanged base UNet, so they refuse an adapter. `speed` picks how the UNet computes (exvideo.speed). The
    pipeline's `sampling_defaults` come from the adapter (pipelines.generate.defaults).
    """
    torch_device = resolve_device(device)
    svd = load_svd(model, dtype=resolve_dtype(dtype, torch_device), device=torch_device)
    if method in BASELINES:
        if adapter is not None or extended_num_frames(svd.unet) is not None:
            raise ValueError(f"method {method!r} is a training-free baseline of the base model: drop the adapter "
                             "and point model at a base SVD checkpoint")
    defaults = BASE_MODEL
    if adapter is not None:
        if not Path(adapter).is_file():
            raise FileNotFoundError(f"adapter {adapter} does not exist; pass the .safetensors file train wrote")
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

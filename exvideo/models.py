"""Loading Stable Video Diffusion from a local diffusers-format directory, and writing tiny ones for tests.

Nothing here downloads: every loader passes `local_files_only=True` and a missing directory or component is an
error that names it. The tiny models use the same diffusers/transformers classes and on-disk format as the real
SVD-XT release, so the real loading code is what tests and the demo exercise.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from exvideo.storage import require_dir
from exvideo.unet import CONFIG_KEY, extend_unet

COMPONENTS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")
UNET_WEIGHTS = "diffusion_pytorch_model"


@dataclass
class SVDComponents:
    """The parts of an SVD checkpoint the stages use."""

    unet: UNetSpatioTemporalConditionModel
    vae: AutoencoderKLTemporalDecoder
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor
    scheduler: EulerDiscreteScheduler

    def pipeline(self) -> StableVideoDiffusionPipeline:
        """diffusers' own SVD pipeline around these components."""
        return StableVideoDiffusionPipeline(
            vae=self.vae, image_encoder=self.image_encoder, unet=self.unet,
            scheduler=self.scheduler, feature_extractor=self.feature_extractor,
        )


def _unet_state_dict(unet_dir: Path, variant: str | None) -> dict[str, torch.Tensor]:
    stem = UNET_WEIGHTS + (f".{variant}" if variant else "")
    single = unet_dir / f"{stem}.safetensors"
    index = unet_dir / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(unet_dir / shard)))
        return state
    raise FileNotFoundError(f"no UNet weights in {unet_dir}: expected {single.name} or {index.name}")


def load_unet(path: str | os.PathLike, dtype: torch.dtype = torch.float32, variant: str | None = None,
              ) -> UNetSpatioTemporalConditionModel:
    """Load an SVD UNet, base or ExVideo-extended, from a diffusers-format directory.

    `path` is the UNet directory itself or a checkpoint directory with a `unet/` subfolder. An extended UNet
    (saved with diffusers' `save_pretrained`; its config holds `exvideo_num_frames`) is rebuilt with
    `extend_unet` and then every tensor is loaded strictly: a missing or unexpected tensor is an error.
    """
    path = Path(path)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    require_dir(unet_dir, "UNet")
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{unet_dir} has no config.json; it is not a diffusers model directory")
    config = json.loads(config_file.read_text())
    num_frames = config.pop(CONFIG_KEY, None)
    if num_frames is None:
        return UNetSpatioTemporalConditionModel.from_pretrained(
            unet_dir, torch_dtype=dtype, variant=variant, local_files_only=True
        )
    with torch.device("meta"):
        unet = extend_unet(UNetSpatioTemporalConditionModel.from_config(config), num_frames)
    state = _unet_state_dict(unet_dir, variant)
    # Copy out of the memory-mapped file: kernels on mapped pages can take other (slightly different) code paths.
    owned = {k: v.to(dtype, copy=True) for k, v in state.items()}
    result = unet.load_state_dict(owned, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"extended UNet weights in {unet_dir} do not match its config: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    return unet.eval()


def load_svd(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             variant: str | None = None) -> SVDComponents:
    """Load unet, vae, image_encoder, feature_extractor and scheduler from a local SVD checkpoint directory."""
    path = Path(path)
    require_dir(path, "SVD checkpoint")
    absent = [name for name in COMPONENTS if not (path / name).is_dir()]
    if absent:
        raise FileNotFoundError(f"SVD checkpoint {path} lacks component folders {absent}; expected {list(COMPONENTS)}")
    common = {"local_files_only": True}
    components = SVDComponents(
        unet=load_unet(path, dtype=dtype, variant=variant),
        vae=AutoencoderKLTemporalDecoder.from_pretrained(path, subfolder="vae", torch_dtype=dtype,
                                                         variant=variant, **common),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder",
                                                                    dtype=dtype, **common),
        feature_extractor=CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor", **common),
        scheduler=EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **common),
    )
    for module in (components.unet, components.vae, components.image_encoder):
        module.to(device).eval().requires_grad_(False)
    return components


def tiny_svd_components(seed: int = 0, cross_attention_dim: int = 32) -> SVDComponents:
    """Randomly initialised SVD components of the real classes, small enough for CPU tests.

    The UNet keeps SVD's topology (4 levels, 2 layers per block, 16 spatio-temporal transformers), so the reference
    checkpoint layout maps onto it; the VAE keeps the 8x spatial downsampling.
    """
    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64, 64), num_attention_heads=(2, 4, 4, 4),
        cross_attention_dim=cross_attention_dim, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, layers_per_block=2, num_frames=25,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=1, latent_channels=4, sample_size=64,
    )
    # SVD's pipeline resizes the conditioning image to 224x224 before CLIP, so the tiny encoder keeps that size.
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=cross_attention_dim, num_hidden_layers=2,
        num_attention_heads=2, image_size=224, patch_size=32,
    ))
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    # SVD-XT's scheduler configuration: Karras sigmas, v-prediction, continuous timesteps.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    return SVDComponents(unet.eval(), vae.eval(), image_encoder.eval(), feature_extractor, scheduler)


def write_directory_atomically(path: str | os.PathLike, overwrite: bool, save: Callable[[Path], None]) -> Path:
    """Have `save` write a directory under a temporary name beside `path`, then move it to `path`: a reader never
    sees half a checkpoint. An existing `path` is refused unless `overwrite`."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    os.replace(tmp, path)
    return path


def write_tiny_svd(path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random SVD checkpoint in diffusers format (what `load_svd` reads), atomically."""
    return write_directory_atomically(path, overwrite, tiny_svd_components(seed).pipeline().save_pretrained)

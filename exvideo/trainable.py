"""The parameters ExVideo post-tunes, and freezing everything else.

SVD: per spatio-temporal transformer, its temporal transformer blocks (with their new 3D convolutions), its
frame-position MLP (`time_pos_embed`) and its position table (`time_proj.embeddings`). Spatial blocks, temporal
ResNet blocks, mixers, the VAE and the image encoder stay frozen. On the SVD-XT config this is 832,956,800
parameters in 528 tensors.

AnimateDiff: every motion module whole (its attention blocks, with their new position tables, its new 3D
convolution, its norm and projections). The spatial UNet of Stable Diffusion, the VAE and the text encoder stay
frozen.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
from diffusers import UNetMotionModel
from torch import nn

from exvideo.speed import apply_speed, enable_checkpointing
from exvideo.speed_options import SpeedOptions, refuse_generation_switches
from exvideo.motion_unet import motion_modules
from exvideo.unet import extend_unet, extended_num_frames, spatio_temporal_transformers

TRAINABLE_CHILDREN = ("temporal_transformer_blocks.", "time_pos_embed.", "time_proj.")


def trainable_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of exactly the tensors ExVideo post-tunes, in module order.

    The UNet must have been extended (`extend_unet`) first: the position tables are part of the set.
    """
    if extended_num_frames(unet) is None:
        raise ValueError("UNet is not extended; call exvideo.extend_unet(unet, num_frames=...) first")
    if isinstance(unet, UNetMotionModel):
        return {f"{prefix}.{name}": param for prefix, module in motion_modules(unet).items()
                for name, param in module.named_parameters()}
    selected = {}
    for prefix, transformer in spatio_temporal_transformers(unet).items():
        for name, param in transformer.named_parameters():
            if name.startswith(TRAINABLE_CHILDREN):
                selected[f"{prefix}.{name}"] = param
    return selected


def freeze_for_post_tuning(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze every UNet parameter except the ExVideo trainable set; return that set."""
    trainable = trainable_parameters(unet)
    keep = {id(p) for p in trainable.values()}
    for param in unet.parameters():
        param.requires_grad_(id(param) in keep)
    return trainable


def prepare_for_post_tuning(unet: nn.Module, num_frames: int, precision: str = "fp32",
                            gradient_checkpointing: bool = True, device: torch.device | str = "cpu",
                            speed: SpeedOptions = SpeedOptions(), base_frames: int | None = None,
                            mode: Literal["temporal", "all"] = "temporal") -> dict[str, nn.Parameter]:
    """Extend and freeze a base UNet for post-tuning, in place, and return its trainable set.

    mode "all" trains a base model instead: the UNet stays unextended and every weight is trainable.
    `base_frames`: the clip length the base was trained on, for the cyclic position table (`extend_unet`; default:
    the family's).

    precision "bf16": frozen weights in bf16 (the forward runs under autocast), trainable weights and their AdamW
    state in fp32. `speed` picks the convolution layout, what checkpointing recomputes and whether blocks compile
    (exvideo.speed); it refuses compile_blocks=True with selective checkpointing, and generation's switches.
    An AnimateDiff UNet runs diffusers' own modules and checkpointing: it refuses speed switches other than the
    defaults, which act on SVD's spatio-temporal transformers only.
    """
    refuse_generation_switches(speed)
    motion = isinstance(unet, UNetMotionModel)
    if motion and speed != SpeedOptions():
        changed = sorted(k for k, v in asdict(speed).items() if v != asdict(SpeedOptions())[k])
        raise ValueError(f"speed switches {changed} act on SVD's spatio-temporal transformers; an AnimateDiff UNet's "
                         "motion modules run diffusers' own code: leave them at their defaults")
    if mode == "all":
        trainable = dict(unet.named_parameters())
        unet.requires_grad_(True)
    else:
        extend_unet(unet, num_frames, base_frames)
        trainable = freeze_for_post_tuning(unet)
    if precision == "bf16":
        unet.to(torch.bfloat16)
        for param in trainable.values():
            param.data = param.data.float()
    if gradient_checkpointing and motion:
        unet.enable_gradient_checkpointing()
    elif gradient_checkpointing:
        enable_checkpointing(unet, speed.checkpointing)
    unet.train().to(device)
    if not motion:
        apply_speed(unet, speed)  # on the device: compile_blocks "gpu" compiles only on a GPU
    return trainable

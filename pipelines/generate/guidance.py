"""Classifier-free guidance for SVD: both branches in one batched UNet call, a per-frame guidance ramp."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNetSpatioTemporalConditionModel


@dataclass
class Conditioning:
    """What the UNet is conditioned on; with guidance each tensor holds [unconditional, conditional] on dim 0."""

    image_embeddings: torch.Tensor  # [B', 1, D] CLIP image embedding of the first frame
    image_latents: torch.Tensor  # [B', 1, C, h, w] unscaled VAE latent of the (noise-augmented) first frame
    added_time_ids: torch.Tensor  # [B', 3] fps - 1, motion bucket, noise augmentation
    guided: bool


def guidance_ramp(min_scale: float, max_scale: float, num_frames: int) -> torch.Tensor:
    """Guidance scale per frame, linear from the first frame's `min_scale` to the last frame's `max_scale`."""
    return torch.linspace(min_scale, max_scale, num_frames)


def guided_model_output(unet: UNetSpatioTemporalConditionModel, scaled_latents: torch.Tensor, timestep: torch.Tensor,
                        cond: Conditioning, guidance: torch.Tensor) -> torch.Tensor:
    """The UNet's output for `scaled_latents` `[B, T, C, h, w]`, guided per frame by `guidance` `[T]`.

    With guidance the unconditional and conditional inputs are concatenated on the batch so one UNet call computes
    both, as diffusers' SVD pipeline does; frame t then gets uncond + guidance[t] * (cond - uncond).
    """
    frames = scaled_latents.shape[1]
    inputs = torch.cat([scaled_latents] * 2) if cond.guided else scaled_latents
    image_latents = cond.image_latents.expand(-1, frames, -1, -1, -1)
    inputs = torch.cat([inputs, image_latents.to(inputs.dtype)], dim=2)
    output = unet(inputs, timestep, encoder_hidden_states=cond.image_embeddings,
                  added_time_ids=cond.added_time_ids, return_dict=False)[0]
    if not cond.guided:
        return output
    uncond, conditional = output.chunk(2)
    scale = guidance.to(output.device, output.dtype).view(1, frames, 1, 1, 1)
    return uncond + scale * (conditional - uncond)

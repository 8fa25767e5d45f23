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
                        cond: Conditioning, guidance: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """The UNet's output for `scaled_latents` `[B, T, C, h, w]`, guided per frame by `guidance` `[T]`.

    With guidance, `batched` concatenates the unconditional and conditional inputs on the batch so one UNet call
    computes both, as diffusers' SVD pipeline does; otherwise two calls, one per branch. Frame t then gets
    uncond + guidance[t] * (cond - uncond).
    """
    frames = scaled_latents.shape[1]
    image_latents = cond.image_latents.expand(-1, frames, -1, -1, -1).to(scaled_latents.dtype)

    def run(latents: torch.Tensor, branch: slice) -> torch.Tensor:
        inputs = torch.cat([latents, image_latents[branch]], dim=2)
        return unet(inputs, timestep, encoder_hidden_states=cond.image_embeddings[branch],
                    added_time_ids=cond.added_time_ids[branch], return_dict=False)[0]

    if not cond.guided:
        return run(scaled_latents, slice(None))
    if batched:
        uncond, conditional = run(torch.cat([scaled_latents] * 2), slice(None)).chunk(2)
    else:
        half = scaled_latents.shape[0]
        uncond, conditional = run(scaled_latents, slice(0, half)), run(scaled_latents, slice(half, None))
    scale = guidance.to(conditional.device, conditional.dtype).view(1, frames, 1, 1, 1)
    return uncond + scale * (conditional - uncond)

"""Initial noise for a video: independent per frame, or FreeNoise-style shuffled repeats for overlapping windows."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def video_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype,
                ) -> torch.Tensor:
    """Independent Gaussian noise `[B, T, C, h, w]`, drawn on the generator's device so seeds agree across devices."""
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def shuffled_window_noise(shape: tuple[int, ...], window: int, stride: int, generator: torch.Generator,
                          device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FreeNoise (Qiu et al. 2023) noise rescheduling: frames after the first window reuse earlier noise, shuffled.

    Each new block of `stride` frames takes the noise of the frames one window earlier in a random order, so every
    window sees noise from the same pool (consistent content) while the order still differs (motion).
    """
    batch, frames = shape[:2]
    noise = video_noise((batch, min(window, frames), *shape[2:]), generator, device, dtype)
    for start in range(window, frames, stride):
        count = min(stride, frames - start)
        source = noise[:, start - window: start - window + count]
        order = torch.randperm(count, generator=generator, device=generator.device).to(device)
        noise = torch.cat([noise, source[:, order]], dim=1)
    return noise

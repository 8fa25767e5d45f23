"""Long-clip validation loss: the training objective on held-out clips at fixed noise levels and fixed noise.

The same clips, noise levels and noise are used for every model compared, so a lower number means the model
denoises the held-out long clips better, and nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exvideo import LatentBatch, post_tuning_loss
from exvideo.objective import karras_sigmas
from exvideo.samples import LatentClip, collate

# Noise levels spread over the Karras schedule's indices (the training draws an index uniformly).
DEFAULT_LEVELS = 8


def validation_levels(count: int = DEFAULT_LEVELS) -> torch.Tensor:
    """`count` Karras noise levels at evenly spaced indices, excluding the two extremes."""
    levels = karras_sigmas()
    index = torch.linspace(0, len(levels) - 1, count + 2).round().long()[1:-1]
    return levels[index].float()


@torch.no_grad()
def validation_losses(unet: nn.Module, clips: list[LatentClip], seed: int = 0,
                      levels: int = DEFAULT_LEVELS) -> np.ndarray:
    """`post_tuning_loss` of each held-out clip [clips], averaged over `levels` noise levels, with noise drawn from
    (seed, clip, level): the same for every model given the same clips. Runs on the UNet's device."""
    if not clips:
        raise ValueError("validation_losses needs at least one held-out clip")
    unet.eval()
    device = next(unet.parameters()).device
    sigmas = validation_levels(levels)
    losses = np.zeros(len(clips))
    for index, clip in enumerate(clips):
        batch: LatentBatch = collate([clip]).to(device)
        for level, sigma in enumerate(sigmas):
            # Noise drawn on the CPU: the same numbers whatever device scores the model.
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + level)
            noise = torch.randn(batch.latents.shape, generator=generator).to(device)
            losses[index] += post_tuning_loss(unet, batch, sigma=sigma.reshape(1).to(device),
                                              noise=noise).item() / len(sigmas)
    return losses

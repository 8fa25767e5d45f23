"""Long-clip validation loss: the training objective on held-out clips at fixed noise levels and fixed noise.

The same clips, noise levels and noise are used for every model compared, so a lower number means the model
denoises the held-out long clips better, and nothing else.
"""

from __future__ import annotations

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
def validation_loss(unet: nn.Module, clips: list[LatentClip], seed: int = 0, levels: int = DEFAULT_LEVELS) -> float:
    """Mean `post_tuning_loss` over held-out clips x noise levels, with noise drawn from (seed, clip, level)."""
    if not clips:
        raise ValueError("validation_loss needs at least one held-out clip")
    unet.eval()
    total = 0.0
    sigmas = validation_levels(levels)
    for index, clip in enumerate(clips):
        batch: LatentBatch = collate([clip])
        for level, sigma in enumerate(sigmas):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + level)
            noise = torch.randn(batch.latents.shape, generator=generator)
            total += post_tuning_loss(unet, batch, sigma=sigma.reshape(1), noise=noise).item()
    return total / (len(clips) * len(sigmas))

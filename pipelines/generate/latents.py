"""Post-processing of denoised latents before decoding."""

from __future__ import annotations

import torch


def renormalize_frames(latents: torch.Tensor, contrast: float = 1.2) -> torch.Tensor:
    """Give every frame's latent the whole video's mean and std, then multiply by `contrast`.

    The reference does this by default when generating with the released checkpoint: it counters frames drifting
    darker or greyer along a long video, and the contrast factor compensates its training/decoding scale mismatch
    (docs/method.md, section 3). `latents` is `[B, T, C, h, w]`; statistics are per video.
    """
    frame_dims = (2, 3, 4)
    video_dims = (1, 2, 3, 4)
    mean = latents.mean(dim=video_dims, keepdim=True)
    std = latents.std(dim=video_dims, keepdim=True)
    frame_mean = latents.mean(dim=frame_dims, keepdim=True)
    frame_std = latents.std(dim=frame_dims, keepdim=True).clamp_min(1e-6)
    return ((latents - frame_mean) / frame_std * std + mean) * contrast

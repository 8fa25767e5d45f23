"""Post-processing of denoised latents before decoding, as the reference's `post_process_latents`."""

from __future__ import annotations

import torch


def post_process_latents(latents: torch.Tensor, renormalize: bool, contrast: float) -> torch.Tensor:
    """Optionally give every frame's latent the whole video's mean and std, then multiply all latents by `contrast`.

    The reference applies the contrast factor whether or not it renormalises; with the released checkpoint it
    does both by default, to counter frames drifting darker or greyer along a long video and the checkpoint's
    training/decoding scale mismatch (docs/method.md, section 3). `latents` is `[B, T, C, h, w]`; statistics are
    per video.
    """
    if renormalize:
        frame_dims, video_dims = (2, 3, 4), (1, 2, 3, 4)
        mean = latents.mean(dim=video_dims, keepdim=True)
        std = latents.std(dim=video_dims, keepdim=True)
        frame_mean = latents.mean(dim=frame_dims, keepdim=True)
        frame_std = latents.std(dim=frame_dims, keepdim=True).clamp_min(1e-6)
        latents = (latents - frame_mean) / frame_std * std + mean
    return latents * contrast

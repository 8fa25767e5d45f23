"""The miniature's models: a tiny SVD VAE trained here on world frames, and SVD checkpoints assembled from parts.

The VAE has no project stage (the real SVD VAE is never trained by this project), so it is trained by a small
function here: diffusers' `AutoencoderKLTemporalDecoder` (SVD's class) with 4x spatial downsampling (SVD's is 8x:
at this world's 32 px an 8x latent pixel is as wide as the whole object), reconstruction MSE of the posterior mean
on short clips (its decoder is temporal) plus a small KL term. Its `scaling_factor` is then set to 1 / std of the
latents, as Stable Diffusion's factor was chosen, so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from tqdm import tqdm

from exvideo import tiny_svd_components
from exvideo.models import write_directory_atomically


def miniature_vae(size: int, seed: int = 0) -> AutoencoderKLTemporalDecoder:
    """A randomly initialised SVD VAE for `size`-pixel frames: 3 levels of 32 channels (4x downsampling)."""
    torch.manual_seed(seed)
    return AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                        layers_per_block=1, latent_channels=4, sample_size=size)


def train_vae(clips: np.ndarray, steps: int, clip_frames: int = 8, batch_clips: int = 2, lr: float = 2e-3,
              kl_weight: float = 1e-4, seed: int = 0, device: str = "cpu") -> AutoencoderKLTemporalDecoder:
    """Train the miniature VAE on uint8 videos [N, T, H, W, 3] on `device`; return it on the CPU in eval mode with
    its scaling factor set.

    The decoder learns from the posterior mean, not a sample: the encoder starts with a unit posterior spread, and
    decoding samples of it blurs the object away for most of a CPU budget (the diffusion model adds its own noise
    to the latents, so nothing downstream needs the sampled path).
    """
    if clips.shape[1] < clip_frames:
        raise ValueError(f"VAE clips need at least clip_frames={clip_frames} frames, got {clips.shape[1]}")
    vae = miniature_vae(clips.shape[2], seed).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)  # [N, T, 3, H, W] uint8
    progress = tqdm(range(steps), desc="vae", unit="step")
    for _ in progress:
        picks = rng.integers(len(clips), size=batch_clips)
        starts = rng.integers(clips.shape[1] - clip_frames + 1, size=batch_clips)
        batch = torch.stack([pixels[i, s:s + clip_frames] for i, s in zip(picks, starts)])
        x = batch.flatten(0, 1).to(device).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.mode(), num_frames=clip_frames).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = pixels[: min(len(clips), 32), 0].to(device).float() / 127.5 - 1
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae.cpu()


def write_svd(path: str | os.PathLike, vae: AutoencoderKLTemporalDecoder,
              unet: UNetSpatioTemporalConditionModel | None = None, seed: int = 0) -> Path:
    """Write a diffusers-format SVD checkpoint (what `exvideo.load_svd` reads) from the trained VAE and a UNet.

    The CLIP image encoder, feature extractor and scheduler are the tiny SVD's (the encoder is random and frozen:
    it only gives the UNet's cross-attention a fixed projection of frame 0). Without `unet`, the tiny SVD's random
    UNet of `seed` is written: the starting point of base training. Written under a temporary name, then renamed.
    """
    components = tiny_svd_components(seed)
    components.vae = vae
    if unet is not None:
        components.unet = unet
    return write_directory_atomically(path, True, components.pipeline().save_pretrained)

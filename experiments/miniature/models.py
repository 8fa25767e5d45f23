"""The miniature's models: a tiny SVD VAE trained here on world frames, and SVD checkpoints assembled from parts.

The VAE has no project stage (the real SVD VAE is never trained by this project), so it is trained by a small
function here: diffusers' `AutoencoderKLTemporalDecoder` of the tiny config, reconstruction MSE plus a small KL
term on short clips (its decoder is temporal). Its `scaling_factor` is then set to 1 / std of the latents, as
Stable Diffusion's factor was chosen, so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from tqdm import tqdm

from exvideo import tiny_svd_components


def train_vae(clips: np.ndarray, steps: int, clip_frames: int = 8, batch_clips: int = 2, lr: float = 1e-3,
              kl_weight: float = 1e-4, seed: int = 0) -> AutoencoderKLTemporalDecoder:
    """Train the tiny SVD VAE on uint8 videos [N, T, H, W, 3]; return it in eval mode with its scaling factor set."""
    if clips.shape[1] < clip_frames:
        raise ValueError(f"VAE clips need at least clip_frames={clip_frames} frames, got {clips.shape[1]}")
    vae = tiny_svd_components(seed).vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)  # [N, T, 3, H, W] uint8
    progress = tqdm(range(steps), desc="vae", unit="step")
    for _ in progress:
        picks = rng.integers(len(clips), size=batch_clips)
        starts = rng.integers(clips.shape[1] - clip_frames + 1, size=batch_clips)
        batch = torch.stack([pixels[i, s:s + clip_frames] for i, s in zip(picks, starts)])
        x = batch.flatten(0, 1).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(), num_frames=clip_frames).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = pixels[: min(len(clips), 32), 0].float() / 127.5 - 1
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def reconstruction_psnr(vae: AutoencoderKLTemporalDecoder, clip: np.ndarray) -> float:
    """PSNR (dB) of the VAE's reconstruction of one uint8 clip [T, H, W, 3] (posterior mean, temporal decode)."""
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = vae.decode(vae.encode(x).latent_dist.mean, num_frames=len(clip)).sample.clamp(-1, 1)
    mse = torch.mean(((out - x) / 2) ** 2).item()
    return float(10 * np.log10(1 / max(mse, 1e-10)))


def write_svd(path: str | os.PathLike, vae: AutoencoderKLTemporalDecoder,
              unet: UNetSpatioTemporalConditionModel | None = None, seed: int = 0) -> Path:
    """Write a diffusers-format SVD checkpoint (what `exvideo.load_svd` reads) from the trained VAE and a UNet.

    The CLIP image encoder, feature extractor and scheduler are the tiny SVD's (the encoder is random and frozen:
    it only gives the UNet's cross-attention a fixed projection of frame 0). Without `unet`, the tiny SVD's random
    UNet of `seed` is written: the starting point of base training. Written under a temporary name, then renamed.
    """
    path = Path(path)
    components = tiny_svd_components(seed)
    components.vae = vae
    if unet is not None:
        components.unet = unet
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    components.pipeline().save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path

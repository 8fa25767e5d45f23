"""ExVideo's training objective on cached latents: EDM preconditioning, x0 target with a contrast scale.

With x = x0 + s * noise, the UNet F sees c_in * x = x / sqrt(s^2 + 1) concatenated on channels with the
(unscaled) first-frame latent, at timestep c_noise = 0.25 ln s; the prediction is
x0_pred = c_skip * x + c_out * F with c_skip = 1 / (s^2 + 1), c_out = -s / sqrt(s^2 + 1) (v-prediction, sigma_data 1),
and the loss is MSE(x0_pred, contrast * x0) weighted by sqrt(1 + s^2) / s. The contrast scale 1.01 pushes against
grey videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0
NUM_LEVELS = 1000
CONTRAST = 1.01


@dataclass
class LatentBatch:
    """One batch of cached training clips, as preprocessing stores them.

    latents: [B, T, 4, h, w], VAE posterior mean times the VAE scaling factor.
    cond_latent: [B, 4, h, w], unscaled VAE latent of frame 0 (SVD's image conditioning).
    image_embeds: [B, 1, D], CLIP image embedding of frame 0.
    added_time_ids: [B, 3], (fps - 1, motion bucket id, noise augmentation strength).
    """

    latents: torch.Tensor
    cond_latent: torch.Tensor
    image_embeds: torch.Tensor
    added_time_ids: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LatentBatch":
        return LatentBatch(*(t.to(device, dtype) for t in (self.latents, self.cond_latent, self.image_embeds,
                                                            self.added_time_ids)))


def added_time_ids(fps: torch.Tensor | float, motion_bucket: torch.Tensor | int, noise_aug: float = 0.0,
                   batch_size: int | None = None) -> torch.Tensor:
    """SVD's micro-conditioning [B, 3]: (fps - 1, motion bucket, noise augmentation), as the UNet was trained."""
    fps = torch.as_tensor(fps, dtype=torch.float32).reshape(-1)
    bucket = torch.as_tensor(motion_bucket, dtype=torch.float32).reshape(-1)
    n = batch_size or max(len(fps), len(bucket))
    fps, bucket = fps.expand(n), bucket.expand(n)
    return torch.stack([fps - 1, bucket, torch.full_like(fps, float(noise_aug))], dim=1)


def karras_sigmas(num_levels: int = NUM_LEVELS, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, start: float = 0.0) -> torch.Tensor:
    """The EDM/Karras noise levels, from sigma_max down to sigma_min; with `start` > 0 only the part of that
    curve from `start` to its end, still `num_levels` of them (the reference's denoising_strength = 1 - start)."""
    ramp = torch.linspace(start, 1, num_levels, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sample_sigmas(batch_size: int, generator: torch.Generator | None = None,
                  levels: torch.Tensor | None = None) -> torch.Tensor:
    """One noise level per clip, its index drawn uniformly among the Karras levels."""
    levels = karras_sigmas() if levels is None else levels
    index = torch.randint(0, len(levels), (batch_size,), generator=generator)
    return levels[index].float()


def edm_preconditioning(sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """c_skip, c_out, c_in, c_noise and the loss weight for noise levels `sigma` (any shape)."""
    var = sigma ** 2 + 1
    return {
        "c_skip": 1 / var,
        "c_out": -sigma / var.sqrt(),
        "c_in": 1 / var.sqrt(),
        "c_noise": 0.25 * sigma.log(),
        "weight": var.sqrt() / sigma,
    }


def _per_clip(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


def denoise(unet: nn.Module, noisy: torch.Tensor, sigma: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
    """x0 prediction of the UNet for `noisy` latents [B, T, 4, h, w] at noise levels `sigma` [B]."""
    pre = edm_preconditioning(sigma)
    num_frames = noisy.shape[1]
    cond = batch.cond_latent[:, None].expand(-1, num_frames, -1, -1, -1)
    unet_input = torch.cat([_per_clip(pre["c_in"], noisy.ndim) * noisy, cond.to(noisy.dtype)], dim=2)
    model_output = unet(
        unet_input, pre["c_noise"], encoder_hidden_states=batch.image_embeds,
        added_time_ids=batch.added_time_ids, return_dict=False,
    )[0]
    return _per_clip(pre["c_skip"], noisy.ndim) * noisy + _per_clip(pre["c_out"], noisy.ndim) * model_output.float()


def post_tuning_loss(unet: nn.Module, batch: LatentBatch, generator: torch.Generator | None = None,
                     contrast: float = CONTRAST, sigma: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """ExVideo's training loss for a batch of cached latents (scalar, mean over clips).

    Noise levels and noise come from `generator` unless given; the loss is computed in float32 whatever the
    UNet's dtype.
    """
    x0 = batch.latents.float()
    if sigma is None:
        sigma = sample_sigmas(x0.shape[0], generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    noisy = x0 + _per_clip(sigma, x0.ndim) * noise
    x0_pred = denoise(unet, noisy, sigma, batch)
    per_clip = F.mse_loss(x0_pred, contrast * x0, reduction="none").flatten(1).mean(1)
    return (per_clip * edm_preconditioning(sigma)["weight"]).mean()

"""AnimateDiff's training objective on cached latents: the diffusion loss its scheduler defines.

For clean latents x0 (VAE posterior mean times the scaling factor), a timestep t drawn uniformly from the
scheduler's `num_train_timesteps` and Gaussian noise e, the UNet sees x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e
(the scheduler's own `add_noise`, so its beta schedule) and the caption's text embedding; the loss is the MSE
between its output and the target the scheduler's `prediction_type` names: e for "epsilon", the velocity
sqrt(abar_t) e - sqrt(1 - abar_t) x0 for "v_prediction" (the scheduler's `get_velocity`). Unlike SVD's objective
(exvideo.objective) there is no loss weighting and no image conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the shard reader imports this module's batch type, and need not import diffusers
    from diffusers import SchedulerMixin

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class TextLatentBatch:
    """One batch of cached AnimateDiff training clips.

    latents: [B, T, 4, h, w], VAE posterior mean times the VAE scaling factor (the shards' layout).
    text_embeds: [B, L, D], the CLIP text encoder's last hidden state of each clip's caption.
    """

    latents: torch.Tensor
    text_embeds: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextLatentBatch":
        return TextLatentBatch(self.latents.to(device, dtype), self.text_embeds.to(device, dtype))


def prediction_type(scheduler: SchedulerMixin) -> str:
    """The scheduler's prediction type, refused when the objective does not implement it."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler predicts {kind!r}; AnimateDiff post-tuning trains {PREDICTION_TYPES}")
    return kind


def predict(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """The motion UNet's output for `noisy` latents [B, T, C, h, w] (returned in the same layout)."""
    num_frames = noisy.shape[1]
    # diffusers' UNetMotionModel takes [B, C, T, h, w] and one text embedding per frame.
    per_frame_text = text_embeds.repeat_interleave(num_frames, dim=0)
    output = unet(noisy.transpose(1, 2), timesteps, encoder_hidden_states=per_frame_text, return_dict=False)[0]
    return output.transpose(1, 2)


def noise_prediction_loss(unet: nn.Module, scheduler: SchedulerMixin, batch: TextLatentBatch,
                          generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
    """AnimateDiff's training loss for a batch of cached latents (scalar, mean over clips and elements).

    Timesteps and noise come from `generator` unless given; the loss is computed in float32 whatever the UNet's
    dtype.
    """
    kind = prediction_type(scheduler)
    x0 = batch.latents.float()
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    timesteps = timesteps.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    # The scheduler's helpers broadcast per-clip coefficients over trailing dimensions, whatever the layout.
    noisy = scheduler.add_noise(x0, noise, timesteps)
    target = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    output = predict(unet, noisy, timesteps, batch.text_embeds)
    return F.mse_loss(output.float(), target)

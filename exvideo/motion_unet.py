"""ExVideo extension of diffusers' AnimateDiff UNet (`UNetMotionModel`), the second family after SVD.

AnimateDiff's motion modules (`AnimateDiffTransformer3D`) attend over frames. Each of their transformer blocks adds
a fixed sinusoid of the frame index (`SinusoidalPositionalEmbedding`, `motion_max_seq_length` rows, 32 in the
released adapters) before its two attentions; the adapters were trained on 16-frame clips. Per motion module the
extension changes two things, as for SVD (exvideo.unet):

* each block's sinusoid becomes a trainable table `[num_frames, C]` (`pos_embed.embeddings`), initialised with the
  same sinusoid at *cyclic* frame ids: 0..base-1, then back and forth inside the base's training length;
* an identity-initialised `Conv3d(C, C, 3)` with reflect padding (`positional_conv`) runs over (C, T, H, W) on the
  temporal branch, after the input projection and before the transformer blocks. It is not residual.

Because the table repeats the sinusoid for frames below `base_frames` and the convolution starts as the identity,
the extended UNet computes exactly what the base computes for any clip of at most `base_frames` frames.
"""

from __future__ import annotations

import torch
from diffusers import UNetMotionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from exvideo.unet import FramePositionTable, identity_conv3d, reflect_conv3d, table_length

# AnimateDiff's motion modules were trained on 16-frame clips.
MOTION_BASE_FRAMES = 16


class MotionPositionTable(FramePositionTable):
    """Learned replacement for a motion block's sinusoidal frame embedding: one row per frame, added to the tokens
    (SVD's table is looked up by frame id and fed to an MLP instead)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` `[B*H*W, T, C]` plus the first T rows of the table."""
        return tokens + self.embeddings[: tokens.shape[1]].to(tokens.dtype)


class ExVideoAnimateDiffTransformer3D(AnimateDiffTransformer3D):
    """`AnimateDiffTransformer3D` with ExVideo's position tables and 3D convolution.

    Never constructed directly: `extend_motion_unet` converts diffusers' own modules in place, so parameter names,
    configs and every other behaviour stay diffusers'.
    """

    positional_conv: nn.Conv3d

    @property
    def num_frames(self) -> int:
        """Rows of this module's position tables: the longest clip it takes."""
        return self.transformer_blocks[0].pos_embed.num_frames

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        if num_frames > self.num_frames:
            raise ValueError(
                f"asked for {num_frames} frames but the ExVideo position tables hold {self.num_frames}; extend the "
                f"UNet with extend_unet(unet, num_frames={num_frames}) or load an adapter trained for that many frames"
            )
        batch_frames, channels, height, width = hidden_states.shape
        batch = batch_frames // num_frames
        residual = hidden_states
        video = hidden_states.reshape(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        video = self.norm(video)
        tokens = self.proj_in(video.permute(0, 3, 4, 2, 1).reshape(batch * height * width, num_frames, channels))

        # ExVideo: the 3D convolution over (T, H, W) of the projected tokens, [B, C', T, H, W] for the convolution.
        inner = tokens.shape[-1]
        video = tokens.reshape(batch, height, width, num_frames, inner).permute(0, 4, 3, 1, 2)
        video = reflect_conv3d(self.positional_conv, video)
        tokens = video.permute(0, 3, 4, 2, 1).reshape(batch * height * width, num_frames, inner)

        for block in self.transformer_blocks:
            tokens = block(hidden_states=tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                           cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)

        tokens = self.proj_out(tokens)
        out = tokens.reshape(batch, height, width, num_frames, channels).permute(0, 3, 4, 1, 2).contiguous()
        return out.reshape(batch_frames, channels, height, width) + residual


def motion_modules(unet: nn.Module) -> dict[str, AnimateDiffTransformer3D]:
    """Every motion module (`AnimateDiffTransformer3D`) of a UNet, by module name, in forward order."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, AnimateDiffTransformer3D)}


def motion_num_frames(unet: nn.Module) -> int | None:
    """Length of the UNet's ExVideo motion position tables, or None if it has not been extended."""
    return table_length({m.num_frames for m in motion_modules(unet).values()
                         if isinstance(m, ExVideoAnimateDiffTransformer3D)}, "motion position tables")


def _extend_motion_module(module: AnimateDiffTransformer3D, ids: torch.Tensor) -> None:
    for block in module.transformer_blocks:
        sinusoid = block.pos_embed
        if not isinstance(sinusoid, SinusoidalPositionalEmbedding):
            raise ValueError(f"motion block has {type(sinusoid).__name__} frame positions; ExVideo extends the "
                             "sinusoidal ones (positional_embeddings='sinusoidal')")
        if int(ids.max()) >= sinusoid.pe.shape[1]:
            raise ValueError(f"base_frames {int(ids.max()) + 1} exceeds the motion modules' "
                             f"{sinusoid.pe.shape[1]} sinusoid rows (motion_max_seq_length)")
        block.pos_embed = MotionPositionTable(sinusoid.pe[0, ids.to(sinusoid.pe.device)].clone())
    module.positional_conv = identity_conv3d(module.proj_in.out_features, module.proj_in.weight)
    module.__class__ = ExVideoAnimateDiffTransformer3D


def extend_motion_unet(unet: UNetMotionModel, ids: list[int]) -> UNetMotionModel:
    """Convert every motion module of an AnimateDiff UNet in place, its tables initialised at frame `ids` (one per
    table row); `exvideo.extend_unet` is the entry point."""
    modules = motion_modules(unet)
    if not modules:
        raise ValueError("UNetMotionModel has no motion modules to extend; build it with its MotionAdapter first")
    table_ids = torch.tensor(ids)
    for module in modules.values():
        _extend_motion_module(module, table_ids)
    return unet

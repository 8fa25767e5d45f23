"""ExVideo extension of diffusers' Stable Video Diffusion UNet.

ExVideo post-tunes only the temporal modules of SVD so that it makes videos longer than the 25 frames it was
trained on. Per `TransformerSpatioTemporalModel` it changes two things:

* the sinusoid of the frame index (`time_proj`) becomes a trainable table `[num_frames, C]`, initialised with the
  sinusoid at *cyclic* position ids, and still feeds the existing frame-position MLP (`time_pos_embed`);
* an identity-initialised `Conv3d(C, C, 3, padding=1, padding_mode="reflect")` runs over (C, T, H, W) after the
  position embedding is added and before the temporal transformer block. It is not residual.

The conversion is in place: each transformer keeps its diffusers parameter names and gains
`time_proj.embeddings` and `temporal_transformer_blocks.N.positional_conv.{weight,bias}`. Because the table
reproduces the sinusoid for frames 0-24 and the convolution starts as the identity, the extended UNet computes
exactly what the base UNet computes for any clip of at most 25 frames.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)
from torch import nn

# SVD was trained on 25 frames; ExVideo keeps positions 0..24 and bounces later frames between 24 and 4.
BASE_FRAMES = 25
CYCLE_LOW = 4
CONFIG_KEY = "exvideo_num_frames"


def cyclic_position_ids(num_frames: int, base_frames: int = BASE_FRAMES, low: int = CYCLE_LOW) -> list[int]:
    """Position ids ExVideo initialises its table with: 0..base-1, then back and forth between base-1 and `low`.

    For 128 frames this is the reference's list (docs/method.md, section 1): 25 -> 23, 44 -> 4, 64 -> 24.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    top = base_frames - 1
    span = top - low
    ids = []
    for i in range(num_frames):
        if i <= top:
            ids.append(i)
            continue
        k = (i - top) % (2 * span)
        ids.append(top - k if k <= span else low + (k - span))
    return ids


class FramePositionTable(nn.Module):
    """Learned replacement for the sinusoidal frame-index projection: one row per frame."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings)

    @property
    def num_frames(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, frame_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[frame_ids]


def reflect_conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3x3 convolution with reflect padding of 1, replicating dimensions of size 1.

    Reflect padding is undefined for a dimension of size 1 (a single frame, or a 1x1 latent in a tiny model);
    replicating it there keeps the identity initialisation exact at every size.
    """
    _, _, t, h, w = x.shape
    singleton = (w == 1, w == 1, h == 1, h == 1, t == 1, t == 1)
    if any(singleton):
        x = F.pad(x, [int(s) for s in singleton], mode="replicate")
        reflect = [0 if s else 1 for s in singleton]
    else:
        reflect = [1] * 6
    if any(reflect):
        x = F.pad(x, reflect, mode="reflect")
    return F.conv3d(x, conv.weight, conv.bias)


def reflect_conv3d_channels_last(conv: nn.Conv3d, video: torch.Tensor) -> torch.Tensor:
    """`reflect_conv3d` on channels-last activations `[B, T, H, W, C]`, returning the same layout.

    The tokens already lie in this order, so no permuted copy is made on the way in or out, and cuDNN runs its
    NDHWC kernels.
    """
    weight = conv.weight.contiguous(memory_format=torch.channels_last_3d)
    out = F.conv3d(reflect_pad_channels_last(video).permute(0, 4, 1, 2, 3), weight, conv.bias)
    return out.permute(0, 2, 3, 4, 1)


def reflect_pad_channels_last(video: torch.Tensor) -> torch.Tensor:
    """Pad `[B, T, H, W, C]` by 1 on T, H and W: reflect (index 1 and n-2), or replicate a dimension of size 1.

    Eager: one copy of the video into a padded buffer plus thin copies of its faces, where concatenating once per
    dimension would copy the whole video three times forward and more in backward (benchmarks/memory_traffic.py).
    Inside compiled code (`speed.compile_scope` "steps"): a gather along each dimension, which inductor fuses into
    one kernel with the position-embedding add before it, where the buffer's in-place face copies would each
    become a copy of the whole buffer.
    """
    if torch.compiler.is_compiling():
        return gather_pad_channels_last(video)
    return _ReflectPadChannelsLast.apply(video)


def gather_pad_channels_last(video: torch.Tensor) -> torch.Tensor:
    """`reflect_pad_channels_last` as one gather per padded dimension (the form compiled code fuses)."""
    for dim in (1, 2, 3):
        size = video.shape[dim]
        # Source of each padded position: 1, 0, 1, ..., n-1, n-2 (reflect), or 0, 0, 0 for n = 1 (replicate).
        index = torch.arange(-1, size + 1, device=video.device).abs()
        index = torch.where(index > size - 1, 2 * (size - 1) - index, index).clamp(0, size - 1)
        video = video.index_select(dim, index)
    return video


def _mirror_sources(size: int) -> tuple[int, int]:
    """Padded indices the two pads of a dimension copy: original 1 and n-2 (reflect), or 0 for a size of 1."""
    inner = int(size > 1)
    return 1 + inner, size - inner


class _ReflectPadChannelsLast(torch.autograd.Function):
    """Faces are copied W first, then H and T over the already padded ones, so the corners come out right;
    backward folds the faces' gradients back in the reverse order."""

    @staticmethod
    def forward(ctx, video: torch.Tensor) -> torch.Tensor:
        batch, frames, height, width, channels = video.shape
        ctx.sizes = frames, height, width
        padded = video.new_empty(batch, frames + 2, height + 2, width + 2, channels)
        padded[:, 1:-1, 1:-1, 1:-1] = video
        first, last = _mirror_sources(width)
        padded[:, 1:-1, 1:-1, 0] = padded[:, 1:-1, 1:-1, first]
        padded[:, 1:-1, 1:-1, -1] = padded[:, 1:-1, 1:-1, last]
        first, last = _mirror_sources(height)
        padded[:, 1:-1, 0] = padded[:, 1:-1, first]
        padded[:, 1:-1, -1] = padded[:, 1:-1, last]
        first, last = _mirror_sources(frames)
        padded[:, 0] = padded[:, first]
        padded[:, -1] = padded[:, last]
        return padded

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        frames, height, width = ctx.sizes
        grad = grad.clone()
        first, last = _mirror_sources(frames)
        grad[:, first] += grad[:, 0]
        grad[:, last] += grad[:, -1]
        first, last = _mirror_sources(height)
        grad[:, 1:-1, first] += grad[:, 1:-1, 0]
        grad[:, 1:-1, last] += grad[:, 1:-1, -1]
        first, last = _mirror_sources(width)
        grad[:, 1:-1, 1:-1, first] += grad[:, 1:-1, 1:-1, 0]
        grad[:, 1:-1, 1:-1, last] += grad[:, 1:-1, 1:-1, -1]
        return grad[:, 1:-1, 1:-1, 1:-1]


class ExVideoTransformerSpatioTemporalModel(TransformerSpatioTemporalModel):
    """`TransformerSpatioTemporalModel` with ExVideo's position table and 3D convolution.

    Instances are never constructed directly: `extend_unet` converts diffusers' own modules in place, so parameter
    names, configs and every other behaviour stay diffusers'.
    """

    time_proj: FramePositionTable
    # Memory layout of the 3D convolution (exvideo.speed.set_conv_layout); both compute the same function.
    conv_layout: str = "channels_last"
    # How forward is cut into checkpointed units (exvideo.speed.enable_checkpointing): "blocks" or "lean".
    checkpoint_units: str = "blocks"

    def _temporal_step(
        self,
        temporal_block: nn.Module,
        hidden_states: torch.Tensor,
        emb: torch.Tensor,
        time_context: torch.Tensor,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
    ) -> torch.Tensor:
        channels = hidden_states.shape[-1]
        mix = hidden_states + emb
        video = mix.reshape(batch_size, num_frames, height, width, channels)
        if self.conv_layout == "channels_last":
            video = reflect_conv3d_channels_last(temporal_block.positional_conv, video)
        else:  # [B, T, H, W, C] -> [B, C, T, H, W] for the convolution, then back
            video = reflect_conv3d(temporal_block.positional_conv, video.permute(0, 4, 1, 2, 3))
            video = video.permute(0, 2, 3, 4, 1)
        mix = video.reshape(batch_size * num_frames, height * width, channels)
        return temporal_block(mix, num_frames=num_frames, encoder_hidden_states=time_context)

    def _enter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Group norm and input projection: `[B*T, C, H, W]` -> tokens `[B*T, H*W, C']`."""
        batch_frames, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch_frames, height * width, -1)
        return self.proj_in(hidden_states)

    def _spatial_step(self, block: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      enter: bool) -> torch.Tensor:
        if enter:
            hidden_states = self._enter(hidden_states)
        return block(hidden_states, encoder_hidden_states=encoder_hidden_states)

    def _temporal_mix_step(self, temporal_block: nn.Module, hidden_states: torch.Tensor, emb: torch.Tensor,
                           time_context: torch.Tensor, image_only_indicator: torch.Tensor, batch_size: int,
                           num_frames: int, height: int, width: int) -> torch.Tensor:
        mix = self._temporal_step(temporal_block, hidden_states, emb, time_context, batch_size, num_frames, height,
                                  width)
        return self.time_mixer(x_spatial=hidden_states, x_temporal=mix, image_only_indicator=image_only_indicator)

    # The two units each block pair runs as, unless checkpointed per block: (spatial, temporal with mixer), functions
    # of the transformer; exvideo.speed.compile_repeated_blocks swaps in torch.compile'd ones shared by every instance.
    units: tuple[Callable, Callable] = (_spatial_step, _temporal_mix_step)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        image_only_indicator: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> TransformerTemporalModelOutput | tuple[torch.Tensor]:
        batch_frames, inner_dim, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        batch_size = batch_frames // num_frames
        if num_frames > self.time_proj.num_frames:
            raise ValueError(
                f"asked for {num_frames} frames but the ExVideo position table holds {self.time_proj.num_frames}; "
                f"extend the UNet with extend_unet(unet, num_frames={num_frames}) or load an adapter trained for "
                "that many frames"
            )

        # Cross-attention over time sees only the first frame's context, as in diffusers' SVD.
        context = encoder_hidden_states.reshape(batch_size, num_frames, -1, encoder_hidden_states.shape[-1])[:, 0]
        time_context = context[:, None].expand(batch_size, height * width, *context.shape[1:])
        time_context = time_context.reshape(batch_size * height * width, *context.shape[1:])

        positions = self.time_proj.embeddings[:num_frames].to(self.proj_in.weight.dtype)
        emb = self.time_pos_embed(positions).repeat(batch_size, 1)[:, None, :]

        residual = hidden_states
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        if not checkpointing or self.checkpoint_units == "lean":
            # Two units per block pair; the first also holds norm + projection and the second the mixer. Under lean
            # checkpointing backward keeps only each unit's input: the transformer's input and the spatial block's
            # output.
            spatial_unit, temporal_unit = self.units
            run = self._gradient_checkpointing_func if checkpointing else lambda unit, *args: unit(*args)
            for index, (block, temporal_block) in enumerate(zip(self.transformer_blocks,
                                                                 self.temporal_transformer_blocks)):
                hidden_states = run(spatial_unit, self, block, hidden_states, encoder_hidden_states, index == 0)
                hidden_states = run(temporal_unit, self, temporal_block, hidden_states, emb, time_context,
                                    image_only_indicator, batch_size, num_frames, height, width)
        else:
            hidden_states = self._enter(hidden_states)
            for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, None, encoder_hidden_states)
                # Unlike diffusers, the temporal step is checkpointed too: at 128 frames it holds most activations.
                mix = self._gradient_checkpointing_func(
                    self._temporal_step, temporal_block, hidden_states, emb, time_context,
                    batch_size, num_frames, height, width,
                )
                hidden_states = self.time_mixer(
                    x_spatial=hidden_states, x_temporal=mix, image_only_indicator=image_only_indicator
                )

        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_frames, height, width, inner_dim).permute(0, 3, 1, 2)
        # The residual first: the sum comes out in its NCHW layout in one pass, without a contiguous copy before it.
        output = residual + hidden_states
        if not return_dict:
            return (output,)
        return TransformerTemporalModelOutput(sample=output)


def spatio_temporal_transformers(unet: nn.Module) -> dict[str, TransformerSpatioTemporalModel]:
    """Every `TransformerSpatioTemporalModel` of a UNet, by module name, in forward order."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, TransformerSpatioTemporalModel)}


def extended_num_frames(unet: nn.Module) -> int | None:
    """Length of the UNet's ExVideo position tables, or None if it has not been extended."""
    if isinstance(unet, UNetMotionModel):
        from exvideo.motion_unet import motion_num_frames  # it builds on this module

        return motion_num_frames(unet)
    return table_length({m.time_proj.num_frames for m in spatio_temporal_transformers(unet).values()
                         if isinstance(m, ExVideoTransformerSpatioTemporalModel)})


def table_length(lengths: set[int], what: str = "position tables") -> int | None:
    """The one length of a UNet's ExVideo tables, None when it has none; several lengths mean a corrupt UNet."""
    if len(lengths) > 1:
        raise ValueError(f"UNet holds {what} of different lengths {sorted(lengths)}; it is corrupt")
    return next(iter(lengths), None)


def _extend_transformer(transformer: TransformerSpatioTemporalModel, ids: torch.Tensor) -> None:
    anchor = transformer.proj_in.weight
    # The sinusoid diffusers evaluates at frame indices, evaluated once at the cyclic ids, becomes the table.
    with torch.no_grad():
        table = transformer.time_proj(ids.to(anchor.device)).to(anchor.dtype)
    transformer.time_proj = FramePositionTable(table)
    for temporal_block in transformer.temporal_transformer_blocks:
        temporal_block.positional_conv = identity_conv3d(temporal_block.norm1.normalized_shape[0], anchor)
    transformer.__class__ = ExVideoTransformerSpatioTemporalModel


def identity_conv3d(channels: int, like: torch.Tensor) -> nn.Conv3d:
    """ExVideo's `Conv3d(channels, channels, 3)` on `like`'s device and dtype, returning its input: centre tap the
    identity, every other weight and the bias zero."""
    conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1, padding_mode="reflect", device=like.device,
                     dtype=like.dtype)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1, 1] = torch.eye(channels, device=like.device, dtype=like.dtype)
        conv.bias.zero_()
    return conv


def unet_family(unet: nn.Module) -> str:
    """"animatediff" for a `UNetMotionModel`, else "svd": what adapters record and check."""
    return "animatediff" if isinstance(unet, UNetMotionModel) else "svd"


def family_base_frames(unet: nn.Module) -> int:
    """The clip length a UNet's family was trained on: 25 for SVD, 16 for AnimateDiff's motion modules."""
    from exvideo.motion_unet import MOTION_BASE_FRAMES

    return MOTION_BASE_FRAMES if isinstance(unet, UNetMotionModel) else BASE_FRAMES


def extend_unet(unet: UNetSpatioTemporalConditionModel | UNetMotionModel, num_frames: int = 128,
                base_frames: int | None = None) -> UNetSpatioTemporalConditionModel | UNetMotionModel:
    """Convert a diffusers SVD UNet, or an AnimateDiff `UNetMotionModel`, to ExVideo in place and return it.

    `base_frames` is the clip length the base model was trained on (default: the family's, `family_base_frames`);
    the tables keep positions below it and bounce later frames back into them (`cyclic_position_ids`). SVD's
    spatio-temporal transformers change as this module's docstring says, AnimateDiff's motion modules as
    exvideo.motion_unet's says.

    Works on any config of either class (tiny or full size) and on any device, `meta` included. The UNet's config
    records `exvideo_num_frames`, so `exvideo.load_unet` can rebuild an SVD UNet from `save_pretrained`.
    """
    if not isinstance(unet, (UNetSpatioTemporalConditionModel, UNetMotionModel)):
        raise TypeError("extend_unet needs a diffusers UNetSpatioTemporalConditionModel (SVD) or UNetMotionModel "
                        f"(AnimateDiff), got {type(unet).__name__}")
    current = extended_num_frames(unet)
    if current is not None:
        if current != num_frames:
            raise ValueError(f"UNet is already extended to {current} frames; cannot re-extend to {num_frames}")
        return unet
    base_frames = base_frames or family_base_frames(unet)
    ids = cyclic_position_ids(num_frames, base_frames, min(CYCLE_LOW, base_frames - 2))
    if isinstance(unet, UNetMotionModel):
        from exvideo.motion_unet import extend_motion_unet

        extend_motion_unet(unet, ids)
    else:
        transformers = spatio_temporal_transformers(unet)
        if not transformers:
            raise ValueError("UNet has no TransformerSpatioTemporalModel to extend")
        table_ids = torch.tensor(ids)
        for transformer in transformers.values():
            _extend_transformer(transformer, table_ids)
    unet.register_to_config(**{CONFIG_KEY: num_frames})
    return unet

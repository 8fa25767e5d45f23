"""Cross-attention to a single key, computed without its query.

SVD conditions every cross-attention on one token: the CLIP image embedding in the spatial blocks, the first frame's
in the temporal ones. Softmax over one key is exactly 1 whatever the query, so the attention returns the value, and
the layer's output is `to_out(to_v(context))` for every query alike. `OneKeyCrossAttnProcessor` computes that once per
sequence and broadcasts it, skipping the query projection, the attention kernel and the per-token output projection;
the block's norm before it is then unused, and torch.compile drops it. At 128 frames 512x512 this is 13.1 of 413.9
TFLOP and 72 of 617 GB of the fused memory floor per guided step (benchmarks/memory_traffic.py).

The skipped weights' gradient is exactly zero on the plain path (softmax's derivative over one key vanishes). They get
that zero here too rather than no gradient at all, so AdamW still applies its weight decay to them and DDP finds every
parameter used.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


class _ZeroGradientFor(torch.autograd.Function):
    """The identity on `output`, and an exact zero gradient for each of `params`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*params)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (grad, *(torch.zeros_like(param) for param in ctx.saved_tensors))


def attends_to_one_key(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                       attention_mask: torch.Tensor | None) -> bool:
    """Whether this call of `attn` is a plain cross-attention to a single key, which the shortcut computes exactly."""
    return (encoder_hidden_states is not None and encoder_hidden_states.ndim == 3 and hidden_states.ndim == 3
            and encoder_hidden_states.shape[1] == 1 and encoder_hidden_states.shape[0] == hidden_states.shape[0]
            and attention_mask is None
            and attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
            and getattr(attn.to_out[1], "p", 0) == 0)  # dropout per token would differ between the tokens


class OneKeyCrossAttnProcessor(AttnProcessor2_0):
    """diffusers' `AttnProcessor2_0`, with calls that attend to a single key computed without the query.

    `query_norm`: the block's norm whose output only feeds this attention's query; its parameters get the plain
    path's zero gradient too. Calls with more keys, a mask or other options run `AttnProcessor2_0` unchanged.
    """

    def __init__(self, query_norm: nn.Module | None = None):
        super().__init__()
        self.query_norm = query_norm

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        if args or kwargs or not attends_to_one_key(attn, hidden_states, encoder_hidden_states, attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        output = attn.to_out[1](attn.to_out[0](attn.to_v(context))) / attn.rescale_output_factor
        if torch.is_grad_enabled():
            skipped = [param for module in (attn.to_q, attn.to_k, attn.norm_q, attn.norm_k, self.query_norm)
                       if module is not None for param in module.parameters() if param.requires_grad]
            if skipped:
                output = _ZeroGradientFor.apply(output, *skipped)
        return output.expand(hidden_states.shape[0], hidden_states.shape[1], output.shape[-1])


def set_one_key_cross_attention(unet: nn.Module, enabled: bool) -> int:
    """Give every transformer block's cross-attention the one-key shortcut, or diffusers' processor back; returns how
    many blocks the switch covers.

    Only the blocks whose `norm2` feeds nothing but `attn2`'s query (diffusers' layer-norm transformer blocks, as in
    SVD) get it, so that norm's parameters may be given a zero gradient.
    """
    covered = 0
    for block in unet.modules():
        if not isinstance(block, (BasicTransformerBlock, TemporalBasicTransformerBlock)) or block.attn2 is None:
            continue
        if getattr(block, "norm_type", "layer_norm") != "layer_norm":
            continue
        # A processor already right is kept: compiled blocks are guarded on it, and a new one would recompile them.
        if enabled != isinstance(block.attn2.processor, OneKeyCrossAttnProcessor):
            block.attn2.set_processor(OneKeyCrossAttnProcessor(block.norm2) if enabled else AttnProcessor2_0())
        covered += 1
    return covered

"""How the UNet computes, never what: the speed switches of the training and generation paths.

Every switch has a plain counterpart (`SpeedOptions.plain()`), and each optimised path is checked against it:
`tests/test_speed.py` at tiny size on the CPU, `benchmarks/gpu_check.py` at full size on a GPU. What each switch
contributed on an H200 and an H100 is in benchmarks/RESULTS.md (`benchmarks/gpu_bench.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator

import torch
from diffusers.models.attention import FeedForward
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from exvideo.group_norm import set_parallel_group_norm
from exvideo.one_key_attention import set_one_key_cross_attention
from exvideo.speed_options import (
    Attention, Checkpointing, CompileMode, CompileScope, ConvLayout, SpeedOptions, compiles_on,
)
from exvideo.unet import ExVideoTransformerSpatioTemporalModel, spatio_temporal_transformers

logger = logging.getLogger(__name__)

# In PyTorch's default order, which is also the fallback order after the chosen backend.
_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH,
}

# diffusers classes repeated throughout the SVD UNet: compiled once per shape, reused by every instance.
REPEATED_BLOCKS = ("BasicTransformerBlock", "TemporalBasicTransformerBlock", "SpatioTemporalResBlock")


def attention_backend(name: Attention) -> contextlib.AbstractContextManager:
    """Context in which scaled-dot-product attention tries backend `name` first ("auto": PyTorch's own order).

    Calls the backend cannot serve fall back to the others (cuDNN, for one, refuses a single key, as in SVD's
    cross-attention to the image embedding).
    """
    if name == "auto":
        return contextlib.nullcontext()
    first = _BACKENDS[name]
    return sdpa_kernel([first, *(b for b in _BACKENDS.values() if b is not first)], set_priority=True)


@contextlib.contextmanager
def speed_context(options: SpeedOptions) -> Iterator[None]:
    """The call-level switches (attention backend, cuDNN autotuning) around UNet calls; restored on exit."""
    cudnn = torch.backends.cudnn
    with attention_backend(options.attention), cudnn.flags(
        enabled=cudnn.enabled, benchmark=options.cudnn_autotune, benchmark_limit=cudnn.benchmark_limit,
        deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32,
    ):
        yield


# An operation whose output costs at least this many FLOPs per element to recompute is kept for backward under
# selective checkpointing; cheaper ones (norms, activations, residual adds, narrow projections) are recomputed.
# In SVD's UNet this keeps self-attention over at least 1024 tokens, every 3x3 convolution, ExVideo's 3x3x3
# convolutions and projections from 2048 channels or more; recomputing the rest costs little time per byte saved.
SAVE_MIN_FLOPS_PER_ELEMENT = 4096

_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def flops_per_output_element(op, args: tuple) -> float:
    """FLOPs an aten operation spends per element of its output (0 for operations that are not matrix work)."""
    if op is torch.ops.aten.convolution.default:
        weight = args[1]
        return 2 * weight.shape[1] * math.prod(weight.shape[2:])
    if op is torch.ops.aten.mm.default:
        return 2 * args[0].shape[-1]
    if op is torch.ops.aten.addmm.default:
        return 2 * args[1].shape[-1]
    if op in _ATTENTION_OPS:
        return 4 * args[1].shape[-2]  # QK^T and AV over the key length
    return 0


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if flops_per_output_element(op, args) >= SAVE_MIN_FLOPS_PER_ELEMENT:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_function(policy: Checkpointing) -> Callable:
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing`."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)

    def run(module: Callable, *args):
        if policy == "selective":
            return checkpoint(module, *args, use_reentrant=False, context_fn=context_fn)
        return checkpoint(module, *args, use_reentrant=False)

    return run


# "lean" splits every feed-forward's tokens into this many pieces, each checkpointed on its own: the widest
# activations of a block (the GEGLU's 8x-wide projection) then exist for one piece at a time in backward.
FEED_FORWARD_CHUNKS = 4


class ChunkCheckpointedFeedForward(FeedForward):
    """diffusers' `FeedForward`, run in token chunks that each recompute their activations in backward.

    Instances are diffusers' own modules with their class switched, so parameter names do not change.
    """

    chunks: int = FEED_FORWARD_CHUNKS

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(hidden_states)
        run = super().forward
        pieces = hidden_states.flatten(0, -2).chunk(self.chunks)
        outputs = [checkpoint(run, piece, use_reentrant=False) for piece in pieces]
        return torch.cat(outputs).reshape(*hidden_states.shape[:-1], -1)


def enable_checkpointing(unet: nn.Module, policy: Checkpointing) -> None:
    """Gradient checkpointing over every block, the ExVideo temporal steps included, with `policy`."""
    unet.enable_gradient_checkpointing(checkpoint_function(policy))
    lean = policy == "lean"
    for module in unet.modules():
        if isinstance(module, FeedForward):
            module.__class__ = ChunkCheckpointedFeedForward if lean else FeedForward
        if isinstance(module, ExVideoTransformerSpatioTemporalModel):
            module.checkpoint_units = "lean" if lean else "blocks"


def set_conv_layout(unet: nn.Module, layout: ConvLayout) -> None:
    """Choose the memory layout ExVideo's 3D convolutions run in, on every extended transformer of `unet`."""
    for transformer in spatio_temporal_transformers(unet).values():
        if isinstance(transformer, ExVideoTransformerSpatioTemporalModel):
            transformer.conv_layout = layout


def set_conv_weights_channels_last(model: nn.Module, enabled: bool) -> None:
    """Store the 2D and 3D convolution weights of `model` channels-last (NHWC, NDHWC), or contiguous again. A
    convolution with a channels-last weight gives channels-last activations, which the layers after it keep."""
    for conv in model.modules():
        if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            layout = {4: torch.channels_last, 5: torch.channels_last_3d}[conv.weight.dim()]
            weight = conv.weight.data
            if enabled != weight.is_contiguous(memory_format=layout):
                conv.weight.data = weight.contiguous(memory_format=layout if enabled else torch.contiguous_format)


def compile_repeated_blocks(model: nn.Module, mode: CompileMode = "default", static_shapes: bool = False,
                            scope: CompileScope = "blocks") -> int:
    """torch.compile each repeated block of `model` (a UNet, or a VAE's temporal decoder) in place, in
    torch.compile's `mode`, with symbolic sizes after a block class's first recompilation or, with `static_shapes`,
    none; with `scope` "steps" also each ExVideo transformer's two steps around their blocks (`SpeedOptions`).
    Returns how many blocks and transformers it newly compiled.

    Instances of a class share compiled code. Shapes differ between blocks (channels, resolution), so after the
    first recompilation dynamo makes the changing sizes symbolic and one graph serves the blocks of the same weight
    shapes. Blocks already compiled with these settings are left as they are, so applying the same options again
    compiles nothing. A compiled step calls its block's compiled code inlined: one graph for the whole step.
    """
    settings = (mode, static_shapes)
    steps_settings = settings if scope == "steps" else None  # what the ExVideo transformers' steps should hold
    dynamic = False if static_shapes else None
    blocks = [m for m in model.modules()
              if type(m).__name__ in REPEATED_BLOCKS and getattr(m, "compiled_with", None) != settings]
    transformers = [m for m in model.modules() if isinstance(m, ExVideoTransformerSpatioTemporalModel)
                    and getattr(m, "compiled_with", None) != steps_settings]
    compiling = len(blocks) + (len(transformers) if steps_settings else 0)
    if compiling:
        logger.warning("compiling %d %s blocks%s with torch.compile: the first call of each new shape waits for it "
                       "(minutes at full size); speed.compile_blocks=false and compile_decoder=false skip it",
                       len(blocks), type(model).__name__,
                       f" and the steps of {len(transformers)} transformers" if steps_settings else "")
    # Every up/down level gives a block class new shapes; let it recompile rather than silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Under DDP (training on several workers) dynamo would split each compiled block at gradient-bucket boundaries;
    # with the blocks' symbolic sizes that split fails to compile (seen with torch 2.13: "'int' object has no attribute
    # 'meta'"), and blocks this small gain nothing from overlapping their all-reduce inside a block.
    torch._dynamo.config.optimize_ddp = False
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic)
        block.compiled_with = settings
    # Functions of the transformer, compiled once for all of them so that instances of one shape share a graph; with
    # scope "blocks", the eager steps, which call the compiled blocks.
    steps = ExVideoTransformerSpatioTemporalModel.units
    if steps_settings and transformers:
        steps = tuple(torch.compile(step, mode=mode, dynamic=dynamic) for step in steps)
    for transformer in transformers:
        transformer.units, transformer.compiled_with = steps, steps_settings
    return compiling


def compiles_blocks(unet: nn.Module, options: SpeedOptions) -> bool:
    """`compiles_on` for `unet` as it is now: its device, and whether it checkpoints selectively."""
    selective = options.checkpointing == "selective" and getattr(unet, "is_gradient_checkpointing", False)
    return compiles_on(options, next(unet.parameters()).device.type, selective)


def apply_speed(unet: nn.Module, options: SpeedOptions) -> None:
    """Apply the module-level switches (conv layout, cross-attention processors, group norms, weight layout,
    compilation) to `unet` in place.

    Compilation cannot be undone: once compiled, blocks stay compiled whatever later options say (a later change of
    processor or layout recompiles them).
    """
    set_conv_layout(unet, options.conv_layout)
    set_one_key_cross_attention(unet, options.one_key_cross_attention)
    set_parallel_group_norm(unet, options.parallel_group_norm)
    set_conv_weights_channels_last(unet, options.unet_channels_last)
    if compiles_blocks(unet, options):
        compile_repeated_blocks(unet, options.compile_mode, options.compile_static_shapes, options.compile_scope)


def apply_decoder_speed(vae: nn.Module, options: SpeedOptions) -> None:
    """Apply the switches that concern the VAE's decode (`parallel_group_norm`, `decoder_channels_last`,
    `compile_decoder`) to `vae` in place; as for the UNet, compilation cannot be undone."""
    set_parallel_group_norm(vae.decoder, options.parallel_group_norm)
    set_conv_weights_channels_last(vae.decoder, options.decoder_channels_last)
    if options.compile_decoder:
        compile_repeated_blocks(vae.decoder, options.compile_mode, options.compile_static_shapes)

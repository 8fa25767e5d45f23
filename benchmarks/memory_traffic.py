"""Bytes the UNet moves through memory-bound operators, and the least any fusion around the matrix kernels must move.

    python benchmarks/memory_traffic.py                         # guided step, SVD-XT shapes, 128 frames 512x512
    python benchmarks/memory_traffic.py --part train            # training step (forward and backward)
    python benchmarks/memory_traffic.py --plain                 # the plain path (SpeedOptions.plain()) instead
    python benchmarks/memory_traffic.py --part decode           # the windowed VAE decode of the whole video

Counted on fake tensors, so it runs on any machine in seconds, for the project's default switches run eagerly
(what torch.compile then fuses is the question this answers) or the plain path, with the FLOPs the call executes
(recomputation included). For every aten operator of one call in bf16, it takes the bytes of the operator's tensor
inputs and outputs, and splits them two ways:
  - matrix work (convolutions, matrix products, attention, and their backward) or memory-bound work (norms,
    elementwise, copies, casts);
  - for the guided step, inside or outside what `speed.compile_blocks` compiles: the repeated blocks or, with
    --compile-scope steps, the ExVideo transformers' steps around them and the ResNet blocks (not for training,
    whose backward runs outside any module's forward).
Views move nothing and are not counted.

The floor: cuDNN and cuBLAS kernels are opaque to the compiler, so even perfect fusion of everything between them
must write each matrix kernel's activation inputs once and read each output once (about the matrix bytes; weights
are a few GB of them), and group norm reads its input once more for its statistics. Divided by a card's memory
bandwidth, the floor bounds the memory-bound time from below; the matrix kernels' own time comes on top.
"""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import replace

import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from encode_throughput import SVD_VAE
from exvideo import LatentBatch, added_time_ids, extend_unet, freeze_for_post_tuning, post_tuning_loss
from exvideo.speed import REPEATED_BLOCKS, apply_speed, enable_checkpointing
from exvideo.speed_options import CompileScope, SpeedOptions
from exvideo.unet import ExVideoTransformerSpatioTemporalModel
from gpu_bench import register_cpu_attention_flops
from pipelines.generate.decode import decode_video
from pipelines.generate.params import GenerationParams

aten = torch.ops.aten
MATRIX_OPS = {
    aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
    aten.bmm.default, aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}
GROUP_NORM_OPS = {aten.native_group_norm.default, aten.native_group_norm_backward.default}
ALIASING_OPS = {aten._unsafe_view.default}  # views not registered as such: they move nothing either
ALLOCATING_OPS = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default}  # nothing written
# Memory bandwidth in TB/s, as specified by the vendor.
BANDWIDTH = {"H100 SXM": 3.35, "H200": 4.8}


def tensor_bytes(*trees) -> int:
    """Bytes of the distinct tensors in `trees` (an in-place operator's output is its input: counted once)."""
    tensors = {id(t): t for t in tree_leaves(trees) if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class TrafficCounter(TorchDispatchMode):
    """Bytes of every non-view operator, by (inside compiled blocks?, kind), plus the fused floor's terms."""

    def __init__(self):
        super().__init__()
        self.block_depth = 0
        self.bytes = collections.Counter()
        self.outside_by_op = collections.Counter()
        self.group_norm_inputs = 0
        self.tracking = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in ALIASING_OPS or func in ALLOCATING_OPS or func.namespace == "prim":
            return out
        moved = tensor_bytes(args, kwargs, out)
        where = "inside blocks" if self.block_depth else "outside blocks" if self.tracking else "all"
        kind = "matrix" if func in MATRIX_OPS else "memory-bound"
        self.bytes[(where, kind)] += moved
        if where == "outside blocks" and kind == "memory-bound":
            self.outside_by_op[str(func)] += moved
        if func in GROUP_NORM_OPS:
            self.group_norm_inputs += tensor_bytes(args[0])
        return out

    def track_blocks(self, unet: torch.nn.Module, scope: CompileScope = "blocks") -> None:
        """Count operators inside what `speed.compile_scope` `scope` compiles in `unet` apart from the others."""
        self.tracking = True
        for block in (m for m in unet.modules() if type(m).__name__ in REPEATED_BLOCKS):
            block.register_forward_pre_hook(lambda *_: setattr(self, "block_depth", self.block_depth + 1))
            block.register_forward_hook(lambda *_: setattr(self, "block_depth", self.block_depth - 1))
        if scope == "steps":
            for transformer in (m for m in unet.modules() if isinstance(m, ExVideoTransformerSpatioTemporalModel)):
                transformer.units = tuple(self.inside(unit) for unit in transformer.units)

    def inside(self, unit):
        """`unit`, its operators counted as inside the compiled regions."""
        def run(*args):
            self.block_depth += 1
            try:
                return unit(*args)
            finally:
                self.block_depth -= 1
        return run


EAGER_DEFAULTS = SpeedOptions(compile_blocks=False)


def bf16_unet(frames: int, options: SpeedOptions) -> UNetSpatioTemporalConditionModel:
    """SVD-XT's UNet, extended, built in bf16 on fake tensors (a bf16 cast of fake parameters is refused), with the
    module-level switches of `options`."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNetSpatioTemporalConditionModel()
    finally:
        torch.set_default_dtype(torch.float32)
    extend_unet(unet, frames)
    apply_speed(unet, options)
    return unet


def guided_step(counter: TrafficCounter, frames: int, latent: int, options: SpeedOptions) -> None:
    unet = bf16_unet(frames, options).requires_grad_(False)
    counter.track_blocks(unet, options.compile_scope)
    dtype = torch.bfloat16
    with torch.no_grad(), counter:
        unet(torch.randn(2, frames, 8, latent, latent, dtype=dtype), torch.ones(1),
             encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim, dtype=dtype),
             added_time_ids=torch.randn(2, 3, dtype=dtype), return_dict=False)


def training_step(counter: TrafficCounter, frames: int, latent: int, options: SpeedOptions) -> None:
    """Forward and backward as the training path runs them: trainable weights fp32, autocast, checkpointing."""
    unet = bf16_unet(frames, options)
    for param in freeze_for_post_tuning(unet).values():
        param.data = param.data.float()
    enable_checkpointing(unet, options.checkpointing)
    batch = LatentBatch(torch.randn(1, frames, 4, latent, latent), torch.randn(1, 4, latent, latent),
                        torch.randn(1, 1, unet.config.cross_attention_dim), added_time_ids(30, 127))
    with counter:
        with torch.autocast("cpu", torch.bfloat16):
            loss = post_tuning_loss(unet.train(), batch, generator=torch.Generator().manual_seed(0))
        loss.backward()


def video_decode(counter: TrafficCounter, frames: int, latent: int, options: SpeedOptions) -> None:
    """The generation path's VAE decode of a whole video, in its default overlapping windows (no speed switch
    applies to it)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE)
    finally:
        torch.set_default_dtype(torch.float32)
    params = GenerationParams()
    with counter:
        decode_video(vae, torch.randn(1, frames, 4, latent, latent), params.decode_window, params.decode_stride)


PARTS = {"guided": guided_step, "train": training_step, "decode": video_decode}


def count(frames: int, size: int, part: str = "guided", options: SpeedOptions = EAGER_DEFAULTS) -> dict:
    register_cpu_attention_flops()  # before the counter, which copies the formulas registered when it is made
    counter, flops = TrafficCounter(), FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True), flops:
        PARTS[part](counter, frames, size // 8, options)
    gigabytes = {f"{where}, {kind}": round(moved / 1e9, 1) for (where, kind), moved in sorted(counter.bytes.items())}
    matrix = sum(moved for (_, kind), moved in counter.bytes.items() if kind == "matrix")
    floor = matrix + counter.group_norm_inputs
    path = "plain" if options == SpeedOptions.plain() else "defaults"
    return {
        "part": part, "frames": frames, "size": size, "path": path, "compile_scope": options.compile_scope,
        "executed_tflop": round(flops.get_total_flops() / 1e12, 1), "gb": gigabytes,
        "outside_blocks_memory_bound_by_op": {op: round(moved / 1e9, 1)
                                              for op, moved in counter.outside_by_op.most_common(6)},
        "fused_floor_gb": round(floor / 1e9, 1),
        "fused_floor_ms": {card: round(floor / (tbs * 1e12) * 1e3) for card, tbs in BANDWIDTH.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--part", choices=list(PARTS), default="guided")
    parser.add_argument("--plain", action="store_true", help="the plain path instead of the eager defaults")
    parser.add_argument("--compile-scope", choices=["blocks", "steps"], default="blocks",
                        help="what counts as inside the compiled code (speed.compile_scope)")
    args = parser.parse_args()
    options = SpeedOptions.plain() if args.plain else replace(EAGER_DEFAULTS, compile_scope=args.compile_scope)
    print(json.dumps(count(args.frames, args.size, args.part, options), indent=1))


if __name__ == "__main__":
    main()

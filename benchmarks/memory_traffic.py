"""Bytes the guided UNet step moves through memory-bound operators, inside and outside the compiled blocks.

    python benchmarks/memory_traffic.py                  # SVD-XT shapes, 128 frames 512x512, fake tensors (CPU)
    python benchmarks/memory_traffic.py --frames 32

Counted on fake tensors, so it runs on any machine in seconds: for every aten operator of one guided UNet call
(both guidance branches, bf16), the bytes of its tensor inputs and outputs, split by whether the operator runs
inside one of the repeated blocks that `speed.compile_blocks` compiles, and whether it is matrix work
(convolution, matrix product, attention) or memory-bound (norms, elementwise, copies). Views move nothing and are
not counted. Memory-bound bytes outside the blocks bound what compiling larger regions could still fuse away:
divided by the card's bandwidth, they give an upper bound on the time at stake.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from diffusers import UNetSpatioTemporalConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from exvideo import extend_unet
from exvideo.speed import REPEATED_BLOCKS

aten = torch.ops.aten
MATRIX_OPS = {
    aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
BF16_BYTES = 2
ALIASING_OPS = {aten._unsafe_view.default}  # views not registered as such: they move nothing either


def tensor_elements(tree) -> int:
    return sum(t.numel() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


class TrafficCounter(TorchDispatchMode):
    """Bytes of every non-view operator, by (inside compiled blocks?, matrix or memory-bound) and by operator."""

    def __init__(self):
        super().__init__()
        self.block_depth = 0
        self.bytes = collections.Counter()
        self.outside_by_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in ALIASING_OPS or func.namespace == "prim":
            return out
        moved = BF16_BYTES * (tensor_elements(args) + tensor_elements(kwargs) + tensor_elements(out))
        where = "inside blocks" if self.block_depth else "outside blocks"
        kind = "matrix" if func in MATRIX_OPS else "memory-bound"
        self.bytes[(where, kind)] += moved
        if where == "outside blocks" and kind == "memory-bound":
            self.outside_by_op[str(func)] += moved
        return out


def count(frames: int, size: int) -> dict:
    counter = TrafficCounter()
    # Build and run in float32 on fake tensors (a bf16 cast of fake parameters is refused) and count bf16 bytes.
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = extend_unet(UNetSpatioTemporalConditionModel(), frames).requires_grad_(False)
        for block in (m for m in unet.modules() if type(m).__name__ in REPEATED_BLOCKS):
            block.register_forward_pre_hook(lambda *_: setattr(counter, "block_depth", counter.block_depth + 1))
            block.register_forward_hook(lambda *_: setattr(counter, "block_depth", counter.block_depth - 1))
        latent = size // 8
        with torch.no_grad(), counter:
            unet(torch.randn(2, frames, 8, latent, latent), torch.ones(1),
                 encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim),
                 added_time_ids=torch.randn(2, 3), return_dict=False)
    gigabytes = {f"{where}, {kind}": round(moved / 1e9, 1) for (where, kind), moved in sorted(counter.bytes.items())}
    top = {op: round(moved / 1e9, 1) for op, moved in counter.outside_by_op.most_common(8)}
    return {"frames": frames, "size": size, "gb_per_guided_step": gigabytes, "outside_blocks_memory_bound_by_op": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(count(args.frames, args.size), indent=1))


if __name__ == "__main__":
    main()

"""Bytes the compiled code of a guided step moves, against its eager bytes and the fused floor.

    python benchmarks/compiled_traffic.py                  # SVD-XT widths, 512x512, 2 frames, both guidance branches
    python benchmarks/compiled_traffic.py --frames 4 --json compiled_traffic.json
    python benchmarks/compiled_traffic.py --compile-scope steps     # the ExVideo transformers' steps compiled whole

Records every call of what `speed.compile_blocks` compiles in one guided step on fake tensors: the repeated blocks
or, with `--compile-scope steps`, the ExVideo transformers' steps (around their blocks) and the ResNet blocks; each
call's function, weights' shapes and inputs' shapes. For each distinct call it then runs one such call eagerly on
random bf16 inputs under `memory_traffic.TrafficCounter` (eager bytes, matrix bytes, the floor), and compiles it
with inductor on this CPU, static shapes, which reports the bytes its kernels read and write: fused kernels and the
matrix kernels it calls. Totals weight each call by how often the step makes it; the whole step adds the eager
bytes of what runs outside the compiled code (`memory_traffic.count`).

Inductor's scheduler decides fusion the same way for its CPU and GPU backends; the kernels themselves differ. So the
compiled bytes say how much traffic compiling leaves, not how fast a GPU moves it. Frames only scale the token
count (the temporal attention's length aside), so a few frames give each call's bytes per frame.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
from dataclasses import replace

import torch
from torch._inductor import config as inductor_config
from torch._inductor import metrics
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from exvideo.speed import REPEATED_BLOCKS
from exvideo.speed_options import CompileScope
from exvideo.unet import ExVideoTransformerSpatioTemporalModel
import memory_traffic
from memory_traffic import EAGER_DEFAULTS, TrafficCounter, bf16_unet


def signature(value):
    """What identifies an input: a tensor's shape and dtype, anything else itself."""
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value


def record_compiled_calls(frames: int, latent: int, scope: CompileScope) -> dict:
    """{call key: [function, args, kwargs, count]} of one guided step of the bf16 UNet with the default switches:
    the outermost calls that `compile_scope` `scope` compiles."""
    unet = bf16_unet(frames, EAGER_DEFAULTS).requires_grad_(False)
    calls: dict = {}
    depth = [0]

    def record(name: str, function, weights: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if depth[0]:
            return
        shapes = tuple(tuple(p.shape) for p in weights.parameters())
        key = (name, shapes, tree_map(signature, (args, kwargs)).__repr__())
        if key not in calls:
            calls[key] = [function, tree_map(signature, args), tree_map(signature, kwargs), 0]
        calls[key][3] += 1

    def enter_block(block, args, kwargs):
        record(type(block).__name__, block, block, args, kwargs)
        depth[0] += 1

    def leave_block(*_):
        depth[0] -= 1

    def recorded(unit):
        def run(transformer, block, *args):
            record(unit.__name__, functools.partial(unit, transformer, block), block, args, {})
            depth[0] += 1
            try:
                return unit(transformer, block, *args)
            finally:
                depth[0] -= 1
        return run

    hooks, transformers = [], []
    for module in unet.modules():
        if type(module).__name__ in REPEATED_BLOCKS:
            hooks += [module.register_forward_pre_hook(enter_block, with_kwargs=True),
                      module.register_forward_hook(leave_block)]
        if scope == "steps" and isinstance(module, ExVideoTransformerSpatioTemporalModel):
            module.units = tuple(recorded(unit) for unit in module.units)
            transformers.append(module)
    dtype = torch.bfloat16
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        unet(torch.randn(2, frames, 8, latent, latent, dtype=dtype), torch.ones(1),
             encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim, dtype=dtype),
             added_time_ids=torch.randn(2, 3, dtype=dtype), return_dict=False)
    for hook in hooks:  # the recorded calls run again to be measured: without recording them anew
        hook.remove()
    for transformer in transformers:
        del transformer.units
    return calls


def random_inputs(recorded_args: tuple, recorded_kwargs: dict, generator: torch.Generator) -> tuple[tuple, dict]:
    """Real tensors for recorded signatures: random values, but zeros for SVD's all-zero image-only indicator (a
    random one would blend the ResNet blocks' branches differently)."""
    def is_signature(value) -> bool:
        return isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype)

    def make(value):
        return torch.randn(value[0], generator=generator).to(value[1]) if is_signature(value) else value

    args, kwargs = tree_map(make, (recorded_args, recorded_kwargs), is_leaf=is_signature)
    if "image_only_indicator" in kwargs:
        kwargs["image_only_indicator"] = torch.zeros_like(kwargs["image_only_indicator"])
    return args, kwargs


def measure_call(function, args, kwargs) -> dict[str, int]:
    """Eager memory-bound and matrix bytes, the floor, and the bytes inductor's compiled kernels move, of one call."""
    counter = TrafficCounter()
    with torch.no_grad(), counter:
        function(*args, **kwargs)
    matrix = counter.bytes[("all", "matrix")]
    before = metrics.num_bytes_accessed
    with torch.no_grad():
        torch.compile(function, dynamic=False)(*args, **kwargs)
    return {"eager_memory_bound": counter.bytes[("all", "memory-bound")], "matrix": matrix,
            "floor": matrix + counter.group_norm_inputs, "compiled": metrics.num_bytes_accessed - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile-scope", choices=["blocks", "steps"], default="blocks")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts a graph's bytes only with this log on
    torch._dynamo.config.recompile_limit = 256  # every distinct call compiles its own static graph
    inductor_config.fx_graph_cache = False  # a cache hit would skip the count
    torch.manual_seed(0)
    calls = record_compiled_calls(args.frames, args.size // 8, args.compile_scope)
    generator = torch.Generator().manual_seed(0)
    totals, by_class = collections.Counter(), collections.defaultdict(collections.Counter)
    for index, (key, (function, recorded_args, recorded_kwargs, count)) in enumerate(calls.items(), 1):
        inputs, kwargs = random_inputs(recorded_args, recorded_kwargs, generator)
        row = measure_call(function, inputs, kwargs)
        moved = ", ".join(f"{name} {value / 1e9:.3f} GB" for name, value in row.items())
        print(f"[{index}/{len(calls)}] {key[0]} x{count}: {moved}", flush=True)
        for name, moved in row.items():
            totals[name] += count * moved
            by_class[key[0]][name] += count * moved
    options = replace(EAGER_DEFAULTS, compile_scope=args.compile_scope)
    outside = memory_traffic.count(args.frames, args.size, "guided", options)["gb"]
    outside_gb = outside["outside blocks, matrix"] + outside["outside blocks, memory-bound"]
    result = {
        "frames": args.frames, "size": args.size, "compile_scope": args.compile_scope, "distinct_calls": len(calls),
        # The whole step: the compiled code's bytes plus the eager bytes of everything outside it.
        "step_gb": round(totals["compiled"] / 1e9 + outside_gb, 2), "outside_eager_gb": round(outside_gb, 2),
        "gb": {name: round(moved / 1e9, 2) for name, moved in totals.items()},
        "gb_by_class": {cls: {name: round(moved / 1e9, 2) for name, moved in row.items()}
                        for cls, row in by_class.items()},
        # The floor is memory-bound traffic (writing the matrix kernels' inputs, reading their outputs); inductor's
        # count also holds the matrix kernels' own reads and writes, the matrix bytes.
        "compiled_memory_bound_over_floor": round((totals["compiled"] - totals["matrix"]) / totals["floor"], 3),
        "compiled_over_eager": round(totals["compiled"] / (totals["eager_memory_bound"] + totals["matrix"]), 3),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()

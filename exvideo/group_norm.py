"""Group norm whose statistics come from PyTorch's parallel reductions, for inference outside compiled code.

PyTorch's CUDA group norm reduces each (sample, group) row in a single thread block. SVD's temporal ResNet blocks
normalise a whole clip as one sample, so their calls have 32 (VAE decoder, one 8-frame window) or 64 (UNet, both
guidance branches) rows of 0.5-8.4 million elements, and most of the GPU's SMs sit idle: on an H100 these statistics
took 2.7 s of a 128-frame video's 8.1 s VAE decode, and 100 ms of an eager guided UNet step on an H200
(benchmarks/RESULTS.md). `torch.var_mean` spreads a long row over many thread blocks.

The result is the same function within rounding. Like PyTorch's kernel, it accumulates in float32 (or the input's
wider type) and rounds the mean and variance to the input's type; the per-channel scale and shift are applied in the
accumulation type, and the output has the input's type. Calls under autograd or inside torch.compile'd code keep
PyTorch's group norm: training's backward stays the native fused kernel, and inductor writes its own reductions.
"""

from __future__ import annotations

import torch
from torch import nn


def group_norm_parallel_stats(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """`torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)` for `x` of shape (N, C, ...), with the
    statistics from `torch.var_mean`, without gradients (its last step writes into a new tensor, which autograd
    cannot follow). The output is contiguous, as PyTorch's CUDA group norm returns it."""
    samples, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"group norm over {channels} channels cannot split them into {num_groups} groups")
    rows = x.reshape(samples, num_groups, -1)  # copies a non-contiguous input, as PyTorch's group norm does
    var, mean = torch.var_mean(rows, dim=-1, correction=0)
    accumulate = torch.promote_types(x.dtype, torch.float32)
    per_group = channels // num_groups
    scale = torch.rsqrt(var.to(accumulate) + eps).repeat_interleave(per_group, dim=1)
    shift = -mean.to(accumulate).repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight.to(accumulate)
        shift = shift * weight.to(accumulate)
    if bias is not None:
        shift = shift + bias.to(accumulate)
    broadcast = (samples, channels) + (1,) * (x.dim() - 2)
    contiguous = rows.view(x.shape)
    # One kernel: computed in the accumulation type, written in the input's.
    return torch.addcmul(shift.view(broadcast), contiguous, scale.view(broadcast), out=torch.empty_like(contiguous))


class ParallelStatsGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that computes its statistics with `group_norm_parallel_stats` when no gradient is needed and it
    runs eagerly. Instances are diffusers' own modules with their class switched, so parameter names do not change."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(input)
        return group_norm_parallel_stats(input, self.num_groups, self.weight, self.bias, self.eps)


def set_parallel_group_norm(model: nn.Module, enabled: bool) -> int:
    """Give every group norm of `model` parallel statistics, or PyTorch's own group norm back; returns how many group
    norms the switch covers."""
    covered = 0
    for module in model.modules():
        if type(module) not in (nn.GroupNorm, ParallelStatsGroupNorm):
            continue
        # A class already right is kept: compiled blocks are guarded on their modules, and a change recompiles them.
        wanted = ParallelStatsGroupNorm if enabled else nn.GroupNorm
        if type(module) is not wanted:
            module.__class__ = wanted
        covered += 1
    return covered

"""Group norm whose statistics come from PyTorch's parallel reductions, for inference outside compiled code.

PyTorch's CUDA group norm reduces each (sample, group) row in a single thread block. SVD's temporal ResNet blocks
normalise a whole clip as one sample, so their calls have 32 (VAE decoder, one 8-frame window) or 64 (UNet, both
guidance branches) rows of 0.5-8.4 million elements, and most of the GPU's SMs sit idle: on an H100 these statistics
took 2.7 s of a 128-frame video's 8.1 s VAE decode, and 100 ms of an eager guided UNet step on an H200
(benchmarks/RESULTS.md). Here `torch.var_mean` reduces per (sample, channel), spreading long rows over many thread
blocks and reading any memory layout in place (PyTorch's CUDA group norm copies a channels-last input first), and
the channels' statistics combine exactly into their group's.

The result is the same function within rounding. Like PyTorch's kernel, it accumulates in float32 (or the input's
wider type) and rounds the statistics it reduces to the input's type; the per-channel scale and shift are applied in
the accumulation type, and the output has the input's type. Calls under autograd or inside torch.compile'd code keep
PyTorch's group norm: training's backward stays the native fused kernel, and inductor writes its own reductions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def group_norm_parallel_stats(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """`torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)` for `x` of shape (N, C, ...), with the
    statistics from `torch.var_mean`, without gradients (its last step writes into a new tensor, which autograd
    cannot follow). `x` may have any dense memory layout (contiguous, channels-last, a permuted view): the statistics
    reduce it where it lies, and the output takes its layout."""
    samples, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"group norm over {channels} channels cannot split them into {num_groups} groups")
    if x.dim() < 3:  # no positions to reduce over: nothing for parallel statistics to gain
        return F.group_norm(x, num_groups, weight, bias, eps)
    # Per (sample, channel) first: a reduction over every position, which needs no copy whatever the layout.
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0)
    accumulate = torch.promote_types(x.dtype, torch.float32)
    per_group = channels // num_groups
    mean = mean.to(accumulate).view(samples, num_groups, per_group)
    var = var.to(accumulate).view(samples, num_groups, per_group)
    # Channels of a group hold equally many values: the group's variance is the mean of its channels' variances
    # plus the variance of their means.
    group_mean = mean.mean(-1, keepdim=True)
    group_var = var.mean(-1, keepdim=True) + (mean - group_mean).square().mean(-1, keepdim=True)
    scale = torch.rsqrt(group_var + eps).expand(-1, -1, per_group).reshape(samples, channels)
    shift = -group_mean.expand(-1, -1, per_group).reshape(samples, channels) * scale
    if weight is not None:
        scale = scale * weight.to(accumulate)
        shift = shift * weight.to(accumulate)
    if bias is not None:
        shift = shift + bias.to(accumulate)
    broadcast = (samples, channels) + (1,) * (x.dim() - 2)
    # One kernel: computed in the accumulation type, written in the input's type and layout.
    return torch.addcmul(shift.view(broadcast), x, scale.view(broadcast), out=torch.empty_like(x))


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
    wanted = ParallelStatsGroupNorm if enabled else nn.GroupNorm
    covered = 0
    for module in model.modules():
        if type(module) not in (nn.GroupNorm, ParallelStatsGroupNorm):
            continue
        # A class already right is kept: compiled blocks are guarded on their modules, and a change recompiles them.
        if type(module) is not wanted:
            module.__class__ = wanted
        covered += 1
    return covered

"""Overlapping windows along one axis: where they start, and blending per-window outputs back into one tensor.

Used for the VAE decode over time and space and for the `windows` baseline. Blending weights are a tent over each
window (highest in its middle) normalised by their sum at every position, so a function that treats positions
independently gives exactly what it gives on the whole axis, and overlaps cross-fade instead of leaving seams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start indices of windows of `window` positions every `stride`, the last one ending exactly at `length`."""
    if window < 1 or stride < 1 or stride > window:
        raise ValueError(f"need 1 <= stride <= window, got window {window}, stride {stride}")
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


def tent_weights(length: int) -> torch.Tensor:
    """Positive weights rising from both ends to the middle: 1, 2, ..., 2, 1."""
    positions = torch.arange(length, dtype=torch.float32)
    return torch.minimum(positions + 1, length - positions)


def blended_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int, window: int, stride: int,
                scale: int = 1, out_device: torch.device | str | None = None) -> torch.Tensor:
    """Apply `fn` to overlapping windows of `x` along `dim` and blend the outputs into one tensor.

    `fn` must keep `dim` in place and may multiply its size by `scale` (8 for latent -> pixel). Only one window's
    input and output are live at a time besides the result, which is accumulated on `out_device` (default: the
    output's device), so memory on the accelerator is bounded by the window, not the length.
    """
    length = x.shape[dim]
    total = None
    weight_sum = torch.zeros(length * scale)
    for start in window_starts(length, window, stride):
        size = min(window, length - start)
        piece = fn(x.narrow(dim, start, size))
        piece = piece.to(out_device if out_device is not None else piece.device, torch.float32)
        if total is None:
            shape = list(piece.shape)
            shape[dim] = length * scale
            total = torch.zeros(shape, device=piece.device)
        weights = tent_weights(size * scale)
        view = [1] * piece.dim()
        view[dim] = -1
        total.narrow(dim, start * scale, size * scale).add_(piece * weights.to(piece.device).view(view))
        weight_sum[start * scale:(start + size) * scale] += weights
    view = [1] * total.dim()
    view[dim] = -1
    return total / weight_sum.to(total.device).view(view)

"""VAE decode of long latent videos: overlapping temporal windows, optionally spatial tiles, blended overlaps."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLTemporalDecoder

from pipelines.generate.windows import blended_map


def decode_video(vae: AutoencoderKLTemporalDecoder, latents: torch.Tensor, window: int = 8, stride: int = 4,
                 tile: int | None = None, tile_overlap: int = 32) -> torch.Tensor:
    """Decode scaled latents `[B, T, C, h, w]` to pixels `[B, T, 3, H, W]` in [-1, 1], float32 on the CPU.

    The temporal decoder sees `window` frames at a time (the reference: 8, stride 4); `tile` (pixels) also splits
    each window into overlapping spatial tiles `tile_overlap` pixels apart. Accelerator memory is bounded by one
    window (x one tile) whatever the length; when one window covers the video this is a single plain decode.
    """
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = latents / vae.config.scaling_factor

    def decode_frames(chunk: torch.Tensor) -> torch.Tensor:
        return vae.decode(chunk.to(vae.dtype), num_frames=chunk.shape[0]).sample

    def decode_tiles(chunk: torch.Tensor) -> torch.Tensor:
        if tile is None:
            return decode_frames(chunk)
        size, step = tile // scale, (tile - tile_overlap) // scale

        def decode_row(rows: torch.Tensor) -> torch.Tensor:
            return blended_map(decode_frames, rows, dim=3, window=size, stride=step, scale=scale)

        return blended_map(decode_row, chunk, dim=2, window=size, stride=step, scale=scale)

    with torch.no_grad():
        return torch.stack([blended_map(decode_tiles, video, dim=0, window=window, stride=stride, out_device="cpu")
                            for video in latents])

"""Frames given to condition a video (the reference's `mask_frames` / `mask_frame_ids`): reading them, and the
latents that replace the video's at every denoising step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def read_frame(spec: str) -> PIL.Image.Image:
    """An RGB image from `spec`: an image path, or `video.mp4#N` for frame N of a video (decoded with decord)."""
    path, _, number = spec.rpartition("#") if "#" in spec else (spec, "", "")
    if number and Path(path).suffix.lower() in VIDEO_SUFFIXES:
        if not Path(path).is_file():
            raise FileNotFoundError(f"frame {spec}: video {path} does not exist")
        import decord

        try:
            reader = decord.VideoReader(path)
        except decord.DECORDError as exc:
            raise ValueError(f"frame {spec}: video {path} is unreadable: {exc}") from None
        if not number.isdigit() or int(number) >= len(reader):
            raise ValueError(f"frame {spec}: {path} has {len(reader)} frames, so N in {path}#N must be 0.."
                             f"{len(reader) - 1}")
        return PIL.Image.fromarray(reader[int(number)].asnumpy())
    return open_image(spec, "frame")


def open_image(path: str, what: str = "image") -> PIL.Image.Image:
    """An image file as RGB; a missing or unreadable file is an error naming it as `what`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as exc:
        raise ValueError(f"{what} {path} is unreadable: {exc}") from None


def frames_pixels(frames: dict[int, str], width: int, height: int) -> dict[int, torch.Tensor]:
    """Each given frame as pixels `[3, H, W]` in [-1, 1]; a frame of another size than the video is refused."""
    pixels = {}
    for index, spec in sorted(frames.items()):
        image = read_frame(spec)
        if image.size != (width, height):
            raise ValueError(f"frames[{index}] {spec} is {image.width}x{image.height} but the video is "
                             f"{width}x{height}: give frames at the video's size")
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
        pixels[index] = array.permute(2, 0, 1)
    return pixels


@dataclass
class KnownFrames:
    """Latents that replace frames of the video at every step: `latents[:, indices] = x0 + sigma * noise`."""

    indices: torch.Tensor  # [k] frame indices within the latents denoised
    latents: torch.Tensor  # [B, k, C, h, w] clean latents (VAE factor applied)
    noise: torch.Tensor  # [B, k, C, h, w] the unit noise of those frames, the same at every step

    def impose(self, latents: torch.Tensor, sigma: torch.Tensor) -> None:
        """Replace the known frames of `latents` (in place) by their clean latents noised to `sigma`."""
        latents[:, self.indices] = (self.latents + self.noise * sigma).to(latents.dtype)

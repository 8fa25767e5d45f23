"""The main job on embedded defaults, as far as the project goes today.

Writes a tiny random SVD checkpoint (the real on-disk format), loads it with the real loader, extends the UNet with
ExVideo, denoises a latent video longer than SVD's 25 frames with diffusers' own SVD pipeline, post-tunes a few
steps on that video as a cached latent clip, and saves the adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from exvideo import (
    LatentBatch, added_time_ids, extend_unet, freeze_for_post_tuning, load_svd, post_tuning_loss, save_adapter,
    write_tiny_svd,
)
from orchestration.config import StageConfig


class DemoConfig(StageConfig):
    """What the demo makes: sizes are tiny so it runs on a laptop CPU in seconds."""

    workdir: Path = Path("runs/demo")
    num_frames: int = Field(32, ge=2, le=128)
    table_frames: int = Field(128, ge=2)
    height: int = Field(64, ge=64, multiple_of=64)
    width: int = Field(64, ge=64, multiple_of=64)
    steps: int = Field(3, ge=1)
    train_steps: int = Field(3, ge=0)
    seed: int = 0


def _first_frame(cfg: DemoConfig) -> Image.Image:
    """A smooth colour gradient with a square: something a person can recognise in a contact sheet."""
    y, x = np.mgrid[0:cfg.height, 0:cfg.width]
    rgb = np.stack([x / cfg.width, y / cfg.height, 0.5 + 0 * x], axis=-1)
    rgb[cfg.height // 4: cfg.height // 2, cfg.width // 4: cfg.width // 2] = (1.0, 0.2, 0.2)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; return what it made (paths and numbers) and print a summary."""
    if cfg.num_frames > cfg.table_frames:
        raise ValueError(f"num_frames {cfg.num_frames} exceeds table_frames {cfg.table_frames}")
    model_dir = cfg.workdir / "tiny-svd"
    if not model_dir.exists():
        write_tiny_svd(model_dir, seed=cfg.seed)
        print(f"wrote a tiny random SVD checkpoint (diffusers format) to {model_dir}")
    svd = load_svd(model_dir)
    extend_unet(svd.unet, num_frames=cfg.table_frames)
    print(f"extended the UNet with ExVideo: {cfg.table_frames}-frame position tables, identity 3D convolutions")

    image = _first_frame(cfg)
    start = time.perf_counter()
    latents = svd.pipeline()(
        image, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
        num_inference_steps=cfg.steps, fps=30, motion_bucket_id=127, noise_aug_strength=0.02,
        min_guidance_scale=2.0, max_guidance_scale=2.0, output_type="latent",
        generator=torch.Generator().manual_seed(cfg.seed),
    ).frames
    generate_s = time.perf_counter() - start
    print(f"denoised a {cfg.num_frames}-frame latent video in {cfg.steps} steps: shape {tuple(latents.shape)}, "
          f"mean {latents.mean():.3f}, std {latents.std():.3f}, {generate_s:.1f} s")

    # Post-tune on the generated clip as if it were a cached training clip conditioned on the same first frame.
    trainable = freeze_for_post_tuning(svd.unet)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        cond_latent = svd.vae.encode(pixels).latent_dist.mode()
        clip_input = svd.feature_extractor(images=image, return_tensors="pt").pixel_values
        image_embeds = svd.image_encoder(clip_input).image_embeds[:, None]
    batch = LatentBatch(latents.detach(), cond_latent, image_embeds, added_time_ids(30, 127))
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.train_steps):
        optimizer.zero_grad()
        loss = post_tuning_loss(svd.unet, batch, generator=generator)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    adapter = save_adapter(svd.unet, cfg.workdir / "adapter.safetensors", base_model=str(model_dir))
    print(f"post-tuned {len(trainable)} tensors ({sum(p.numel() for p in trainable.values()):,} parameters) for "
          f"{cfg.train_steps} steps, losses {[round(v, 4) for v in losses]}; adapter saved to {adapter}")
    return {"latent_shape": tuple(latents.shape), "losses": losses, "adapter": adapter, "model_dir": model_dir}

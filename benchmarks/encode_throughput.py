"""VAE + CLIP encode throughput at 512x512 with the full-size SVD encoder shapes (random weights): ClipEncoder's work.

Builds SVD's `AutoencoderKLTemporalDecoder` (SVD-XT's vae/config.json) and a CLIP ViT-H/14 vision tower with
random weights, saves them as a diffusers-format checkpoint, loads them through `preprocessing.encode.ClipEncoder`
(the class the actor pool runs) and times `encode_pixels` on clips of `--frames` frames at 512x512.
Meant for a GPU (bf16 by default there); on CPU use few frames.

    python benchmarks/encode_throughput.py [--frames 128] [--chunk 16] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from preprocessing.config import PreprocessConfig
from preprocessing.encode import ClipEncoder

# The class defaults are a one-level toy; these are SVD-XT's vae/config.json fields.
SVD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               layers_per_block=2, latent_channels=4, sample_size=768, scaling_factor=0.18215)
# CLIP ViT-H/14 as SVD ships it (image_encoder/config.json of stable-video-diffusion-img2vid-xt).
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")


def write_full_size_encoders(folder: Path) -> Path:
    AutoencoderKLTemporalDecoder(**SVD_VAE).save_pretrained(folder / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}).save_pretrained(folder / "feature_extractor")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16, help="frames per VAE call (vae_chunk_frames)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = write_full_size_encoders(Path(folder))
        cfg = PreprocessConfig(input="-", output="-", model=model, num_frames=args.frames, height=512, width=512,
                               vae_chunk_frames=args.chunk, encode_dtype=args.dtype)
        encoder = ClipEncoder(cfg, args.device, "bench", "bench")
    frames = np.random.default_rng(0).integers(0, 256, size=(args.frames, 512, 512, 3), dtype=np.uint8)
    encoder.encode_pixels(frames)  # warm-up: kernels, allocator
    seconds = []
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        latents, cond, embeds = encoder.encode_pixels(frames)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": str(encoder.dtype),
              "frames": args.frames, "chunk": args.chunk, "seconds_per_clip_best": round(min(seconds), 3),
              "clips_per_second": round(1 / min(seconds), 3), "latents": list(latents.shape),
              "image_embeds": list(embeds.shape)}
    if args.device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

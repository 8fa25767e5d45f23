"""Time one long video end to end with full-size SVD-XT shapes and random weights (needs a GPU).

    python benchmarks/generate_long_video.py                 # 128 frames, 512x512, 50 guided steps, bf16
    python benchmarks/generate_long_video.py --tiny          # the same code path on the tiny CPU model (a smoke run)

Prints seconds per guided UNet step, denoise / decode seconds and peak GPU memory, to compare with DESIGN.md's
reference figure (1.81 s per guided step, about 91 s of UNet time for 50 steps, one H100, bf16).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from exvideo import extend_unet, tiny_svd_components
from pipelines.generate import GenerationParams, LongVideoPipeline


def full_size_pipeline(device: torch.device, dtype: torch.dtype) -> LongVideoPipeline:
    """SVD-XT's architecture (UNet, temporal VAE, CLIP ViT-H/14) with random weights, built on the device."""
    scheduler = tiny_svd_components().scheduler  # the SVD-XT scheduler configuration
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel()  # diffusers' defaults are the SVD(-XT) UNet
        vae = AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu"))
    extend_unet(unet, num_frames=128)
    pipeline = LongVideoPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                                 feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))
    return pipeline.to(device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (checks the script)")
    args = parser.parse_args()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        svd = tiny_svd_components()
        extend_unet(svd.unet, num_frames=128)
        pipeline = LongVideoPipeline(vae=svd.vae, image_encoder=svd.image_encoder, unet=svd.unet,
                                     scheduler=svd.scheduler, feature_extractor=svd.feature_extractor)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --tiny to check the script on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        pipeline = full_size_pipeline(device, dtype)
    params = GenerationParams(num_frames=args.frames, height=args.size, width=args.size, steps=args.steps)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    # Warm-up: kernels and allocator, not counted.
    pipeline.generate(image, params.model_copy(update={"steps": 1, "num_frames": min(args.frames, 8)}))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    video = pipeline.generate(image, params)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "frames": video.frames.shape[0],
        "size": args.size, "steps": args.steps, "guided": params.guided,
        "s_per_guided_step": round(video.timings["denoise_s"] / args.steps, 3),
        "denoise_s": round(video.timings["denoise_s"], 1), "decode_s": round(video.timings["decode_s"], 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
        "reference_s_per_guided_step": 1.81,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Training-step speed and memory of the project's training path, with an in-run baseline.

    python benchmarks/train_throughput.py                       # tiny model, CPU: clips/s
    python benchmarks/train_throughput.py --full-size --frames 128 --size 512   # SVD-XT shapes, random weights, GPU

Each variant runs the same code as a training worker (`prepare_unet`, `post_tuning_loss`, AdamW, clipping):
    exvideo       temporal blocks checkpointed too (this project's default)
    diffusers-ckpt  diffusers' own checkpointing behaviour: spatial blocks only (temporal steps keep activations)
    no-ckpt       no activation checkpointing
Prints one table (median step time, clips/s, peak GPU memory) and writes JSON next to it with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from diffusers import UNetSpatioTemporalConditionModel

from exvideo import LatentBatch, added_time_ids, post_tuning_loss, tiny_svd_components
from exvideo.unet import ExVideoTransformerSpatioTemporalModel, spatio_temporal_transformers
from pipelines.train.loop import prepare_unet

VARIANTS = ("exvideo", "diffusers-ckpt", "no-ckpt")


def base_unet(full_size: bool, device: torch.device) -> torch.nn.Module:
    if full_size:
        with torch.device(device):
            return UNetSpatioTemporalConditionModel()  # diffusers' defaults are SVD-XT's UNet
    return tiny_svd_components().unet


def spatial_only_checkpointing(unet: torch.nn.Module) -> None:
    """Make the extended transformers checkpoint like diffusers does: the spatial block only."""
    for transformer in spatio_temporal_transformers(unet).values():
        assert isinstance(transformer, ExVideoTransformerSpatioTemporalModel)
        transformer.checkpoint_temporal_step = False


def measure(variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    unet = base_unet(args.full_size, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    trainable = prepare_unet(unet, args.frames, precision, variant != "no-ckpt", device)
    if variant == "diffusers-ckpt":
        spatial_only_checkpointing(unet)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-5)
    latent = args.size // 8
    embed_dim = unet.config.cross_attention_dim
    batch = LatentBatch(
        latents=torch.randn(1, args.frames, 4, latent, latent), cond_latent=torch.randn(1, 4, latent, latent),
        image_embeds=torch.randn(1, 1, embed_dim), added_time_ids=added_time_ids(30, 127),
    ).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
    except torch.OutOfMemoryError:
        return {"variant": variant, "error": "out of memory"}
    median = statistics.median(times)
    result = {"variant": variant, "step_s": median, "clips_per_s": 1 / median}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="SVD-XT shapes with random weights (GPU)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="pixel height = width of the clip")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    rows = [measure(v, args, device) for v in args.variants]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(f"training step, {'SVD-XT' if args.full_size else 'tiny'} UNet, {args.frames} frames at {args.size}x{args.size}, "
          f"batch 1, {hardware}, {when}")
    print("| variant | median step (s) | clips/s | peak GPU memory (GiB) |\n|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | {row['error']} | | |")
        else:
            print(f"| {row['variant']} | {row['step_s']:.3f} | {row['clips_per_s']:.2f} | {row.get('peak_gib', '-')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "hardware": hardware, "date": when, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

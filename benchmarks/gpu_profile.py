"""Where the GPU time of a guided UNet step, a training step and a whole video's VAE decode goes, by kernel kind.

    python benchmarks/gpu_profile.py --json gpu_profile.json           # SVD-XT shapes, random weights, one GPU
    python benchmarks/gpu_profile.py --tiny --frames 8 --size 64       # the same code on the tiny model, CPU

Each part runs the project's default `SpeedOptions` without compilation (or --options NAME=VALUE ..., e.g.
compile_blocks=true compile_static_shapes=true, or compile_decoder=true for the decode), one warm-up call, one timed
call, then one profiled call. Kernel time is grouped by name into matrix work (convolutions, matrix products,
attention), memory work (norms, layout copies, elementwise, inductor's fused kernels) and the rest, so the share of
time that runs at tensor-core rates is plain; the timed call shows how long the GPU sat idle between kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, replace

import numpy as np
import PIL.Image
import torch
from torch.profiler import ProfilerActivity, profile

from exvideo import SpeedOptions, post_tuning_loss, prepare_for_post_tuning
from exvideo.speed import apply_decoder_speed, speed_context
from gpu_bench import build_pipeline, build_unet, decode_inputs, fake_batch, speed_changes
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import guidance_ramp, guided_model_output
from pipelines.generate.params import GenerationParams

# First match wins; names are lower-cased kernel names (cuDNN, cuBLAS, PyTorch, inductor's Triton kernels; on the
# CPU operator names and inductor's C++ kernels). Inductor names a kernel after the operators it fused, so its
# kernels are told apart by prefix first.
KINDS = (
    ("fused reduction (inductor)", ("triton_red", "triton_per")),
    ("fused pointwise (inductor)", ("triton_poi",)),
    ("fused other (inductor)", ("triton_", "cpp_fused")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("layout copy", ("nchwtonhwc", "nhwctonchw", "transpose", "copy_", "cat", "permute")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
    ("matrix product", ("gemm", "cutlass", "nvjet", "addmm", "_mm", "::mm", "matmul", "linear")),
    ("norm", ("norm", "welford", "moments")),
    ("elementwise", ("elementwise", "vectorized", "gelu", "silu", "mul", "add", "triton")),
    ("reduction", ("reduce",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, words in KINDS:
        if any(word in lowered for word in words):
            return kind
    return "other"


def synchronized_ms(run, device: torch.device) -> float:
    """Wall time of one call of `run`, device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def kernel_times(run, device: torch.device) -> dict:
    """Time one call of `run`, then profile another: device time per kernel kind and the 25 most expensive kernels,
    in ms. `idle_ms`, the call's wall time minus its kernels' time, is where the GPU waited (launches, host work,
    synchronisation); negative when kernels overlap."""
    step_ms = synchronized_ms(run, device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_kernel = defaultdict(float)
    for event in prof.events():
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3
        elif device.type != "cuda":  # self time, so operators calling others are not counted twice
            per_kernel[event.name] += event.self_cpu_time_total / 1e3
    by_kind = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kernel_kind(name)] += ms
    total = sum(by_kind.values())
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:25]
    return {"total_ms": round(total, 1), "step_ms": round(step_ms, 1), "idle_ms": round(step_ms - total, 1),
            "by_kind": {kind: {"ms": round(ms, 1), "share": round(ms / total, 3)}
                        for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])},
            "top_kernels": [{"name": name[:160], "ms": round(ms, 2), "kind": kernel_kind(name)} for name, ms in top]}


def profile_guided_step(args, options: SpeedOptions, device: torch.device) -> dict:
    pipeline = build_pipeline(args.tiny, args.frames, device)
    pipeline.set_speed(options)
    params = GenerationParams(num_frames=args.frames, height=args.size, width=args.size)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    generator = torch.Generator().manual_seed(0)
    cond = pipeline.encode_condition(image, params, generator)
    latent = args.size // pipeline.vae_scale_factor
    latents = torch.randn(1, args.frames, 4, latent, latent, generator=generator).to(device, pipeline.unet.dtype)
    ramp = guidance_ramp(params.min_guidance, params.max_guidance, args.frames)

    def step() -> None:
        guided_model_output(pipeline.unet, latents, torch.tensor(1.0, device=device), cond, ramp,
                            options.batched_guidance)

    with torch.no_grad(), speed_context(options):
        step()
        result = kernel_times(step, device)
    return result


def profile_training_step(args, options: SpeedOptions, device: torch.device) -> dict:
    unet = build_unet(args.tiny, device)
    cuda = device.type == "cuda"
    trainable = prepare_for_post_tuning(unet, args.frames, "bf16" if cuda else "fp32", True, device, options)
    batch = fake_batch(unet, args.frames, args.size // 8, device)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-6, fused=cuda)

    def step() -> None:
        with speed_context(options):
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(0))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    result = kernel_times(step, device)
    return result


def profile_decode(args, options: SpeedOptions, device: torch.device) -> dict:
    vae, latents = decode_inputs(args.tiny, args.frames, args.size, device)
    apply_decoder_speed(vae, options)
    params = GenerationParams()

    def decode() -> None:
        with speed_context(options):
            decode_video(vae, latents, params.decode_window, params.decode_stride)

    decode()
    return kernel_times(decode, device)


def parse_options(pairs: list[str]) -> SpeedOptions:
    """NAME=VALUE pairs over the default eager options (values as JSON, or bare strings)."""
    return replace(SpeedOptions(), **{"compile_blocks": False, **speed_changes(pairs)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (runs on the CPU)")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--options", nargs="*", default=[], help="NAME=VALUE over the default SpeedOptions")
    parser.add_argument("--parts", nargs="+", default=["step", "train"], choices=["step", "train", "decode"])
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("full size needs a GPU: run with --tiny --frames 8 --size 64 to check the script on the CPU")
    options = parse_options(args.options)
    report = {"hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "frames": args.frames, "size": args.size, "options": asdict(options)}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)

    for part, run in (("step", profile_guided_step), ("train", profile_training_step), ("decode", profile_decode)):
        if part in args.parts:
            torch.manual_seed(0)
            report[part] = run(args, options, device)
            row = report[part]
            print(f"\n[{part}] {row['total_ms']} ms of kernels in a {row['step_ms']} ms call; by kind:", flush=True)
            for kind, row in report[part]["by_kind"].items():
                print(f"  {kind:15s} {row['ms']:9.1f} ms  {row['share']:.1%}")
            for kernel in report[part]["top_kernels"][:12]:
                print(f"  {kernel['ms']:9.2f} ms  {kernel['kind']:14s} {kernel['name'][:110]}")
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

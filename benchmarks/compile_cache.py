"""First-call time of a UNet with compiled blocks (`speed.compile_blocks`), with a cold and then a warm cache.

    python benchmarks/compile_cache.py --tiny --frames 8 --size 64      # tiny UNet, CPU
    python benchmarks/compile_cache.py --part train                     # SVD-XT shapes, 128 frames, one GPU

Each call runs in a fresh process, since only the on-disk cache carries over between processes, as between Ray
workers. Every process points TORCHINDUCTOR_CACHE_DIR at the same new directory: the first fills it, and the
second is a worker that starts after it on a shared cache. Both report the first call (compilation plus one step)
and the second (one step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from exvideo import SpeedOptions, extend_unet, post_tuning_loss, prepare_for_post_tuning
from exvideo.speed import apply_speed
from gpu_bench import Clock, build_unet, fake_batch

COMPILED = SpeedOptions(compile_blocks=True)


def guided_call(args, device: torch.device):
    """A no-grad UNet call on both guidance branches, as the pipeline makes it."""
    unet = extend_unet(build_unet(args.tiny, device), args.frames).requires_grad_(False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet.to(dtype)
    apply_speed(unet, COMPILED)
    latent = args.size // 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, args.frames, 2 * unet.config.out_channels, latent, latent, generator=generator)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator)
    inputs = {"sample": sample.to(device, dtype), "timestep": torch.tensor(1.0, device=device),
              "encoder_hidden_states": context.to(device, dtype),
              "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype)}

    def call() -> None:
        with torch.no_grad():
            unet(**inputs, return_dict=False)

    return call


def training_call(args, device: torch.device):
    """Forward and backward of the training step under lean checkpointing."""
    unet = build_unet(args.tiny, device)
    cuda = device.type == "cuda"
    prepare_for_post_tuning(unet, args.frames, "bf16" if cuda else "fp32", True, device, COMPILED)
    batch = fake_batch(unet, args.frames, args.size // 8, device)

    def call() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(0))
        loss.backward()

    return call


def child(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    call = (training_call if args.part == "train" else guided_call)(args, device)
    clock, times = Clock(device), []
    for _ in range(2):
        start = clock.now()
        call()
        times.append(round(clock.now() - start, 1))
    print(json.dumps({"first_call_s": times[0], "second_call_s": times[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (runs on the CPU)")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--part", choices=["generate", "train"], default="generate")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("full size needs a GPU: run with --tiny --frames 8 --size 64 to check the script on the CPU")
    command = [sys.executable, __file__, "--child", "--frames", str(args.frames), "--size", str(args.size),
               "--part", args.part] + (["--tiny"] if args.tiny else [])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("cold cache", "warm cache"):
            started = time.perf_counter()
            done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
            rows[name] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                          "process_s": round(time.perf_counter() - started, 1)}
            print(f"{name}: {rows[name]}", flush=True)
    print(json.dumps({"part": args.part, "frames": args.frames, "size": args.size, "tiny": args.tiny,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **rows}))


if __name__ == "__main__":
    main()

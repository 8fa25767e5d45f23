"""Speed and memory of the project's training and generation paths at 128 frames, each switch on and off.

    python benchmarks/gpu_bench.py --json gpu_bench.json          # SVD-XT shapes, random weights, one GPU
    python benchmarks/gpu_bench.py --tiny --frames 16 --size 64   # the same code on the tiny model, CPU (smoke run)

One run measures, with the same weights throughout:
  (a) the training step (forward, backward, clipping, AdamW) of `prepare_for_post_tuning` + `post_tuning_loss`:
      median time, peak memory, model FLOPs and the fraction of the card's bf16 peak measured in the same run;
  (b) one guided UNet step of `LongVideoPipeline` and a whole video (`generate`: CLIP + VAE encode, all steps,
      windowed VAE decode): time and peak memory;
  (c) the plain path (`SpeedOptions.plain()`) as the in-run baseline, and each switch added one at a time;
  (d) with --parts decode, the whole video's windowed VAE decode alone: eager, with cuDNN autotuning, with
      parallel group-norm statistics (speed.parallel_group_norm) and a channels-last decoder, and with compiled blocks
      (speed.compile_decoder) per --compile-modes and --compile-shapes;
  (e) with --parts memory, the training step per `TrainConfig.memory` mode (default, low, lowest) on a fresh UNet
      with the eager speed defaults: time and peak memory (the 24 GiB goal).
Prints one table per part and writes everything to --json after every measurement, so a run cut short keeps what
it measured. Model FLOPs are counted once on fake tensors (no recomputation, no guidance duplication counted twice).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count
from torch.utils.flop_counter import sdpa_flop_count
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from exvideo import (
    LatentBatch, SpeedOptions, added_time_ids, extend_unet, freeze_for_post_tuning, post_tuning_loss,
    prepare_for_post_tuning, tiny_svd_components,
)
from encode_throughput import SVD_VAE, VIT_H
from exvideo.speed import apply_decoder_speed, apply_speed, enable_checkpointing, speed_context
from pipelines.generate.decode import decode_video
from pipelines.generate.guidance import guidance_ramp, guided_model_output
from pipelines.generate.params import GenerationParams
from pipelines.generate.pipeline import LongVideoPipeline
from pipelines.train.offload import HostAdamW, saved_activations

PLAIN = SpeedOptions.plain()
MEMORY_MODES = ("default", "low", "lowest")  # TrainConfig.memory, in the order they can run on one UNet


def speed_changes(pairs: list[str]) -> dict:
    """`SpeedOptions` fields from NAME=VALUE pairs (values as JSON, or bare strings)."""
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value
    return changes


def one_switch_at_a_time(changes: list[tuple[str, dict]], alternatives: dict[str, dict]) -> dict[str, SpeedOptions]:
    """The plain path, then each change added to the previous one, then each alternative on top of them all."""
    variants, options = {"plain": PLAIN}, PLAIN
    for name, change in changes:
        options = replace(options, **change)
        variants[name] = options
    for name, change in alternatives.items():
        variants[name] = replace(options, **change)
    return variants


# Compilation is measured last, on the fastest eager variant, because it cannot be undone on a module.
TRAIN_VARIANTS = one_switch_at_a_time(
    [("+channels-last conv", {"conv_layout": "channels_last"}), ("+lean checkpointing", {"checkpointing": "lean"}),
     ("+one-key cross-attention", {"one_key_cross_attention": True})],
    {"+cudnn autotune": {"cudnn_autotune": True}, "+selective checkpointing": {"checkpointing": "selective"},
     "+cudnn attention": {"attention": "cudnn"}},
)
STEP_VARIANTS = one_switch_at_a_time(
    [("+batched guidance", {"batched_guidance": True}), ("+channels-last conv", {"conv_layout": "channels_last"}),
     ("+one-key cross-attention", {"one_key_cross_attention": True})],
    {"+cudnn autotune": {"cudnn_autotune": True}, "+flash attention": {"attention": "flash"},
     "+cudnn attention": {"attention": "cudnn"}, "+parallel group norm": {"parallel_group_norm": True},
     "+parallel group norm, channels-last UNet": {"parallel_group_norm": True, "unet_channels_last": True}},
)


class Clock:
    """Wall time of device work: synchronises before reading the host clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measured_peak_tflops(device: torch.device) -> float | None:
    """bf16 matrix-product rate of this card, measured now: the denominator of the utilisation figures."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    clock, times = Clock(device), []
    for i in range(13):
        start = clock.now()
        a @ b
        if i >= 3:
            times.append(clock.now() - start)
    return round(2 * 8192**3 / statistics.median(times) / 1e12, 1)


def register_cpu_attention_flops() -> None:
    """FlopCounterMode counts the CUDA attention kernels; add the CPU one that fake tensors dispatch to."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:  # keyed by overload packet
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def model_tflops(config: dict, frames: int, latent: int) -> dict[str, float]:
    """Model FLOPs (TFLOP) of one training step and one guided UNet step, counted on fake tensors."""
    register_cpu_attention_flops()
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = UNetSpatioTemporalConditionModel.from_config(config)
        extend_unet(unet, frames)
        freeze_for_post_tuning(unet)
        batch = fake_batch(unet, frames, latent, torch.device("cpu"))
        train = FlopCounterMode(display=False)
        with train:
            post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(0)).backward()
        unet.requires_grad_(False)
        infer = FlopCounterMode(display=False)
        with infer:
            inputs = torch.randn(2, frames, 2 * unet.config.out_channels, latent, latent)
            unet(inputs, torch.ones(1), encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim),
                 added_time_ids=torch.randn(2, 3), return_dict=False)
    return {"train_step": train.get_total_flops() / 1e12, "guided_unet_step": infer.get_total_flops() / 1e12}


def cached_model_tflops(path: str | None, config: dict, frames: int, latent: int) -> dict[str, float]:
    """`model_tflops`, read from `path` when a run of the same shape wrote it there (counting takes a while)."""
    key = f"{config.get('block_out_channels')}-{frames}-{latent}"
    cache = {}
    if path and os.path.exists(path):
        with open(path) as handle:
            cache = json.load(handle)
    if key not in cache:
        cache[key] = model_tflops(config, frames, latent)
        if path:
            with open(path, "w") as handle:
                json.dump(cache, handle)
    return cache[key]


def fake_batch(unet: torch.nn.Module, frames: int, latent: int, device: torch.device) -> LatentBatch:
    """A clip of random latents with the shapes the training stage reads from shards."""
    return LatentBatch(
        latents=torch.randn(1, frames, 4, latent, latent), cond_latent=torch.randn(1, 4, latent, latent),
        image_embeds=torch.randn(1, 1, unet.config.cross_attention_dim), added_time_ids=added_time_ids(30, 127),
    ).to(device)


def build_unet(tiny: bool, device: torch.device) -> UNetSpatioTemporalConditionModel:
    if tiny:
        return tiny_svd_components().unet.to(device)
    with torch.device(device):
        return UNetSpatioTemporalConditionModel()  # diffusers' defaults are the SVD(-XT) UNet


def step_optimizer(trainable: dict, memory: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the training loop makes it in `TrainConfig.memory` mode `memory`, with a zero learning rate: it keeps
    the weights, so every variant's steps see the same model and their first losses and gradient norms must agree to
    bf16 rounding. Low modes cast the trainable set to its working precision in place."""
    if memory == "default":
        return torch.optim.AdamW(trainable.values(), lr=0.0, fused=device.type == "cuda")
    working = torch.bfloat16 if device.type == "cuda" else torch.float32
    return HostAdamW(trainable.values(), working, lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)


def time_training(unet, trainable, options: SpeedOptions, batch: LatentBatch, args, device,
                  memory: str = "default") -> dict:
    """Median step time and peak memory of the training step with `options` switched on `unet`, in
    `TrainConfig.memory` mode `memory`."""
    enable_checkpointing(unet, options.checkpointing)
    apply_speed(unet, options)
    for param in trainable.values():
        param.grad = None
    reset_memory(device)
    clock, times, first = Clock(device), [], {}
    optimizer = step_optimizer(trainable, memory, device)
    try:
        for step in range(args.warmup + args.steps):
            start = clock.now()
            with speed_context(options):
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"), \
                        saved_activations(memory, device):
                    loss = post_tuning_loss(unet, batch, generator=torch.Generator().manual_seed(step))
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = clock.now() - start
            if step == 0:
                first = {"first_call_s": round(elapsed, 1), "first_loss": round(float(loss), 6),
                         "first_grad_norm": round(float(grad_norm), 6)}
            if step >= args.warmup:
                times.append(elapsed)
    except torch.OutOfMemoryError:
        return {"error": "out of memory", "peak_gib": peak_gib(device)}
    finally:
        del optimizer
    return {"step_s": round(statistics.median(times), 3), "peak_gib": peak_gib(device), **first}


def full_size_pipeline(device: torch.device) -> LongVideoPipeline:
    """SVD-XT's architecture (UNet, temporal VAE, CLIP ViT-H/14) with random weights, built on the device."""
    scheduler = tiny_svd_components().scheduler  # the SVD-XT scheduler configuration
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel()
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    return LongVideoPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                             feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))


def build_pipeline(tiny: bool, frames: int, device: torch.device, dtype: torch.dtype | None = None
                   ) -> LongVideoPipeline:
    """The pipeline with an extended, frozen UNet, in `dtype` (default: bf16 on a GPU, float32 on the CPU)."""
    if tiny:
        svd = tiny_svd_components()
        pipeline = LongVideoPipeline(vae=svd.vae, image_encoder=svd.image_encoder, unet=svd.unet,
                                     scheduler=svd.scheduler, feature_extractor=svd.feature_extractor)
    else:
        pipeline = full_size_pipeline(device)
    extend_unet(pipeline.unet, frames)
    pipeline.unet.requires_grad_(False)
    return pipeline.to(device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))


def time_unet_step(pipeline: LongVideoPipeline, options: SpeedOptions, image: PIL.Image.Image,
                   params: GenerationParams, args, device, outputs: list[torch.Tensor]) -> dict:
    """Median time and peak memory of one guided UNet step of the pipeline with `options`.

    Every variant gets the same inputs; the first variant's output is kept in `outputs` and the others report their
    relative difference to it (bf16 rounding: about 1e-2 between eager variants).
    """
    pipeline.set_speed(options)
    generator = torch.Generator().manual_seed(0)
    cond = pipeline.encode_condition(image, params, generator)
    latent = params.height // pipeline.vae_scale_factor
    latents = torch.randn(1, params.num_frames, 4, latent, latent, generator=generator).to(device, pipeline.unet.dtype)
    ramp = guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames)
    timestep = torch.tensor(1.0, device=device)
    reset_memory(device)
    clock, times = Clock(device), []
    compile_s = None
    with torch.no_grad(), speed_context(options):
        for step in range(args.warmup + args.steps):
            start = clock.now()
            output = guided_model_output(pipeline.unet, latents, timestep, cond, ramp, options.batched_guidance)
            elapsed = clock.now() - start
            if step == 0:
                compile_s = round(elapsed, 1)
            if step >= args.warmup:
                times.append(elapsed)
    if not outputs:
        outputs.append(output.float())
    difference = float((output.float() - outputs[0]).norm() / outputs[0].norm())
    return {"step_s": round(statistics.median(times), 3), "peak_gib": peak_gib(device), "first_call_s": compile_s,
            "difference_to_first": round(difference, 5)}


def time_video(pipeline: LongVideoPipeline, options: SpeedOptions, image: PIL.Image.Image, params: GenerationParams,
               device, decode_changes: dict | None = None) -> dict:
    """Wall time and peak memory of one whole video (`generate`) with `options`, its VAE decode with
    `decode_changes` over them (the UNet keeps `options`, so its compiled blocks are not recompiled)."""
    pipeline.set_speed(options)
    if decode_changes:
        apply_decoder_speed(pipeline.vae, replace(options, **decode_changes))
    reset_memory(device)
    clock = Clock(device)
    start = clock.now()
    video = pipeline.generate(image, params)
    total = clock.now() - start
    return {"video_s": round(total, 1), "denoise_s": round(video.timings["denoise_s"], 1),
            "decode_s": round(video.timings["decode_s"], 1), "peak_gib": peak_gib(device),
            "frames": int(video.frames.shape[0])}


class Report:
    """Results so far, rewritten to --json after every measurement."""

    def __init__(self, path: str | None, header: dict):
        self.path = path
        self.data = {**header, "train": {}, "unet_step": {}, "video": {}, "decode": {}, "memory": {}}

    def add(self, part: str, name: str, row: dict) -> None:
        self.data[part][name] = row
        print(f"[{part}] {name}: {row}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            with open(self.path, "w") as handle:
                json.dump(self.data, handle, indent=1)


def with_utilisation(row: dict, model_tflop: float, peak: float | None) -> dict:
    """Add achieved model TFLOP/s and the fraction of the measured peak to a timed row."""
    if "step_s" in row:
        achieved = model_tflop / row["step_s"]
        row.update(model_tflops_per_s=round(achieved, 1), mfu=round(achieved / peak, 3) if peak else None)
    return row


def measure_variants(report: Report, part: str, variants: dict[str, SpeedOptions], selection: list[str] | None,
                     measure, model_tflop: float, peak: float | None, device: torch.device) -> None:
    """Time each selected variant with `measure(options)`; a variant that fails is recorded and skipped."""
    for name, options in variants.items():
        if selection and name not in selection:
            continue
        if device.type != "cuda" and options.attention in ("flash", "cudnn"):
            continue
        try:
            row = measure(options)
        except RuntimeError as exc:  # e.g. an attention backend that refuses these shapes on this card
            row = {"error": str(exc)[:300]}
        report.add(part, name, {"options": asdict(options), **with_utilisation(row, model_tflop, peak)})


def fastest(rows: dict[str, dict], allowed=lambda options: True) -> tuple[str, SpeedOptions]:
    """Name and options of the fastest measured eager row whose options pass `allowed`."""
    eager = {name: row for name, row in rows.items()
             if "step_s" in row and not row["options"]["compile_blocks"] and allowed(SpeedOptions(**row["options"]))}
    name = min(eager, key=lambda name: eager[name]["step_s"])
    return name, SpeedOptions(**eager[name]["options"])


def compile_settings(modes: list[str], shapes: list[str]) -> list[tuple[str, str, bool]]:
    """(label suffix, torch.compile mode, static shapes) for each requested mode and shape setting, in order."""
    settings = []
    for mode, shape in itertools.product(modes, shapes):
        notes = [note for note in (mode if mode != "default" else "", "static shapes" if shape == "static" else "")
                 if note]
        settings.append((f" ({', '.join(notes)})" if notes else "", mode, shape == "static"))
    return settings


def compiled_variants(name: str, options: SpeedOptions, modes: list[str], shapes: list[str], scopes: list[str]
                      ) -> dict[str, SpeedOptions]:
    """`options` compiled once per torch.compile mode, shape setting and compile scope, in order (each recompiles,
    except that blocks compiled once stay compiled when the steps around them compile too)."""
    return {f"{name} +compiled {scope}{suffix}": replace(options, compile_blocks=True, compile_mode=mode,
                                                         compile_static_shapes=static, compile_scope=scope)
            for suffix, mode, static in compile_settings(modes, shapes) for scope in scopes}


def compile_allowed(args, started: float) -> bool:
    if args.skip_compile or time.perf_counter() - started > args.budget_s:
        print("compiled variants skipped (--skip-compile or over --budget-s)", flush=True)
        return False
    return True


def run_training(report: Report, args, device, flops: dict, peak: float | None, started: float) -> None:
    unet = build_unet(args.tiny, device)
    trainable = prepare_for_post_tuning(unet, args.frames, "bf16" if device.type == "cuda" else "fp32", True, device,
                                        PLAIN)
    batch = fake_batch(unet, args.frames, args.size // 8, device)

    def measure(options: SpeedOptions) -> dict:
        return time_training(unet, trainable, options, batch, args, device)

    measure_variants(report, "train", TRAIN_VARIANTS, args.train_variants, measure, flops["train_step"], peak, device)
    if not compile_allowed(args, started):
        return
    # Selective checkpointing's policy cannot see inside compiled blocks: compile the fastest of the others.
    best_name, best = fastest(report.data["train"], lambda options: options.checkpointing != "selective")
    compiled = compiled_variants(best_name, best, args.compile_modes, args.compile_shapes, args.compile_scopes)
    measure_variants(report, "train", compiled, None, measure, flops["train_step"], peak, device)


def run_memory_modes(report: Report, args, device, flops: dict, peak: float | None) -> None:
    """The training step in each `TrainConfig.memory` mode, in order (the low modes cast the trainable set to bf16
    in place), on a fresh UNet with the eager speed defaults: compiling again per mode would take minutes each."""
    unet = build_unet(args.tiny, device)
    options = replace(SpeedOptions(), compile_blocks=False)
    trainable = prepare_for_post_tuning(unet, args.frames, "bf16" if device.type == "cuda" else "fp32", True, device,
                                        options)
    batch = fake_batch(unet, args.frames, args.size // 8, device)
    for memory in [mode for mode in MEMORY_MODES if mode in args.memory_modes]:
        try:
            row = time_training(unet, trainable, options, batch, args, device, memory)
        except RuntimeError as exc:  # e.g. no page-locked host memory to spare
            row = {"error": str(exc)[:300]}
        report.add("memory", memory, {"options": asdict(options), **with_utilisation(row, flops["train_step"], peak)})


def run_generation(report: Report, args, device, flops: dict, peak: float | None, started: float) -> None:
    pipeline = build_pipeline(args.tiny, args.frames, device)
    pipeline.set_progress_bar_config(disable=True)
    params = GenerationParams(num_frames=args.frames, height=args.size, width=args.size, steps=args.video_steps)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    outputs: list[torch.Tensor] = []

    def measure(options: SpeedOptions) -> dict:
        return time_unet_step(pipeline, options, image, params, args, device, outputs)

    measure_variants(report, "unet_step", STEP_VARIANTS, args.step_variants, measure, flops["guided_unet_step"], peak,
                     device)
    best_name, best = fastest(report.data["unet_step"])
    decode = speed_changes(args.decode_options)
    suffix = f", decode with {' '.join(args.decode_options)}" if decode else ""
    if "plain" in args.videos:
        report.add("video", "plain", {"options": asdict(PLAIN), **time_video(pipeline, PLAIN, image, params, device)})
    if "best" in args.videos:
        report.add("video", f"best eager ({best_name}){suffix}", {
            "options": asdict(best), "decode_options": decode,
            **time_video(pipeline, best, image, params, device, decode)})
    if not compile_allowed(args, started):
        return
    compiled = compiled_variants(best_name, best, args.compile_modes, args.compile_shapes, args.compile_scopes)
    measure_variants(report, "unet_step", compiled, None, measure, flops["guided_unet_step"], peak, device)
    if "compiled" in args.videos:  # in the last mode compiled, which the blocks now hold
        name, options = list(compiled.items())[-1]
        report.add("video", name + suffix, {"options": asdict(options), "decode_options": decode,
                                            **time_video(pipeline, options, image, params, device, decode)})


def time_decode(vae: AutoencoderKLTemporalDecoder, latents: torch.Tensor, options: SpeedOptions, args, device,
                outputs: list[torch.Tensor]) -> dict:
    """Median time and peak memory of the generation path's windowed VAE decode of `latents` with `options` applied
    as the pipeline applies them; the first row's video is kept in `outputs` and later rows report their relative
    difference to it."""
    params = GenerationParams()
    apply_decoder_speed(vae, options)
    reset_memory(device)
    clock, times, first = Clock(device), [], None
    for repeat in range(args.warmup + args.steps):
        start = clock.now()
        with speed_context(options):
            video = decode_video(vae, latents, params.decode_window, params.decode_stride)
        elapsed = clock.now() - start
        first = first or round(elapsed, 1)
        if repeat >= args.warmup:
            times.append(elapsed)
    if not outputs:
        outputs.append(video)
    difference = float((video - outputs[0]).norm() / outputs[0].norm())
    return {"options": asdict(options), "decode_s": round(statistics.median(times), 3), "peak_gib": peak_gib(device),
            "first_call_s": first, "difference_to_first": round(difference, 5)}


def decode_inputs(tiny: bool, frames: int, size: int, device: torch.device
                  ) -> tuple[AutoencoderKLTemporalDecoder, torch.Tensor]:
    """A random VAE (SVD's, or the tiny one on the CPU; bf16 on a GPU) and seeded latents of a whole video."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = (tiny_svd_components().vae if tiny else AutoencoderKLTemporalDecoder(**SVD_VAE)).to(device, dtype)
    latent = size // 8
    latents = torch.randn(1, frames, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
    return vae, latents


def run_decode(report: Report, args, device, started: float) -> None:
    """The whole video's VAE decode alone: eager, eager with cuDNN autotuning (the decoder's convolutions run at
    shapes the UNet never has), eager with parallel group-norm statistics and with a channels-last decoder too, then
    the fastest of them with `speed.compile_decoder` once per compile mode and shape setting (each recompiles)."""
    vae, latents = decode_inputs(args.tiny, args.frames, args.size, device)
    outputs: list[torch.Tensor] = []
    eager = {"eager": SpeedOptions(compile_blocks=False),
             "eager, cuDNN autotune": SpeedOptions(compile_blocks=False, cudnn_autotune=True),
             "eager, parallel group norm": SpeedOptions(compile_blocks=False, parallel_group_norm=True),
             "eager, parallel group norm + channels-last decoder": SpeedOptions(
                 compile_blocks=False, parallel_group_norm=True, decoder_channels_last=True)}
    for name, options in eager.items():
        report.add("decode", name, time_decode(vae, latents, options, args, device, outputs))
    best = min(eager, key=lambda name: report.data["decode"][name]["decode_s"])
    for suffix, mode, static in compile_settings(args.compile_modes, args.compile_shapes):
        if not compile_allowed(args, started):
            return
        options = replace(eager[best], compile_decoder=True, compile_mode=mode, compile_static_shapes=static)
        report.add("decode", f"{best} + compiled decoder blocks{suffix}",
                   time_decode(vae, latents, options, args, device, outputs))


def print_tables(data: dict) -> None:
    flops = data["model_tflop"]
    print(f"\n{data['model']}, {data['frames']} frames at {data['size']}x{data['size']}, batch 1, {data['hardware']}, "
          f"{data['date']}; measured bf16 peak {data['peak_tflops']} TFLOP/s; model TFLOP per training step "
          f"{flops['train_step']:.1f}, per guided UNet step {flops['guided_unet_step']:.1f}")
    columns = ("step_s", "peak_gib", "model_tflops_per_s", "mfu", "first_call_s")
    for part, title in (("train", "training step"), ("memory", "training step, TrainConfig.memory (eager)")):
        print(f"\n| {title} | median s | peak GiB | model TFLOP/s | of peak |\n|---|---|---|---|---|")
        for name, row in data.get(part, {}).items():
            print(f"| {name} | " + " | ".join(str(row.get(c, row.get("error", ""))) for c in columns[:4]) + " |")
    print("\n| guided UNet step | median s | peak GiB | model TFLOP/s | of peak | first call s |\n"
          "|---|---|---|---|---|---|")
    for name, row in data["unet_step"].items():
        print(f"| {name} | " + " | ".join(str(row.get(c, row.get("error", ""))) for c in columns) + " |")
    print("\n| whole video | s | denoise s | decode s | peak GiB |\n|---|---|---|---|---|")
    for name, row in data["video"].items():
        print(f"| {name} | {row['video_s']} | {row['denoise_s']} | {row['decode_s']} | {row['peak_gib']} |")
    print("\n| VAE decode of the whole video | median s | peak GiB | first call s | difference to eager |\n"
          "|---|---|---|---|---|")
    for name, row in data.get("decode", {}).items():
        print(f"| {name} | {row['decode_s']} | {row['peak_gib']} | {row['first_call_s']} | "
              f"{row['difference_to_first']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (runs on the CPU)")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--size", type=int, default=512, help="pixel height = width")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--video-steps", type=int, default=50, help="sampler steps of the whole-video runs")
    parser.add_argument("--parts", nargs="+", default=["train", "generate"],
                        choices=["train", "generate", "decode", "memory"])
    parser.add_argument("--memory-modes", nargs="+", default=list(MEMORY_MODES), choices=MEMORY_MODES,
                        help="TrainConfig.memory modes of --parts memory")
    parser.add_argument("--train-variants", nargs="*", help=f"subset of: {', '.join(TRAIN_VARIANTS)}")
    parser.add_argument("--step-variants", nargs="*", help=f"subset of: {', '.join(STEP_VARIANTS)}")
    parser.add_argument("--videos", nargs="*", default=["plain", "best", "compiled"],
                        choices=["plain", "best", "compiled"], help="whole videos to time")
    parser.add_argument("--decode-options", nargs="*", default=[],
                        help="NAME=VALUE switches for the timed videos' VAE decode, e.g. parallel_group_norm=true "
                             "(the UNet keeps the options of the step it was timed with)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--compile-modes", nargs="+", default=["default"],
                        choices=["default", "max-autotune-no-cudagraphs"], help="a compiled row per torch.compile mode")
    parser.add_argument("--compile-shapes", nargs="+", default=["auto"], choices=["auto", "static"],
                        help="and per shape setting (speed.compile_static_shapes)")
    parser.add_argument("--compile-scopes", nargs="+", default=["blocks"], choices=["blocks", "steps"],
                        help="and per compile scope (speed.compile_scope)")
    parser.add_argument("--budget-s", type=float, default=420, help="skip compilation once the run is this old")
    parser.add_argument("--json", help="write the results here (after every measurement)")
    parser.add_argument("--flops-cache", help="JSON file that keeps the model FLOPs between runs of one shape")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("full size needs a GPU: run with --tiny --frames 16 --size 64 to check the script on the CPU")
    torch.manual_seed(0)
    config = (tiny_svd_components().unet if args.tiny else build_unet(False, torch.device("meta"))).config
    flops = cached_model_tflops(args.flops_cache, dict(config), args.frames, args.size // 8)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    report = Report(args.json, {
        "model": "tiny SVD UNet" if args.tiny else "SVD-XT (random weights)", "frames": args.frames, "size": args.size,
        "hardware": hardware, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
        "peak_tflops": measured_peak_tflops(device), "model_tflop": flops, "args": vars(args),
    })
    peak = report.data["peak_tflops"]
    if "train" in args.parts:
        run_training(report, args, device, flops, peak, started)
    if "generate" in args.parts:
        run_generation(report, args, device, flops, peak, started)
    if "decode" in args.parts:
        run_decode(report, args, device, started)
    if "memory" in args.parts:
        run_memory_modes(report, args, device, flops, peak)
    report.data["wall_s"] = round(time.perf_counter() - started, 1)
    report.save()
    print_tables(report.data)


if __name__ == "__main__":
    main()

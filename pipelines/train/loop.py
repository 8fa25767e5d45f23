"""The per-worker training recipe, run by Ray Train on every worker. Reads top to bottom:

model -> resume -> data stream -> steps (loss, backward, clip, skip non-finite, AdamW) -> log -> checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from exvideo import LatentBatch, load_unet, post_tuning_loss, prepare_for_post_tuning
from exvideo.adapter import write_adapter
from exvideo.console import quiet_worker, verbose
from exvideo.motion_models import load_motion_unet, load_scheduler
from exvideo.motion_objective import TextLatentBatch, noise_prediction_loss
from exvideo.ray_setup import node_id
from exvideo.samples import collate
from exvideo.speed import speed_context
from pipelines.train.config import TrainConfig
from pipelines.train.data import StreamStats, list_shards, rank_stream
from pipelines.train.offload import HostAdamW, saved_activations
from pipelines.train.state import EMA, TrainState, checkpoint_metadata, load_checkpoint, save_checkpoint

BEST_ADAPTER = "best_adapter.safetensors"
REPLICA_FILE = "replica-{rank}.json"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


Objective = Callable[[nn.Module, LatentBatch | TextLatentBatch, torch.Generator], torch.Tensor]


def build_unet(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, dict[str, nn.Parameter], Objective]:
    """The run's base UNet from disk, prepared for post-tuning, and its family's training loss."""
    if cfg.model_family == "animatediff":
        unet, scheduler = load_motion_unet(cfg.svd_dir), load_scheduler(cfg.svd_dir)

        def objective(model: nn.Module, batch: TextLatentBatch, generator: torch.Generator) -> torch.Tensor:
            return noise_prediction_loss(model, scheduler, batch, generator)
    else:
        unet = load_unet(cfg.svd_dir)

        def objective(model: nn.Module, batch: LatentBatch, generator: torch.Generator) -> torch.Tensor:
            return post_tuning_loss(model, batch, generator=generator)
    trainable = prepare_for_post_tuning(unet, cfg.num_frames, cfg.precision, cfg.gradient_checkpointing, device,
                                        cfg.speed, cfg.base_frames, cfg.trainable)
    return unet, trainable, objective


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors: its state on their device (sharded across workers with zero_optimizer),
    or with memory=low or lowest in host memory beside fp32 master weights (pipelines/train/offload.py)."""
    if cfg.memory != "default":
        working = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        return HostAdamW(params, working, cfg.lr, cfg.betas, cfg.weight_decay)
    # The fused CUDA kernel updates every tensor in one launch; benchmarks/gpu_bench.py timed steps with it.
    kwargs = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay, "fused": params[0].is_cuda}
    if cfg.zero_optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Noise levels, noise and dropout of a step depend only on (seed, rank, step): resumed runs replay exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 100_003 + step)


def drop_conditioning(batch: LatentBatch | TextLatentBatch, probability: float,
                      generator: torch.Generator) -> LatentBatch | TextLatentBatch:
    """Zero the image conditioning of some clips, so the model also learns the unconditional branch of CFG.

    AnimateDiff's text conditioning is never dropped (run_training refuses cond_dropout for it): its base
    already learned the unconditional branch, and its motion modules see the text only through the spatial UNet.
    """
    if probability == 0 or isinstance(batch, TextLatentBatch):
        return batch
    keep = (torch.rand(batch.latents.shape[0], generator=generator) >= probability).float().to(batch.latents.device)
    return LatentBatch(batch.latents, batch.cond_latent * keep[:, None, None, None],
                       batch.image_embeds * keep[:, None, None], batch.added_time_ids)


def weights_fingerprint(params) -> str:
    """sha256 of the tensors' bytes: bitwise-equal weights, and only those, give equal fingerprints."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for param in params:
            digest.update(param.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=op)
    return value


def _worker_nodes(world: int) -> list[str]:
    """Every rank's Ray node, in rank order (a collective: every rank calls it)."""
    nodes = [node_id()] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, node_id())
    return nodes


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point. `loop_config`: {"config": the validated TrainConfig, "mlflow_run_id": str}."""
    cfg: TrainConfig = loop_config["config"]
    if not verbose():
        quiet_worker()  # again: Ray Train configured this worker's logging when the run started, after our hook
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    print(f"[rank {rank}/{world}] host {socket.gethostname()} pid {os.getpid()} device {device}", flush=True)

    unet, trainable, objective = build_unet(cfg, device)
    ema = EMA(trainable, cfg.ema_decay) if cfg.ema_decay else None
    optimizer = make_optimizer(cfg, list(trainable.values()))
    state = TrainState(mlflow_run_id=loop_config["mlflow_run_id"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            optimizer_state, state = load_checkpoint(Path(directory), unet, ema)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        print(f"[rank {rank}] resumed from step {state.step}", flush=True)
    model = ray.train.torch.prepare_model(unet, parallel_strategy_kwargs={"find_unused_parameters": False})
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    frozen_at_start = weights_fingerprint(frozen)
    nodes = _worker_nodes(world)

    stats = StreamStats()
    stream = rank_stream(list_shards(cfg.shards), rank, world, cfg.seed, start=state.clips_consumed,
                         shuffle_buffer=cfg.shuffle_buffer, stats=stats)
    tracking = rank == 0 and bool(state.mlflow_run_id)
    if tracking:
        import mlflow  # here: only rank 0 logs, the other ranks' processes never import it

        mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    base_model = str(cfg.svd_dir)
    interval_losses: list[float] = []
    step_times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    while state.step < cfg.max_steps:
        started = time.perf_counter()
        generator = step_generator(cfg.seed, rank, state.step)
        clips = [next(stream) for _ in range(cfg.batch_size)]
        for clip in clips:
            rate = str(round(clip.record.fps))
            state.fps_seen[rate] = state.fps_seen.get(rate, 0) + 1
        batch = collate(clips, fps=None if cfg.fps_condition == "clip" else cfg.fps_condition).to(device)
        batch = drop_conditioning(batch, cfg.cond_dropout, generator)
        lr = cfg.lr * min(1.0, (state.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr

        with speed_context(cfg.speed):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"), \
                    saved_activations(cfg.memory, device):
                loss = objective(model, batch, generator)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.grad_clip or math.inf)
        # Every rank must take the same decision, or DDP replicas drift apart.
        finite = _all_reduce(torch.tensor([float(torch.isfinite(loss) and torch.isfinite(grad_norm))], device=device),
                             dist.ReduceOp.MIN).item() == 1.0
        if finite:
            optimizer.step()
            state.nonfinite_in_a_row = 0
        else:
            state.nonfinite_in_a_row += 1
            state.nonfinite_total += 1
            print(f"[rank {rank}] step {state.step + 1}: non-finite loss or gradient, step skipped "
                  f"({state.nonfinite_in_a_row} in a row)", flush=True)
            if state.nonfinite_in_a_row >= cfg.max_nonfinite:
                raise NonFiniteLossError(
                    f"{state.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{state.step + 1}); check the shards for NaN latents or lower the learning rate"
                )
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.clips_consumed += cfg.batch_size
        for node in nodes:
            state.worker_steps_by_node[node] = state.worker_steps_by_node.get(node, 0) + 1

        mean_loss = _all_reduce(loss.detach().float().reshape(1)).item() / world
        if finite:
            interval_losses.append(mean_loss)
        step_times.append(time.perf_counter() - started)
        if rank == 0 and (state.step % cfg.log_every == 0 or state.step in (1, cfg.max_steps)):
            recent = step_times[-cfg.log_every:]
            step_time = sum(recent) / len(recent)
            metrics = {
                "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "step_time_s": step_time,
                "samples_per_s": world * cfg.batch_size / step_time, "nonfinite_steps": state.nonfinite_total,
                "bad_samples": stats.bad_samples, "bad_shards": len(stats.bad_shards),
            }
            if device.type == "cuda":
                metrics["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if tracking:
                mlflow.log_metrics(metrics, step=state.step, run_id=state.mlflow_run_id)
            print(f"step {state.step}/{cfg.max_steps} loss {mean_loss:.4f} lr {lr:.2e} grad {float(grad_norm):.3f} "
                  f"{metrics['samples_per_s']:.2f} clips/s ETA {_format_eta(step_time * (cfg.max_steps - state.step))}",
                  flush=True)

        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
            replica = {"step": state.step, "trainable": weights_fingerprint(trainable.values()),
                       "frozen": weights_fingerprint(frozen), "frozen_at_start": frozen_at_start}
            _checkpoint(cfg, rank, unet, trainable, optimizer, state, ema, interval_losses, base_model, tracking,
                        replica)
            interval_losses = []


def _checkpoint(cfg: TrainConfig, rank: int, unet: nn.Module, trainable: dict, optimizer: torch.optim.Optimizer,
                state: TrainState, ema: EMA | None, interval_losses: list[float], base_model: str,
                tracking: bool, replica: dict) -> None:
    """Report a checkpoint (every rank calls ray.train.report: it is a barrier).

    Rank 0 writes the training state; every rank adds a fingerprint of its weights (Ray merges the ranks' files
    into one checkpoint directory), so the driver can verify that DDP replicas agree and frozen weights held.
    """
    if ema is not None:
        ema.update(trainable)
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO: gather the shards on rank 0 (collective)
        optimizer.consolidate_state_dict(to=0)
    interval_loss = sum(interval_losses) / len(interval_losses) if interval_losses else float("nan")
    metrics = {"step": state.step, "interval_loss": interval_loss}
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / REPLICA_FILE.format(rank=rank)).write_text(json.dumps(replica))
        if rank == 0:
            state.history.append({"step": state.step, "interval_loss": interval_loss})
            improved = interval_loss < state.best_loss
            if improved:
                state.best_loss = interval_loss
            metadata = checkpoint_metadata(unet, base_model, state.training_metadata(cfg.fps_condition))
            save_checkpoint(Path(directory), unet, optimizer.state_dict(), state, ema, metadata)
            if improved:
                cfg.run_dir.mkdir(parents=True, exist_ok=True)
                write_adapter(trainable, cfg.run_dir / BEST_ADAPTER, metadata, torch.float32)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint-{state.step:08d}")
    if tracking:
        import mlflow

        mlflow.log_metric("interval_loss", interval_loss, step=state.step, run_id=state.mlflow_run_id)

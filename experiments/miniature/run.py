"""The miniature experiment, end to end through the project's own stages, in resumable phases.

world -> VAE (trained here) -> VAE ceiling -> preprocess (Ray Data -> latent shards) -> base model (`trainable=all`,
short clips) -> base ceiling (the base at its own length) -> ExVideo post-tuning (`trainable=temporal`, 4x longer
clips), once per replicate -> long-clip validation loss -> generation (exvideo | direct | chain | windows, same first
frames and sampling noise per replicate) -> world metrics with bootstrap intervals -> RESULTS.md, contact sheet.

    python -m experiments.miniature --set workdir=runs/miniature [--set stop_after=ceilings] [--set use_gpu=true]

Every phase leaves its output in `workdir`; a rerun skips the phases that are done (the stages resume themselves).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field

from exvideo import load_adapter, load_svd, load_unet
from exvideo.config import ConfigError, StageConfig, operational
from exvideo.samples import decode_sample
from exvideo.unet import extend_unet
from pipelines.train.data import list_shards
from pipelines.train.state import load_unet_weights
from experiments.miniature.models import train_vae, write_svd
from experiments.miniature.statistics import nanmean
from experiments.miniature.validation import validation_losses
from experiments.miniature.world import (
    SIZE, WorldVideo, read_truth, render, sample_video, write_first_frames, write_world_corpus)
from experiments.miniature.world_metrics import frame_scores, summarise

METHODS = ("exvideo", "direct", "chain", "windows")
BASELINES = METHODS[1:]
SHORT_BASE = "base at its training length"
CEILING = "truth through the VAE"
# Seeds of held-out videos start here, far from the training seeds.
HELDOUT_OFFSET = 500_000
VALIDATION_MODELS = ("base", "base, extended (identity init)", "exvideo post-tuned")


class MiniatureConfig(StageConfig):
    """Sizes, steps and seeds of one run of the miniature experiment (defaults: the CPU run in RESULTS.md)."""

    workdir: Path = operational(Path("runs/miniature"))
    results: Path | None = operational(None, description="markdown results page; default <workdir>/RESULTS.md")
    seed: int = Field(0, ge=0, description="offsets every world seed, the VAE's and the base model's")
    replicates: int = Field(3, ge=1, description="replicate r post-tunes with seed+r and samples with its own noise")
    size: int = Field(SIZE, ge=16, multiple_of=8)
    fps: int = Field(8, ge=1)
    base_frames: int = Field(8, ge=3, description="clip length the base model is trained on")
    long_frames: int = Field(32, ge=4, description="length ExVideo post-tunes to and every method generates")
    train_videos: int = Field(512, ge=2)
    heldout_videos: int = Field(32, ge=1)
    vae_steps: int = Field(1000, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    base_steps: int = Field(1500, ge=1)
    base_batch: int = Field(4, ge=1)
    base_lr: float = Field(5e-4, gt=0)
    post_steps: int = Field(1000, ge=1)
    post_batch: int = Field(1, ge=1)
    post_lr: float = Field(2e-4, gt=0)
    val_levels: int = Field(8, ge=1, description="noise levels of the validation loss")
    gen_steps: int = Field(10, ge=1)
    resamples: int = operational(2000, ge=100, description="bootstrap resamples of the held-out videos")
    stop_after: Literal["ceilings", "validation", "comparison"] = operational(
        "comparison", description="ceilings: VAE and base rows only; validation: also post-tuning and its loss")
    use_gpu: bool = operational(False)
    cpus_per_worker: float = operational(1, gt=0, description="CPUs per training worker (its torch threads)")
    gen_workers: int = operational(2, ge=1, description="generation actors (one CPU each on a CPU run)")
    # One thread: on a shared 2-core machine, two torch threads competing with another process run ~5x slower.
    torch_threads: int = operational(1, ge=1, description="torch threads of this process (VAE, validation, metrics)")

    @property
    def train_seeds(self) -> list[int]:
        return [self.seed * 1_000_000 + i for i in range(self.train_videos)]

    @property
    def heldout_seeds(self) -> list[int]:
        return [self.seed * 1_000_000 + HELDOUT_OFFSET + i for i in range(self.heldout_videos)]

    def sampling_seed(self, replicate: int, video: int) -> int:
        """Noise of one video of one replicate: the same for every method."""
        return (self.seed + replicate) * 100_000 + video


class Phases:
    """Wall time of each phase run by this invocation, and the cached outputs of the ones that are done."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seconds: dict[str, float] = {}  # phases this invocation ran
        self.recorded: dict[str, float] = {}  # every phase's own time, when it ran (the whole run's cost)
        self.started = time.perf_counter()

    def run(self, name: str, compute: Callable[[], dict]) -> dict:
        """`compute()`'s JSON result, cached in `<workdir>/phases/<name>.json`: a rerun reads it instead."""
        path = self.folder / f"{name.replace(' ', '_')}.json"
        if not path.is_file():
            self._compute(name, path, compute)
        value = json.loads(path.read_text())
        self.recorded[name] = value["seconds"]
        return value

    def _compute(self, name: str, path: Path, compute: Callable[[], dict]) -> None:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        value = compute()
        self.seconds[name] = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**value, "seconds": self.seconds[name]}, indent=1, default=str))
        os.replace(tmp, path)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


def _device(cfg: MiniatureConfig) -> str:
    return "cuda" if cfg.use_gpu else "cpu"


# --- world and VAE ---------------------------------------------------------------------------------------------------

def make_world(cfg: MiniatureConfig, work: Path) -> dict:
    """Training and held-out mp4 corpora (with their manifests) and the held-out first frames with their truth."""
    return {
        "train": str(write_world_corpus(work / "world" / "train", cfg.train_seeds, cfg.long_frames, cfg.fps,
                                        cfg.size)),
        "heldout": str(write_world_corpus(work / "world" / "heldout", cfg.heldout_seeds, cfg.long_frames, cfg.fps,
                                          cfg.size)),
        "images": write_first_frames(work / "world" / "first_frames", cfg.heldout_seeds, cfg.size),
    }


def make_vae(cfg: MiniatureConfig, init_dir: Path) -> dict:
    clips = np.stack([render(sample_video(s, cfg.size), cfg.long_frames) for s in cfg.train_seeds])
    vae = train_vae(clips, cfg.vae_steps, clip_frames=cfg.base_frames, lr=cfg.vae_lr, seed=cfg.seed,
                    device=_device(cfg))
    init_dir.parent.mkdir(parents=True, exist_ok=True)
    write_svd(init_dir, vae, seed=cfg.seed)
    return {"checkpoint": str(init_dir)}


def vae_round_trip(cfg: MiniatureConfig, vae, video: WorldVideo, path: Path) -> np.ndarray:
    """The true video through the VAE as generation decodes (windows of the base length, half-window stride) and
    through the same mp4 writer and reader as generated videos."""
    from pipelines.evaluate.videos import read_frames
    from pipelines.generate.decode import decode_video
    from pipelines.generate.pipeline import to_uint8
    from pipelines.generate.video_io import write_mp4

    x = torch.from_numpy(render(video, cfg.long_frames)).permute(0, 3, 1, 2).to(vae.device).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    pixels = decode_video(vae, latents[None], window=cfg.base_frames, stride=cfg.base_frames // 2)[0]
    write_mp4(path, to_uint8(pixels), cfg.fps)
    return read_frames(path)


def vae_ceiling(cfg: MiniatureConfig, work: Path, init_dir: Path) -> dict:
    """Per held-out video: world metrics and per-frame colour shift of the truth through the VAE."""
    vae = load_svd(init_dir).vae.to(_device(cfg))
    truth = read_truth(work / "world" / "first_frames")
    rows = {}
    for row_id, video in truth.items():
        frames = vae_round_trip(cfg, vae, video, work / "ceilings" / "vae" / f"{row_id}.mp4")
        scores = frame_scores(frames, video)
        rows[row_id] = {**summarise(scores), "colour_shift": scores["colour_shift"].tolist(),
                        "psnr_by_frame": scores["psnr_to_truth"].tolist()}
    return {"videos": rows}


# --- preprocess and training -----------------------------------------------------------------------------------------

def preprocess(cfg: MiniatureConfig, manifest: str, output: Path, model: Path, num_frames: int) -> str:
    from preprocessing.config import PreprocessConfig
    from preprocessing.run import run_preprocess

    summary = run_preprocess(PreprocessConfig(
        input=manifest, output=output, model=model, num_frames=num_frames, clips_per_video=1,
        height=cfg.size, width=cfg.size, encode_device=_device(cfg), progress=False))
    if summary["counts"]["failures"]:
        raise RuntimeError(f"preprocessing {manifest} failed on {summary['counts']['failures']} clips; see {output}")
    return str(output / "shards")


def median_bucket(shards: str) -> int:
    """The motion bucket typical of a shard set: generation conditions each model on what it was trained on."""
    buckets = pq.read_table(Path(shards).parent / "index.parquet", columns=["motion_bucket"]).column(0).to_numpy()
    return int(np.median(buckets))


def train(cfg: MiniatureConfig, name: str, svd_dir: Path, shards: str, seed: int, **fields) -> dict:
    from pipelines.train import TrainConfig, run_training

    # Absolute: Ray Train workers run in another working directory (the MLflow store path must be the same there).
    result = run_training(TrainConfig(
        svd_dir=svd_dir, shards=shards, storage_path=cfg.workdir.resolve() / "train", name=name, seed=seed,
        use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, gradient_checkpointing=False, ema_decay=None,
        cond_dropout=0.0, log_every=50,
        # The world's own rate, which generation passes explicitly and validation reads.
        fps_condition="clip", **fields))
    return {"adapter": str(result.adapter), "final_loss": result.final_loss, "steps": result.steps}


def make_base(cfg: MiniatureConfig, init_dir: Path, base_dir: Path, shards: dict) -> dict:
    from safetensors.torch import load_file

    result = train(cfg, "base", init_dir, shards["base"], cfg.seed, trainable="all", num_frames=cfg.base_frames,
                   max_steps=cfg.base_steps, batch_size=cfg.base_batch, lr=cfg.base_lr,
                   warmup_steps=min(100, cfg.base_steps // 10), checkpoint_every=cfg.base_steps)
    unet = load_unet(init_dir)
    load_unet_weights(unet, load_file(result["adapter"]))
    write_svd(base_dir, load_svd(init_dir).vae, unet, seed=cfg.seed)
    return {**result, "checkpoint": str(base_dir)}


def post_tune(cfg: MiniatureConfig, base_dir: Path, shards: dict, replicate: int) -> dict:
    return train(cfg, f"exvideo-r{replicate}", base_dir, shards["long"], cfg.seed + replicate, trainable="temporal",
                 num_frames=cfg.long_frames, base_frames=cfg.base_frames, max_steps=cfg.post_steps,
                 batch_size=cfg.post_batch, lr=cfg.post_lr, warmup_steps=min(50, cfg.post_steps // 10),
                 checkpoint_every=cfg.post_steps)


def heldout_clips(shards: str) -> list:
    import webdataset as wds

    samples = wds.WebDataset(list_shards(shards), shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False)
    return sorted((decode_sample(raw) for raw in samples), key=lambda clip: clip.key)


def validation(cfg: MiniatureConfig, base_dir: Path, shards: dict, adapters: list[str]) -> dict:
    """Per held-out clip, the long-clip validation loss of the base, its identity extension and each replicate's
    post-tuned model (same clips, noise levels and noise for all)."""
    clips = heldout_clips(shards["heldout"])

    def losses_of(unet) -> list[float]:
        return validation_losses(unet.to(_device(cfg)), clips, cfg.seed, cfg.val_levels).tolist()

    base, extended = load_unet(base_dir), extend_unet(load_unet(base_dir), cfg.long_frames, cfg.base_frames)
    losses = {VALIDATION_MODELS[0]: [losses_of(base)], VALIDATION_MODELS[1]: [losses_of(extended)],
              VALIDATION_MODELS[2]: []}
    for adapter in adapters:
        tuned = load_unet(base_dir)
        load_adapter(tuned, adapter)
        losses[VALIDATION_MODELS[2]].append(losses_of(tuned))
    # Stored [videos, replicates], as every score table; the base's losses have one column (no seed varies them).
    return {"clips": len(clips), "losses": {name: np.array(columns).T.tolist() for name, columns in losses.items()}}


# --- generation ------------------------------------------------------------------------------------------------------

def video_path(work: Path, label: str, replicate: int, row_id: str) -> Path:
    """Where the video of one (method or diagnostic, replicate, held-out video) lies."""
    if label == "exvideo":
        return work / "generate" / f"exvideo-r{replicate}" / "videos" / f"{row_id}-r{replicate}.mp4"
    if label == SHORT_BASE:
        return work / "generate" / "base-short" / "videos" / f"{row_id}-r{replicate}.mp4"
    return work / "generate" / "baselines" / "videos" / f"{label}-{row_id}-r{replicate}.mp4"


def generate(cfg: MiniatureConfig, work: Path, job: str, model: Path, adapter: str | None, motion_bucket: int,
             rows: list[dict]) -> dict:
    """One generation job over `rows` (each naming its method, length and sampling seed) with the project's job."""
    from pipelines.generate import GenerateJobConfig, run_generate_job
    from pipelines.generate.params import GenerationParams

    listing = work / "world" / "first_frames" / f"rows-{job}.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = GenerationParams(
        method="exvideo" if adapter else "direct", num_frames=cfg.long_frames, height=cfg.size, width=cfg.size,
        steps=cfg.gen_steps, fps=cfg.fps, motion_bucket_id=motion_bucket, noise_aug_strength=0.0, min_guidance=1.0,
        max_guidance=1.0, decode_window=cfg.base_frames, decode_stride=cfg.base_frames // 2,
        clip_frames=cfg.base_frames, window_stride=cfg.base_frames // 2)
    summary = run_generate_job(GenerateJobConfig(
        input=listing, output=work / "generate" / job, model=model, adapter=adapter, params=params,
        workers=cfg.gen_workers, device=_device(cfg)))
    if summary.get("failed"):
        raise RuntimeError(f"generation job {job} failed on {summary['failed']} rows; see "
                           f"{work / 'generate' / job / 'failures.jsonl'}")
    return {"videos": len(rows)}


def job_rows(cfg: MiniatureConfig, images: dict[str, str], methods: tuple[str, ...], replicates: list[int],
             num_frames: int, prefix: bool) -> list[dict]:
    """Rows for every (method, replicate, held-out video); a replicate's sampling seed is the same for all methods."""
    return [{"id": f"{method}-{row_id}-r{r}" if prefix else f"{row_id}-r{r}", "image": image,
             "seed": cfg.sampling_seed(r, number), "method": method, "num_frames": num_frames}
            for method in methods for r in replicates for number, (row_id, image) in enumerate(images.items())]


def score_videos(cfg: MiniatureConfig, work: Path, label: str) -> dict:
    """World metrics [videos, replicates] and mean per-frame presence and position error of one method."""
    from pipelines.evaluate.videos import read_frames

    truth = read_truth(work / "world" / "first_frames")
    table: dict[str, list[list[float]]] = {}
    present, error = [], []
    for row_id, video in truth.items():
        cells = []
        for r in range(cfg.replicates):
            scores = frame_scores(read_frames(video_path(work, label, r, row_id)), video)
            cells.append(summarise(scores))
            present.append(scores["present"].astype(float))
            error.append(scores["position_error_px"])
        for key in cells[0]:
            table.setdefault(key, []).append([cell[key] for cell in cells])
    return {"scores": table, "presence_by_frame": np.mean(present, axis=0).tolist(),
            "error_by_frame": nanmean(np.array(error), axis=0).tolist()}


# --- the run ---------------------------------------------------------------------------------------------------------

def run_miniature(cfg: MiniatureConfig) -> dict:
    """Run (or resume) the experiment up to `cfg.stop_after`; write results.json and the results page; return the
    results."""
    from experiments.miniature.report import write_contact_sheet, write_results

    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_workdir(cfg, work)
    phases = Phases(work / "phases")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:  # the caller's thread count back afterwards: a test session goes on with it
        results = run_phases(cfg, work, phases)
    finally:
        torch.set_num_threads(threads)
    results["invocation"] = {"wall_s": phases.total, "phases_s": phases.seconds}
    results["phases_s"] = phases.recorded
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if "exvideo" in results["scores"]:
        write_contact_sheet(cfg, work, results_path(cfg).with_name("contact_sheet.png"))
    write_results(cfg, results, results_path(cfg))
    return results


def check_workdir(cfg: MiniatureConfig, work: Path) -> None:
    """Record the fields that decide the outputs in `<workdir>/config.json`; refuse to resume a workdir made with
    other values (its finished phases would be reused as if they had been made with these)."""
    recorded, fields = work / "config.json", cfg.output_fields()
    if not recorded.is_file():
        recorded.write_text(json.dumps(fields, indent=1))
        return
    before = json.loads(recorded.read_text())
    changed = sorted(k for k in fields.keys() | before.keys() if fields.get(k) != before.get(k))
    if changed:
        raise ConfigError(f"{work} holds a run made with other values of {', '.join(changed)} "
                          f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); use a new workdir, or these "
                          "values to resume it")


def run_phases(cfg: MiniatureConfig, work: Path, phases: Phases) -> dict:
    init_dir, base_dir = work / "models" / "init", work / "models" / "base"
    world = phases.run("world", lambda: make_world(cfg, work))
    images = world["images"]
    phases.run("vae", lambda: make_vae(cfg, init_dir))
    results: dict = {"config": cfg.model_dump(mode="json")}
    results["vae_ceiling"] = phases.run("vae ceiling", lambda: vae_ceiling(cfg, work, init_dir))["videos"]
    shards = phases.run("preprocess", lambda: {
        label: preprocess(cfg, world[corpus], work / "shards" / label, init_dir, frames)
        for label, corpus, frames in (("base", "train", cfg.base_frames), ("long", "train", cfg.long_frames),
                                      ("heldout", "heldout", cfg.long_frames))})
    buckets = {"base": median_bucket(shards["base"]), "long": median_bucket(shards["long"])}
    results["motion_buckets"] = buckets
    results["base"] = phases.run("base", lambda: make_base(cfg, init_dir, base_dir, shards))
    everyone = list(range(cfg.replicates))
    phases.run("base ceiling generate", lambda: generate(
        cfg, work, "base-short", base_dir, None, buckets["base"],
        job_rows(cfg, images, ("direct",), everyone, cfg.base_frames, prefix=False)))
    scores = {SHORT_BASE: phases.run("base ceiling", lambda: score_videos(cfg, work, SHORT_BASE))}
    results["scores"] = scores
    if cfg.stop_after == "ceilings":
        return results
    post = [phases.run(f"post-tune r{r}", lambda r=r: post_tune(cfg, base_dir, shards, r)) for r in everyone]
    results["post_tune"] = post
    results["validation"] = phases.run("validation", lambda: validation(
        cfg, base_dir, shards, [p["adapter"] for p in post]))
    if cfg.stop_after == "validation":
        return results
    for r in everyone:
        phases.run(f"generate exvideo r{r}", lambda r=r: generate(
            cfg, work, f"exvideo-r{r}", base_dir, post[r]["adapter"], buckets["long"],
            job_rows(cfg, images, ("exvideo",), [r], cfg.long_frames, prefix=False)))
    phases.run("generate baselines", lambda: generate(
        cfg, work, "baselines", base_dir, None, buckets["base"],
        job_rows(cfg, images, BASELINES, everyone, cfg.long_frames, prefix=True)))
    for method in METHODS:
        scores[method] = phases.run(f"scores {method}", lambda method=method: score_videos(cfg, work, method))
    return results


def results_path(cfg: MiniatureConfig) -> Path:
    return cfg.results or cfg.workdir / "RESULTS.md"


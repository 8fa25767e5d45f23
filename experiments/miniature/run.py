"""The miniature experiment, end to end through the project's own stages.

world corpus -> tiny VAE (trained here) -> preprocess (Ray Data -> latent shards) -> train a base model
(`trainable=all`, short clips) -> ExVideo post-tuning (`trainable=temporal`, 4x longer clips) -> validation loss
on held-out long clips -> generate (exvideo | direct | chain | windows, same first frames and seeds) -> evaluate
(project metrics + report) -> world metrics -> RESULTS.md.

    python -m experiments.miniature --set workdir=runs/miniature [--set base_steps=...]

Every phase leaves its output in `workdir`; a rerun redoes only what is missing (the stages resume themselves).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field

from exvideo import load_adapter, load_svd, load_unet
from exvideo.samples import decode_sample
from exvideo.unet import extend_unet
from exvideo.config import StageConfig
from pipelines.train.data import list_shards
from pipelines.train.state import load_unet_weights
from experiments.miniature.models import reconstruction_psnr, train_vae, write_svd
from experiments.miniature.validation import validation_loss
from experiments.miniature.world import read_truth, render, sample_video, write_first_frames, write_world_corpus
from experiments.miniature.world_metrics import world_metrics

METHODS = ("exvideo", "direct", "chain", "windows")
SHORT_BASE = "base at its training length"
CEILING = "truth through the VAE"
# Seeds of held-out videos start here, far from the training seeds.
HELDOUT_OFFSET = 500_000


class MiniatureConfig(StageConfig):
    """Sizes, steps and seeds of one run of the miniature experiment (defaults: the CPU run in RESULTS.md)."""

    workdir: Path = Path("runs/miniature")
    results: Path | None = Field(None, description="markdown results table; default <workdir>/RESULTS.md")
    seed: int = Field(0, ge=0, description="offsets every world seed, model initialisation and sampling seed")
    size: int = Field(64, ge=32, multiple_of=8)
    fps: int = Field(8, ge=1)
    base_frames: int = Field(8, ge=3, description="clip length the base model is trained on")
    long_frames: int = Field(32, ge=4, description="length ExVideo post-tunes to and every method generates")
    train_videos: int = Field(192, ge=2)
    heldout_videos: int = Field(8, ge=1)
    vae_steps: int = Field(500, ge=1)
    vae_lr: float = Field(1e-3, gt=0)
    base_steps: int = Field(1200, ge=1)
    base_batch: int = Field(4, ge=1)
    base_lr: float = Field(3e-4, gt=0)
    post_steps: int = Field(600, ge=1)
    post_batch: int = Field(1, ge=1)
    post_lr: float = Field(2e-4, gt=0)
    val_levels: int = Field(8, ge=1, description="noise levels of the validation loss")
    gen_steps: int = Field(20, ge=1)
    generate: bool = Field(True, description="false: stop after the validation loss (the test's miniature)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per training worker (its torch threads)")
    # One thread: on a shared 2-core machine, two torch threads competing with another process run ~5x slower.
    torch_threads: int = Field(1, ge=1, description="torch threads of this process (VAE, validation, metrics)")

    @property
    def train_seeds(self) -> list[int]:
        return [self.seed * 1_000_000 + i for i in range(self.train_videos)]

    @property
    def heldout_seeds(self) -> list[int]:
        return [self.seed * 1_000_000 + HELDOUT_OFFSET + i for i in range(self.heldout_videos)]


class Timer:
    """Wall time of each phase, in order."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.started = time.perf_counter()

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                print(f"== {name}", flush=True)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.phases[name] = time.perf_counter() - self.t

        return _Phase()

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


def _preprocess(cfg: MiniatureConfig, manifest: Path, output: Path, model: Path, num_frames: int) -> Path:
    from preprocessing.config import PreprocessConfig
    from preprocessing.run import run_preprocess

    manifest_out = run_preprocess(PreprocessConfig(
        input=str(manifest), output=output, model=model, num_frames=num_frames, clips_per_video=1,
        height=cfg.size, width=cfg.size, encode_device="cuda" if cfg.use_gpu else "cpu", progress=False))
    counts = manifest_out["counts"]
    if counts["failures"]:
        raise RuntimeError(f"preprocessing {manifest} failed on {counts['failures']} clips; see {output}")
    return output / "shards"


def _median_bucket(shards: Path) -> int:
    """The motion bucket typical of a shard set: generation conditions each model on what it was trained on."""
    buckets = pq.read_table(shards.parent / "index.parquet", columns=["motion_bucket"]).column(0).to_numpy()
    return int(np.median(buckets))


def _train(cfg: MiniatureConfig, name: str, svd_dir: Path, shards: Path, **fields):
    from pipelines.train import TrainConfig, run_training

    # Absolute: Ray Train workers run in another working directory (the MLflow store path must be the same there).
    train_cfg = TrainConfig(svd_dir=svd_dir, shards=str(shards), storage_path=cfg.workdir.resolve() / "train",
                            name=name, seed=cfg.seed, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                            gradient_checkpointing=False, ema_decay=None, cond_dropout=0.0, log_every=50,
                            # The world's own rate, which generation passes explicitly and validation reads.
                            fps_condition="clip",
                            **fields)
    return run_training(train_cfg)


def _heldout_clips(shards: Path) -> list:
    import webdataset as wds

    samples = wds.WebDataset(list_shards(str(shards)), shardshuffle=False, nodesplitter=None,
                             workersplitter=None, empty_check=False)
    return [decode_sample(raw) for raw in samples]


def build_models(cfg: MiniatureConfig, timer: Timer) -> dict:
    """World, VAE, shards, base model and adapter; returns their paths and the validation losses."""
    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    with timer.phase("world"):
        train_manifest = write_world_corpus(work / "world" / "train", cfg.train_seeds, cfg.long_frames, cfg.fps,
                                            cfg.size)
        heldout_manifest = write_world_corpus(work / "world" / "heldout", cfg.heldout_seeds, cfg.long_frames,
                                              cfg.fps, cfg.size)
        listing = write_first_frames(work / "world" / "first_frames", cfg.heldout_seeds, cfg.size)

    init_dir, base_dir = work / "models" / "init", work / "models" / "base"
    with timer.phase("vae"):
        if not (init_dir / "model_index.json").is_file():
            clips = np.stack([render(sample_video(s, cfg.size), cfg.long_frames) for s in cfg.train_seeds])
            vae = train_vae(clips, cfg.vae_steps, clip_frames=cfg.base_frames, lr=cfg.vae_lr, seed=cfg.seed)
            init_dir.parent.mkdir(parents=True, exist_ok=True)
            write_svd(init_dir, vae, seed=cfg.seed)
        vae = load_svd(init_dir).vae
        heldout_clip = render(sample_video(cfg.heldout_seeds[0], cfg.size), cfg.base_frames)
        vae_psnr = reconstruction_psnr(vae, heldout_clip)

    with timer.phase("preprocess"):
        shards = {}
        for label, manifest, frames in (("base", train_manifest, cfg.base_frames),
                                        ("long", train_manifest, cfg.long_frames),
                                        ("heldout", heldout_manifest, cfg.long_frames)):
            shards[label] = _preprocess(cfg, manifest, work / "shards" / label, init_dir, frames)

    with timer.phase("train base"):
        base = _train(cfg, "base", init_dir, shards["base"], trainable="all", num_frames=cfg.base_frames,
                      max_steps=cfg.base_steps, batch_size=cfg.base_batch, lr=cfg.base_lr,
                      warmup_steps=min(100, cfg.base_steps // 10), checkpoint_every=cfg.base_steps)
        if not (base_dir / "model_index.json").is_file():
            from safetensors.torch import load_file

            unet = load_unet(init_dir)
            load_unet_weights(unet, load_file(str(base.adapter)))
            write_svd(base_dir, vae, unet, seed=cfg.seed)

    with timer.phase("post-tune"):
        post = _train(cfg, "exvideo", base_dir, shards["long"], trainable="temporal", num_frames=cfg.long_frames,
                      base_frames=cfg.base_frames, max_steps=cfg.post_steps, batch_size=cfg.post_batch,
                      lr=cfg.post_lr, warmup_steps=min(50, cfg.post_steps // 10), checkpoint_every=cfg.post_steps)

    with timer.phase("validation loss"):
        clips = _heldout_clips(shards["heldout"])
        extended = extend_unet(load_unet(base_dir), cfg.long_frames, cfg.base_frames)
        tuned = load_unet(base_dir)
        load_adapter(tuned, post.adapter)
        losses = {name: validation_loss(unet, clips, cfg.seed, cfg.val_levels)
                  for name, unet in (("base", load_unet(base_dir)), ("base, extended (identity init)", extended),
                                     ("exvideo post-tuned", tuned))}
        print(f"long-clip validation loss on {len(clips)} held-out clips: {losses}", flush=True)

    return {"init": init_dir, "base": base_dir, "adapter": post.adapter, "listing": listing, "shards": shards,
            "validation_loss": losses, "vae_psnr": vae_psnr, "heldout_clips": len(clips),
            "base_final_loss": base.final_loss, "post_final_loss": post.final_loss}


def generate_and_evaluate(cfg: MiniatureConfig, models: dict, timer: Timer) -> dict:
    """Every method on the held-out first frames, the project's evaluation, and the world metrics."""
    from pipelines.evaluate.run import EvaluateConfig, run_evaluation
    from pipelines.evaluate.videos import read_frames
    from pipelines.generate import GenerateJobConfig, run_generate_job
    from pipelines.generate.params import GenerationParams

    work = cfg.workdir.resolve()
    buckets = {"base": _median_bucket(models["shards"]["base"]), "long": _median_bucket(models["shards"]["long"])}
    folders = {}
    # The last job is a diagnostic, not a method: the base model at its own training length, to tell how much of
    # what the long videos lose the base model already loses.
    jobs = [(method, method, cfg.long_frames) for method in METHODS] + [(SHORT_BASE, "direct", cfg.base_frames)]
    with timer.phase("generate"):
        for label, method, num_frames in jobs:
            params = GenerationParams(
                method=method, num_frames=num_frames, height=cfg.size, width=cfg.size, steps=cfg.gen_steps,
                fps=cfg.fps, motion_bucket_id=buckets["long" if method == "exvideo" else "base"],
                noise_aug_strength=0.0, min_guidance=1.0, max_guidance=1.0, decode_window=cfg.base_frames,
                decode_stride=cfg.base_frames // 2, clip_frames=cfg.base_frames,
                window_stride=cfg.base_frames // 2)
            output = work / "generate" / ("base-short" if label == SHORT_BASE else label)
            run_generate_job(GenerateJobConfig(
                input=models["listing"], output=output, model=models["base"],
                adapter=models["adapter"] if method == "exvideo" else None, params=params, workers=1,
                device="cuda" if cfg.use_gpu else "cpu"))
            folders[label] = output / "videos"

    with timer.phase("evaluate"):
        outcome = run_evaluation(EvaluateConfig(videos_dir=[folders[m] for m in METHODS], output_dir=work / "evaluate",
                                                title="ExVideo miniature: methods at the long length"))
        project = {group.method: {**group.means, "videos": group.count} for group in outcome["groups"]}

    with timer.phase("world metrics"):
        truth = read_truth(models["listing"].parent)
        world = {}
        videos = {label: {row_id: read_frames(folder / f"{row_id}.mp4") for row_id in truth}
                  for label, folder in folders.items()}
        for label, by_id in videos.items():
            world[label] = _mean_dicts([world_metrics(by_id[row_id], video) for row_id, video in truth.items()])
        vae = load_svd(models["init"]).vae
        videos[CEILING] = {row_id: _vae_round_trip(vae, render(video, cfg.long_frames), cfg.base_frames)
                           for row_id, video in truth.items()}
        world[CEILING] = _mean_dicts([world_metrics(videos[CEILING][row_id], video)
                                      for row_id, video in truth.items()])
        sheet = _results_path(cfg).with_name("contact_sheet.png")
        write_contact_sheet(sheet, {row_id: render(video, cfg.long_frames) for row_id, video in truth.items()},
                            {label: videos[label] for label in (CEILING, *METHODS)})
    return {"project": project, "world": world, "report": str(outcome["report"]), "motion_buckets": buckets,
            "contact_sheet": str(sheet)}


def write_contact_sheet(path: Path, truth: dict[str, np.ndarray], videos: dict[str, dict[str, np.ndarray]],
                        rows: int = 3, every: int = 4) -> Path:
    """One PNG: for the first `rows` held-out videos, every `every`-th frame of the truth, then of each entry of
    `videos` (label -> id -> frames), one strip each, in that order; a white gap between videos."""
    import PIL.Image

    strips = []
    for row_id in list(truth)[:rows]:
        for frames in (truth[row_id], *(by_id[row_id] for by_id in videos.values())):
            strips.append(np.concatenate(list(frames[::every]), axis=1))
        strips.append(np.full((6, strips[-1].shape[1], 3), 255, np.uint8))
    tmp = path.with_name(f".{path.name}.tmp")
    PIL.Image.fromarray(np.concatenate(strips[:-1], axis=0)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _vae_round_trip(vae, frames: np.ndarray, window: int) -> np.ndarray:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean, num_frames=len(chunk)).sample
                         for chunk in x.split(window)])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.nanmean([row[key] for row in rows])) if any(np.isfinite(row[key]) for row in rows)
            else float("nan") for key in rows[0]}


PROJECT_COLUMNS = ("flicker", "motion", "warp_error", "frame0_psnr", "ssim_to_first.last",
                   "contrast_ratio_last_to_first", "saturation_ratio_last_to_first")
WORLD_COLUMNS = ("position_error_px", "position_error_px.last", "present_fraction", "survives", "psnr_to_truth",
                 "psnr_to_truth.last")


def _shown(path: str | Path) -> str:
    """A path as the reader can follow it: relative to the working directory when it lies below it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _row(name: str, values: dict, columns: tuple[str, ...]) -> str:
    cells = [f"{values[c]:.3f}" if c in values and np.isfinite(values[c]) else "n/a" for c in columns]
    return f"| {name} | " + " | ".join(cells) + " |"


def results_markdown(cfg: MiniatureConfig, models: dict, evaluation: dict | None, timer: Timer) -> str:
    """The results page: setup, the long-clip validation loss, and every method's metrics from this run."""
    hardware = (f"{torch.cuda.get_device_name(0)}" if cfg.use_gpu and torch.cuda.is_available()
                else f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    lines = [
        "# Miniature ExVideo experiment: results", "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {hardware}; torch {torch.__version__}; "
        f"this invocation's wall time {timer.total / 60:.1f} min (phases already done are skipped). "
        "Command: `python -m experiments.miniature " + " ".join(sys.argv[1:]) + "`.", "",
        "## Setup", "",
        f"- World: {cfg.size}x{cfg.size} px, {cfg.fps} fps; {cfg.train_videos} training videos, "
        f"{cfg.heldout_videos} held-out (seeds {cfg.heldout_seeds[0]}..{cfg.heldout_seeds[-1]}).",
        f"- VAE: tiny SVD VAE trained here, {cfg.vae_steps} steps; reconstruction PSNR on a held-out clip "
        f"{models['vae_psnr']:.1f} dB.",
        f"- Base model: tiny SVD UNet trained from scratch on {cfg.base_frames}-frame clips, every weight "
        f"(`trainable=all`), {cfg.base_steps} steps x {cfg.base_batch} clips, lr {cfg.base_lr}; "
        f"mean training loss over its steps {models['base_final_loss']:.4f}.",
        f"- ExVideo post-tuning to {cfg.long_frames} frames ({cfg.long_frames // cfg.base_frames}x), temporal "
        f"modules only, {cfg.post_steps} steps x {cfg.post_batch} clips, lr {cfg.post_lr}; "
        f"mean training loss over its steps {models['post_final_loss']:.4f}.",
        f"- Seed {cfg.seed}. Generation: {cfg.gen_steps} Euler steps, no CFG, noise_aug 0, the same first frame "
        f"and sampling seed for every method.", "",
        "Phase wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.phases.items()) + ".", "",
        f"## Long-clip ({cfg.long_frames} frames) validation loss, {models['heldout_clips']} held-out clips x "
        f"{cfg.val_levels} noise levels, same noise", "",
        "| model | loss |", "|---|---|",
        *[f"| {name} | {loss:.4f} |" for name, loss in models["validation_loss"].items()], "",
    ]
    if evaluation:
        lines += [
            f"## Methods at {cfg.long_frames} frames on the held-out first frames", "",
            "World metrics (from the known dynamics; lower error and higher PSNR/presence are better):", "",
            "| method | " + " | ".join(WORLD_COLUMNS) + " |", "|---" * (len(WORLD_COLUMNS) + 1) + "|",
            *[_row(name, values, WORLD_COLUMNS) for name, values in evaluation["world"].items()], "",
            "Project evaluation metrics (`pipelines/evaluate`):", "",
            "| method | " + " | ".join(PROJECT_COLUMNS) + " |", "|---" * (len(PROJECT_COLUMNS) + 1) + "|",
            *[_row(name, values, PROJECT_COLUMNS) for name, values in evaluation["project"].items()], "",
            f"`{SHORT_BASE}`: the base model asked for {cfg.base_frames} frames (metrics over those frames), a "
            f"diagnostic of what the base model can do at all. `{CEILING}`: the true videos after a VAE round trip "
            "(8-frame windows), the best any model decoding through this VAE can score.", "",
            f"Contact sheet (`{Path(evaluation['contact_sheet']).name}`): per held-out video, every 4th frame of "
            f"the truth, then {CEILING}, " + ", ".join(METHODS) + ".", "",
            f"Motion bucket at generation: base methods {evaluation['motion_buckets']['base']} (median of the "
            f"{cfg.base_frames}-frame training clips), exvideo {evaluation['motion_buckets']['long']} (median of the "
            f"{cfg.long_frames}-frame clips). Report with contact sheets: `{_shown(evaluation['report'])}`.", "",
        ]
    return "\n".join(lines)


def _results_path(cfg: MiniatureConfig) -> Path:
    return cfg.results or cfg.workdir / "RESULTS.md"


def run_miniature(cfg: MiniatureConfig) -> dict:
    """Run (or resume) the whole experiment; write results.json and the markdown table; return the results."""
    timer = Timer()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:  # the caller's thread count back afterwards: a test session goes on with it
        models = build_models(cfg, timer)
        evaluation = generate_and_evaluate(cfg, models, timer) if cfg.generate else None
    finally:
        torch.set_num_threads(threads)
    results = {"config": cfg.model_dump(mode="json"), "validation_loss": models["validation_loss"],
               "vae_psnr": models["vae_psnr"], "evaluation": evaluation, "phases_s": timer.phases,
               "wall_s": timer.total}
    (cfg.workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = results_markdown(cfg, models, evaluation, timer)
    target = _results_path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".tmp").write_text(markdown)
    os.replace(target.with_suffix(".tmp"), target)
    print(markdown)
    return results

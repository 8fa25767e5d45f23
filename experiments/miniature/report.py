"""The miniature's results page and contact sheet, written from the run's results (nothing here is recomputed)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from experiments.miniature.run import (
    BASELINES, CEILING, METHODS, SHORT_BASE, VALIDATION_MODELS, MiniatureConfig, video_path)
from experiments.miniature.statistics import Estimate, bootstrap, paired_difference
from experiments.miniature.world import read_truth, render

# Metric -> +1 when higher is better, -1 when lower is better.
DIRECTION = {"position_error_px": -1, "position_error_px.last": -1, "present_fraction": 1, "survives": 1,
             "psnr_to_truth": 1, "psnr_to_truth.last": 1}
VAE_PRESENCE, BASE_PRESENCE, BASE_ERROR_PX, TINT_LEVELS = 0.98, 0.90, 3.0, 2.0


def _cell(estimate: Estimate) -> str:
    if not np.isfinite(estimate.mean):
        return "n/a"
    return f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *["| " + " | ".join(r) + " |" for r in rows]]


def _hardware(cfg: MiniatureConfig) -> str:
    if cfg.use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def _scores(results: dict, label: str) -> dict[str, np.ndarray]:
    return {key: np.array(table, dtype=float) for key, table in results["scores"][label]["scores"].items()}


def _tint(cfg: MiniatureConfig, vae_rows: dict) -> tuple[float, float]:
    """Mean colour shift (RGB levels) of the VAE round trip at the first frame of each decode window, and elsewhere."""
    shifts = np.array([row["colour_shift"] for row in vae_rows.values()])
    starts = np.zeros(shifts.shape[1], dtype=bool)
    starts[::cfg.base_frames // 2] = True
    return float(shifts[:, starts].mean()), float(shifts[:, ~starts].mean())


def ceiling_lines(cfg: MiniatureConfig, results: dict) -> list[str]:
    vae_rows = results["vae_ceiling"]
    vae = {key: bootstrap(np.array([[row[key]] for row in vae_rows.values()]), cfg.resamples)
           for key in DIRECTION}
    short = {key: bootstrap(table, cfg.resamples) for key, table in _scores(results, SHORT_BASE).items()}
    at_starts, elsewhere = _tint(cfg, vae_rows)
    vae_met = vae["present_fraction"].mean >= VAE_PRESENCE and at_starts - elsewhere <= TINT_LEVELS
    base_met = (short["present_fraction"].mean >= BASE_PRESENCE
                and short["position_error_px"].mean <= BASE_ERROR_PX)
    columns = ["present_fraction", "position_error_px", "survives", "psnr_to_truth"]
    return [
        "## Ceilings", "",
        f"Means over {cfg.heldout_videos} held-out videos (x {cfg.replicates} sampling seeds for the base), "
        "95% bootstrap intervals over videos.", "",
        *_table(["row", *columns, "goal", "met"], [
            [f"{CEILING} ({cfg.long_frames} frames)", *[_cell(vae[c]) for c in columns],
             f"presence >= {VAE_PRESENCE}, no tint at window starts", "yes" if vae_met else "**no**"],
            [f"{SHORT_BASE} ({cfg.base_frames} frames)", *[_cell(short[c]) for c in columns],
             f"presence >= {BASE_PRESENCE}, error <= {BASE_ERROR_PX} px", "yes" if base_met else "**no**"]]), "",
        f"Tint: the VAE round trip shifts a frame's mean colour by {at_starts:.2f} RGB levels at the first frame of "
        f"each decode window ({cfg.base_frames}-frame windows every {cfg.base_frames // 2} frames, as generation "
        f"decodes) and by {elsewhere:.2f} elsewhere (goal: at most {TINT_LEVELS} more at window starts).", "",
    ]


def validation_lines(cfg: MiniatureConfig, results: dict) -> list[str]:
    losses = {name: np.array(table, dtype=float) for name, table in results["validation"]["losses"].items()}
    tuned, base = losses[VALIDATION_MODELS[2]], losses[VALIDATION_MODELS[0]]
    difference = paired_difference(tuned, np.repeat(base, tuned.shape[1], axis=1), cfg.resamples)
    return [
        f"## Long-clip ({cfg.long_frames} frames) validation loss", "",
        f"{results['validation']['clips']} held-out clips x {cfg.val_levels} noise levels, the same noise for every "
        "model; post-tuned: one model per replicate (post-tuning seed).", "",
        *_table(["model", "loss [95% CI]", "per replicate"], [
            [name, _cell(est := bootstrap(table, cfg.resamples)), ", ".join(f"{m:.4f}" for m in est.per_replicate)]
            for name, table in losses.items()]),
        "", f"Post-tuned minus base, paired by clip: {_cell(difference)}.", "",
    ]


def verdict(cfg: MiniatureConfig, results: dict) -> tuple[list[str], list[str]]:
    """Paired differences exvideo - each baseline (table lines) and one sentence per baseline (verdict lines)."""
    ours = _scores(results, "exvideo")
    rows, sentences = [], []
    for baseline in BASELINES:
        theirs = _scores(results, baseline)
        better, worse = [], []
        cells = []
        for key, sign in DIRECTION.items():
            estimate = paired_difference(ours[key], theirs[key], cfg.resamples)
            cells.append(_cell(estimate))
            if estimate.excludes_zero():
                (better if np.sign(estimate.mean) == sign else worse).append(key)
        rows.append([f"exvideo - {baseline}", *cells])
        sentences.append(f"- Against `{baseline}`: better on {', '.join(better) or 'no metric'}; worse on "
                         f"{', '.join(worse) or 'no metric'}; no difference established on the rest.")
    return _table(["difference", *DIRECTION], rows), sentences


def comparison_lines(cfg: MiniatureConfig, results: dict) -> list[str]:
    table = {label: {key: bootstrap(values, cfg.resamples) for key, values in _scores(results, label).items()}
             for label in METHODS}
    differences, sentences = verdict(cfg, results)
    frames = [0, *range(cfg.base_frames // 2 - 1, cfg.long_frames, cfg.base_frames // 2)]
    curves = results["scores"]
    return [
        f"## Methods at {cfg.long_frames} frames ({cfg.long_frames // cfg.base_frames}x the base length)", "",
        f"{cfg.heldout_videos} held-out first frames x {cfg.replicates} replicates; mean [95% bootstrap interval "
        "over videos]. Lower error, higher presence, survival and PSNR are better.", "",
        *_table(["method", *DIRECTION], [[label, *[_cell(table[label][k]) for k in DIRECTION]] for label in METHODS]),
        "", "Per replicate (presence; position error px):", "",
        *_table(["method", *[f"replicate {r}" for r in range(cfg.replicates)]], [
            [label, *[f"{p:.3f}; {e:.2f}" for p, e in zip(table[label]["present_fraction"].per_replicate,
                                                        table[label]["position_error_px"].per_replicate)]]
            for label in METHODS]), "",
        "Paired differences (same first frame, same sampling noise), 95% bootstrap interval:", "",
        *differences, "",
        "### Verdict (from the intervals: a difference counts where its interval excludes zero)", "", *sentences, "",
        "### Per-frame curves (all videos and replicates)", "",
        *_table(["frame", *[f"{label} presence" for label in METHODS], *[f"{label} error" for label in METHODS]], [
            [str(t + 1), *[f"{curves[label]['presence_by_frame'][t]:.2f}" for label in METHODS],
             *[f"{curves[label]['error_by_frame'][t]:.1f}" for label in METHODS]] for t in frames]), "",
    ]


def write_results(cfg: MiniatureConfig, results: dict, path: Path) -> Path:
    """Write the results page of whatever phases the run reached."""
    base, compute_min = results["base"], sum(results["phases_s"].values()) / 60
    lines = [
        "# Miniature ExVideo experiment: results", "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {_hardware(cfg)}; torch {torch.__version__}. "
        f"Compute, every phase's own time summed over the invocations that ran it: {compute_min:.1f} min; this "
        f"invocation's wall time {results['invocation']['wall_s'] / 60:.1f} min. Command: "
        "`python -m experiments.miniature " + " ".join(sys.argv[1:]) + "`.", "",
        "## Setup", "",
        f"- World: {cfg.size}x{cfg.size} px, {cfg.fps} fps; {cfg.train_videos} training videos, "
        f"{cfg.heldout_videos} held-out (seeds {cfg.heldout_seeds[0]}..{cfg.heldout_seeds[-1]}).",
        f"- VAE: SVD's temporal-decoder VAE class, 4x downsampling, trained here {cfg.vae_steps} steps.",
        f"- Base model: tiny SVD UNet trained from scratch on {cfg.base_frames}-frame clips, every weight, "
        f"{cfg.base_steps} steps x {cfg.base_batch} clips, lr {cfg.base_lr}; mean training loss over its last "
        f"steps {base['final_loss']:.4f}.",
        f"- ExVideo post-tuning to {cfg.long_frames} frames, temporal modules only, {cfg.post_steps} steps x "
        f"{cfg.post_batch} clips, lr {cfg.post_lr}, once per replicate (seeds {cfg.seed}..{cfg.seed + cfg.replicates - 1}).",
        f"- Generation: {cfg.gen_steps} Euler steps, no CFG, noise_aug 0; replicate r samples every method with the "
        f"same noise per first frame. Motion bucket: base methods {results['motion_buckets']['base']}, exvideo "
        f"{results['motion_buckets']['long']} (medians of their training clips).", "",
        "Phase times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["phases_s"].items()) + ".", "",
        *ceiling_lines(cfg, results),
    ]
    if "validation" in results:
        lines += validation_lines(cfg, results)
    if "exvideo" in results["scores"]:
        lines += comparison_lines(cfg, results)
        lines += [f"Contact sheet (`contact_sheet.png`): for 3 held-out videos, every 4th frame of the truth, then "
                  f"{CEILING}, then each of {', '.join(METHODS)} (replicate 0), each strip 2x enlarged.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def write_contact_sheet(cfg: MiniatureConfig, work: Path, path: Path, videos: int = 3, every: int = 4) -> Path:
    """One PNG: per held-out video, strips of every `every`-th frame of the truth, the VAE round trip and each
    method's replicate-0 video; a white gap between videos."""
    import PIL.Image

    from pipelines.evaluate.videos import read_frames

    strips = []
    for row_id, video in list(read_truth(work / "world" / "first_frames").items())[:videos]:
        sources = [render(video, cfg.long_frames), read_frames(work / "ceilings" / "vae" / f"{row_id}.mp4"),
                   *(read_frames(video_path(work, method, 0, row_id)) for method in METHODS)]
        strips += [np.concatenate(list(frames[::every]), axis=1).repeat(2, 0).repeat(2, 1) for frames in sources]
        strips.append(np.full((6, strips[-1].shape[1], 3), 255, np.uint8))
    tmp = path.with_name(f".{path.name}.tmp")
    PIL.Image.fromarray(np.concatenate(strips[:-1], axis=0)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path

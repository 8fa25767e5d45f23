"""The miniature experiment: its world, its metrics, base training (trainable=all), and a miniature run end to end
whose post-tuning must lower the long-clip validation loss of the base model."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from exvideo import prepare_for_post_tuning, tiny_svd_components
from exvideo.unet import cyclic_position_ids, extend_unet
from experiments.miniature.run import (
    METHODS, SHORT_BASE, VALIDATION_MODELS, MiniatureConfig, check_workdir, run_miniature)
from experiments.miniature.statistics import bootstrap, paired_difference
from experiments.miniature.world import read_truth, render, sample_video, write_first_frames
from experiments.miniature.world_metrics import frame_scores, world_metrics
from exvideo.config import ConfigError
from pipelines.train.state import checkpoint_metadata, checkpoint_tensors, load_unet_weights


def test_world_is_deterministic_and_bounces_inside_the_frame():
    video = sample_video(7)
    assert video == sample_video(7) and video != sample_video(8)
    frames = render(video, 40)
    assert frames.shape == (40, 32, 32, 3) and np.array_equal(frames, render(video, 40))
    positions = video.positions(40)
    assert positions.min() >= video.radius and positions.max() <= video.size - video.radius
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    assert np.all(steps <= video.speed + 1e-4)  # a bounce shortens a step, never lengthens it
    assert steps.max() == pytest.approx(video.speed, abs=1e-4)


def test_colour_fixes_the_direction():
    by_colour = {}
    for seed in range(60):
        video = sample_video(seed)
        by_colour.setdefault(video.colour_index, set()).add(tuple(np.round(video.velocity, 6)))
    assert len(by_colour) >= 5 and all(len(velocities) == 1 for velocities in by_colour.values())


def test_world_metrics_score_truth_and_failures():
    video = sample_video(3)
    truth = render(video, 32)
    perfect = world_metrics(truth, video)
    assert perfect["position_error_px"] < 1 and perfect["survives"] == 1 and perfect["present_fraction"] == 1
    frozen = np.repeat(truth[:1], 32, axis=0)
    stuck = world_metrics(frozen, video)
    assert stuck["position_error_px.last"] > 10 and stuck["psnr_to_truth.last"] < perfect["psnr_to_truth.last"]
    gone = world_metrics(np.full_like(truth, 128), video)
    assert gone["survives"] == 0 and gone["present_fraction"] == 0 and np.isnan(gone["position_error_px"])
    with pytest.raises(ValueError, match="32x32"):
        world_metrics(truth[:, :16, :16], video)
    shift = frame_scores(truth, video)["colour_shift"]
    assert shift.shape == (32,) and np.all(shift == 0)
    assert frame_scores(np.clip(truth.astype(int) + 10, 0, 255).astype(np.uint8), video)["colour_shift"].min() > 5


def test_first_frames_and_truth(tmp_path):
    images = write_first_frames(tmp_path, [11, 12])
    assert list(images) == ["world_000011", "world_000012"] and all((tmp_path / f).is_file() for f in images.values())
    assert read_truth(tmp_path)["world_000012"] == sample_video(12)


def test_bootstrap_interval_and_paired_difference():
    rng = np.random.default_rng(0)
    scores = rng.normal(1.0, 0.5, size=(64, 3))
    estimate = bootstrap(scores, resamples=2000)
    assert estimate.mean == pytest.approx(scores.mean())
    assert estimate.low < estimate.mean < estimate.high and estimate.high - estimate.low < 0.4
    assert estimate.per_replicate == pytest.approx(tuple(scores.mean(axis=0)))
    # A NaN cell (object never found) is left out of every mean, not counted as zero.
    with_gap = scores.copy()
    with_gap[0, 0] = np.nan
    assert bootstrap(with_gap).mean == pytest.approx(np.nanmean(with_gap))
    same = paired_difference(scores, scores)
    assert (same.mean, same.low, same.high) == (0, 0, 0) and not same.excludes_zero()
    assert paired_difference(scores + 0.3, scores).excludes_zero()
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(scores, scores[:, :2])
    with pytest.raises(ValueError, match="videos, replicates"):
        bootstrap(scores[:, 0])


def test_workdir_refuses_other_output_values(tmp_path):
    check_workdir(MiniatureConfig(workdir=tmp_path), tmp_path)
    # How it runs may change between invocations; what it makes may not.
    check_workdir(MiniatureConfig(workdir=tmp_path, gen_workers=1, resamples=500, stop_after="ceilings"), tmp_path)
    with pytest.raises(ConfigError, match="base_steps, post_lr .*base_steps=1500"):
        check_workdir(MiniatureConfig(workdir=tmp_path, base_steps=10, post_lr=1e-3), tmp_path)


def test_cyclic_table_for_a_short_base():
    assert cyclic_position_ids(14, base_frames=8, low=4) == [0, 1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 5, 6, 7]
    unet = extend_unet(tiny_svd_components().unet, 12, base_frames=8)
    table = next(m for m in unet.modules() if hasattr(m, "time_proj") and hasattr(m.time_proj, "embeddings"))
    assert torch.equal(table.time_proj.embeddings[8], table.time_proj.embeddings[6])


def test_trainable_all_trains_every_weight_and_checkpoints_them():
    unet = tiny_svd_components().unet
    trainable = prepare_for_post_tuning(unet, 8, "fp32", False, "cpu", mode="all")
    assert len(trainable) == len(list(unet.parameters())) and all(p.requires_grad for p in unet.parameters())
    assert checkpoint_metadata(unet, "base", {})["format"] == "exvideo-unet-weights"
    tensors = {k: v.clone() + 1 for k, v in checkpoint_tensors(unet).items()}
    other = tiny_svd_components(seed=1).unet
    load_unet_weights(other, tensors)
    assert all(torch.equal(p, tensors[k]) for k, p in other.named_parameters())
    tensors.pop("conv_in.weight")
    with pytest.raises(ValueError, match="missing \\['conv_in.weight'\\]"):
        load_unet_weights(other, tensors)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_miniature_end_to_end(tmp_path):
    cfg = MiniatureConfig(workdir=tmp_path / "mini", train_videos=8, heldout_videos=2, replicates=2, vae_steps=10,
                          base_steps=10, post_steps=10, post_lr=1e-3, val_levels=2, gen_steps=2, resamples=200,
                          gen_workers=1)
    threads = torch.get_num_threads()
    results = run_miniature(cfg)
    assert torch.get_num_threads() == threads  # the session's tests after it keep their thread count
    # Same held-out clips, noise levels and noise before and after: every replicate's post-tuning must have learnt
    # the long clips, and the two replicates (post-tuning seeds) must differ.
    losses = {name: np.array(table) for name, table in results["validation"]["losses"].items()}
    base, extended, tuned = (losses[name] for name in VALIDATION_MODELS)
    assert base.shape == extended.shape == (2, 1) and tuned.shape == (2, 2)
    assert np.all(tuned.mean(axis=0) < base.mean()) and np.all(tuned.mean(axis=0) < extended.mean())
    assert tuned[0, 0] != tuned[0, 1]
    # Every (method, replicate, video) made and scored; the ceilings scored per video.
    assert set(results["scores"]) == {*METHODS, SHORT_BASE}
    for label, entry in results["scores"].items():
        assert np.array(entry["scores"]["present_fraction"]).shape == (2, 2)
        frames = cfg.base_frames if label == SHORT_BASE else cfg.long_frames
        assert len(entry["presence_by_frame"]) == frames
    assert len(list((cfg.workdir / "generate" / "baselines" / "videos").glob("*.mp4"))) == 3 * 2 * 2
    assert len(results["vae_ceiling"]) == 2
    # A replicate's sampling noise is the same for every method and differs between replicates.
    rows = [json.loads(line) for line in (cfg.workdir / "world" / "first_frames" / "rows-baselines.jsonl").open()]
    seeds = {(row["method"], row["id"].split("-")[1], row["id"][-2:]): row["seed"] for row in rows}
    assert seeds[("direct", "world_500000", "r1")] == seeds[("chain", "world_500000", "r1")]
    assert seeds[("direct", "world_500000", "r0")] != seeds[("direct", "world_500000", "r1")]
    page = (cfg.workdir / "RESULTS.md").read_text()
    for heading in ("## Ceilings", "## Long-clip (32 frames) validation loss", "### Verdict", "| exvideo - chain |"):
        assert heading in page
    sheet = PIL.Image.open(cfg.workdir / "contact_sheet.png")
    # 2 videos x 6 strips of 2x-enlarged 32 px frames, a 6 px gap between videos; every 4th of 32 frames.
    assert sheet.size == (8 * 64, 2 * 6 * 64 + 6)
    # A rerun finds every phase done: nothing runs, the same results.
    again = run_miniature(cfg)
    assert again["invocation"]["phases_s"] == {}
    assert again["validation"] == results["validation"] and again["scores"] == results["scores"]

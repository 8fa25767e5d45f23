"""The miniature experiment: its world, its metrics, base training (trainable=all), and a miniature run end to end
whose post-tuning must lower the long-clip validation loss of the base model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exvideo import prepare_for_post_tuning, tiny_svd_components
from exvideo.unet import cyclic_position_ids, extend_unet
from experiments.miniature.run import CEILING, METHODS, SHORT_BASE, MiniatureConfig, run_miniature
from experiments.miniature.world import read_truth, render, sample_video, write_first_frames
from experiments.miniature.world_metrics import world_metrics
from pipelines.train.state import checkpoint_metadata, checkpoint_tensors, load_unet_weights


def test_world_is_deterministic_and_bounces_inside_the_frame():
    video = sample_video(7)
    assert video == sample_video(7) and video != sample_video(8)
    frames = render(video, 40)
    assert frames.shape == (40, 64, 64, 3) and np.array_equal(frames, render(video, 40))
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
    with pytest.raises(ValueError, match="64x64"):
        world_metrics(truth[:, :32, :32], video)


def test_first_frames_listing_and_truth(tmp_path):
    listing = write_first_frames(tmp_path, [11, 12])
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and all((tmp_path / r["image"]).is_file() for r in rows)
    assert read_truth(tmp_path)[rows[1]["id"]] == sample_video(12)


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
def test_miniature_end_to_end_post_tuning_lowers_long_clip_loss(tmp_path):
    cfg = MiniatureConfig(workdir=tmp_path / "mini", train_videos=8, heldout_videos=1, vae_steps=10,
                          base_steps=20, post_steps=20, post_lr=3e-4, val_levels=4, gen_steps=2)
    threads = torch.get_num_threads()
    results = run_miniature(cfg)
    assert torch.get_num_threads() == threads  # the session's tests after it keep their thread count
    losses = results["validation_loss"]
    # Same held-out clips, noise levels and noise before and after: post-tuning must have learnt the long clips.
    assert losses["exvideo post-tuned"] < losses["base"]
    assert losses["exvideo post-tuned"] < losses["base, extended (identity init)"]
    evaluation = results["evaluation"]
    assert set(evaluation["project"]) == set(METHODS)
    assert set(evaluation["world"]) == {*METHODS, SHORT_BASE, CEILING}
    assert all(group["videos"] == 1 for group in evaluation["project"].values())
    for method in METHODS:
        assert len(list((cfg.workdir / "generate" / method / "videos").glob("*.mp4"))) == 1
    table = (cfg.workdir / "RESULTS.md").read_text()
    assert "| exvideo post-tuned |" in table and "| windows |" in table
    assert (cfg.workdir / "evaluate" / "report" / "index.html").is_file()
    assert (cfg.workdir / "contact_sheet.png").stat().st_size > 0
    # A rerun finds every phase done: the same validation losses, nothing retrained.
    again = run_miniature(cfg)
    assert again["validation_loss"] == losses

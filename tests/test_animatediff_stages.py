"""AnimateDiff through preprocessing and training: real mp4s, real decord, a real local Ray, real tar shards and a
tiny random AnimateDiff of the real diffusers classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from exvideo import extend_unet, freeze_for_post_tuning, load_adapter
from exvideo.adapter import read_adapter
from exvideo.motion_models import load_motion_unet, load_scheduler
from exvideo.motion_objective import noise_prediction_loss
from exvideo.samples import SampleFormatError, collate, decode_sample, encode_sample
from pipelines.train import TrainConfig, run_training
from pipelines.train.data import list_shards, rank_stream
from pipelines.train.loop import weights_fingerprint
from preprocessing.config import PreprocessConfig
from preprocessing.encode import TextClipEncoder, encoder_fingerprint
from preprocessing.run import run_preprocess
from tests.test_preprocess_pipeline import BROKEN, read_tars

GOOD = {"videos/calm_square.mp4", "videos/fast_wide.mp4", "videos/big_frame.mp4", "videos/portrait.mp4"}
UNCAPTIONED = "videos/medium_long.mp4"


def preprocess_config(manifest: Path, model: Path, output: Path, **fields) -> PreprocessConfig:
    return PreprocessConfig(input=str(manifest), output=output, model=model, num_frames=8, frame_stride=2,
                            height=64, width=64, progress=False, **fields)


@pytest.fixture(scope="module")
def shards(ray_local, synthetic_corpus, tiny_animatediff_dir, tmp_path_factory):
    cfg = preprocess_config(synthetic_corpus, tiny_animatediff_dir, tmp_path_factory.mktemp("ad") / "shards")
    return cfg, run_preprocess(cfg)


def test_shards_hold_latents_and_caption_embeddings_and_uncaptioned_sources_are_ledgered(shards,
                                                                                           tiny_animatediff_dir):
    cfg, manifest = shards
    samples = read_tars(cfg.output)
    assert manifest["config"]["family"] == "animatediff" and manifest["counts"]["samples"] == len(GOOD) == len(samples)
    encoder = TextClipEncoder(cfg.model_copy(update={"family": "animatediff"}), "cpu", "x", "x")
    fingerprint = encoder_fingerprint(tiny_animatediff_dir, "animatediff")
    for key, entries in samples.items():
        assert sorted(entries) == ["json", "latents.npy", "text_embeds.npy"]
        clip = decode_sample({"__key__": key, **entries})
        assert clip.record.model_family == "animatediff" and clip.record.source in GOOD
        assert clip.latents.shape == (8, 4, 8, 8) and clip.latents.dtype == np.float16
        assert clip.text_embeds.shape == (77, 16) and clip.cond_latent is None and clip.image_embeds is None
        assert clip.record.encoder_fingerprint == fingerprint
        assert clip.record.vae_scaling_factor == pytest.approx(0.18215)
        # The caption's embedding, as the encoder computes it for that caption alone.
        np.testing.assert_allclose(clip.text_embeds.astype(np.float32),
                                   encoder.encode_text(clip.record.caption).numpy(), rtol=2e-3, atol=2e-3)
    ledger = {row["source"]: row for row in pq.read_table(cfg.output / "failures.parquet").to_pylist()}
    assert ledger[UNCAPTIONED]["reason_code"] == "no_caption" and ledger[UNCAPTIONED]["stage"] == "prepare"
    assert "default_prompt" in ledger[UNCAPTIONED]["reason"]
    assert {source: ledger[source]["reason_code"] for source in BROKEN} == BROKEN


def test_a_default_prompt_captions_sources_without_one(ray_local, synthetic_corpus, tiny_animatediff_dir, tmp_path):
    entries = [e for e in json.loads(synthetic_corpus.read_text())
               if e["path"] in (UNCAPTIONED, "videos/calm_square.mp4")]
    manifest = synthetic_corpus.parent / "two.json"
    manifest.write_text(json.dumps(entries))
    cfg = preprocess_config(manifest, tiny_animatediff_dir, tmp_path / "out", default_prompt="a moving shape")
    assert run_preprocess(cfg)["counts"]["samples"] == 2
    captions = {decode_sample({"__key__": k, **e}).record.source: decode_sample({"__key__": k, **e}).record.caption
                for k, e in read_tars(cfg.output).items()}
    assert captions[UNCAPTIONED] == "a moving shape" and len(set(captions.values())) == 2


def test_a_clip_missing_its_family_entries_is_refused_by_name(shards):
    cfg, _ = shards
    key, entries = next(iter(read_tars(cfg.output).items()))
    with pytest.raises(SampleFormatError, match=r"\(animatediff\) lacks \['text_embeds.npy'\]"):
        decode_sample({"__key__": key, **{k: v for k, v in entries.items() if k != "text_embeds.npy"}})
    clip = decode_sample({"__key__": key, **entries})
    assert decode_sample(encode_sample(clip)).text_embeds.tobytes() == clip.text_embeds.tobytes()


def fixed_loss(unet, scheduler, clips) -> float:
    """The loss at fixed timesteps and noise: comparable before and after training."""
    batch = collate(clips)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return noise_prediction_loss(unet, scheduler, batch, timesteps=torch.tensor([500] * len(clips)),
                                     noise=noise).item()


def test_short_post_tuning_lowers_the_loss_and_keeps_frozen_weights(shards, tiny_animatediff_dir, tmp_path):
    preprocessed, _ = shards
    cfg = TrainConfig(svd_dir=tiny_animatediff_dir, shards=str(preprocessed.output / "shards"),
                      storage_path=tmp_path / "runs", name="ad", num_frames=32, max_steps=12, checkpoint_every=6,
                      log_every=4, lr=2e-3, ema_decay=None, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="cond_dropout 0.1 drops SVD's image conditioning"):
        run_training(cfg.model_copy(update={"cond_dropout": 0.1}))
    result = run_training(cfg)
    assert result.steps == 12

    _, metadata = read_adapter(result.adapter)
    assert metadata["family"] == "animatediff"
    base = load_motion_unet(tiny_animatediff_dir)
    extend_unet(base, 32)
    freeze_for_post_tuning(base)
    replica = json.loads((result.checkpoint_dir / "replica-0.json").read_text())
    assert replica["frozen"] == replica["frozen_at_start"] == weights_fingerprint(
        p for p in base.parameters() if not p.requires_grad)

    clips = [clip for _, clip in zip(range(len(GOOD)), rank_stream(list_shards(cfg.shards), 0, 1, 0))]
    scheduler = load_scheduler(tiny_animatediff_dir)
    before = fixed_loss(base, scheduler, clips)
    load_adapter(base, result.adapter)  # strict: names, shapes and family checked
    assert fixed_loss(base, scheduler, clips) < before


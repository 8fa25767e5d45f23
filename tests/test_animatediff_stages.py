"""The AnimateDiff family through every stage: one run of its demo workflow (`exvideo demo --set family=animatediff`)
on real mp4s, real decord, a real local Ray, real tar shards, a real MLflow store and a tiny random AnimateDiff of
the real diffusers classes, whose preprocess, train, generate and evaluate outputs the tests check in turn."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
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
from orchestration.cli import main
from pipelines.train import TrainConfig, run_training
from pipelines.train.data import list_shards, rank_stream
from pipelines.train.loop import weights_fingerprint
from preprocessing.config import PreprocessConfig
from exvideo.families import encoder_fingerprint
from preprocessing.encode import TextClipEncoder
from preprocessing.prepare import prepare_source
from tests.test_preprocess_pipeline import BROKEN, read_tars

GOOD = {"videos/calm_square.mp4", "videos/fast_wide.mp4", "videos/big_frame.mp4", "videos/portrait.mp4"}
UNCAPTIONED = "videos/medium_long.mp4"  # the synthetic corpus's video without a caption
DEFAULT_PROMPT = "a moving shape"  # configs/demo_animatediff.yaml's preprocess.default_prompt
SHRINK = ["preprocess.num_frames=8", "train.num_frames=32", "train.max_steps=12", "train.checkpoint_every=6",
          "train.log_every=4", "train.lr=2e-3", "generate.params.num_frames=32", "generate.params.steps=2"]


@pytest.fixture(scope="module")
def demo(ray_local, tiny_animatediff_dir, tmp_path_factory) -> dict:
    """The family's demo, shrunk: its console output and each stage's folder."""
    workdir = tmp_path_factory.mktemp("animatediff") / "demo"
    shutil.copytree(tiny_animatediff_dir, workdir / "tiny-animatediff")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--set", "family=animatediff", "--set", f"workdir={workdir}",
                     "--set", f"spec_overrides=[{', '.join(SHRINK)}]"])
    out = printed.getvalue()
    assert code == 0, out[-3000:]
    folders = {stage: Path(re.search(rf"^  {stage} +ran +(\S+)$", out, re.M).group(1))
               for stage in ("preprocess", "train", "generate", "evaluate")}
    return {"out": out, "workdir": workdir, **folders}


def test_shards_hold_latents_and_caption_embeddings(demo, tiny_animatediff_dir):
    run = json.loads((demo["preprocess"] / "run.json").read_text())
    samples = read_tars(demo["preprocess"])
    assert run["config"]["family"] == "animatediff" and run["counts"]["samples"] == len(GOOD) + 1 == len(samples)
    cfg = PreprocessConfig.model_validate(run["config"])
    encoder = TextClipEncoder(cfg, "cpu", "x", "x")
    fingerprint = encoder_fingerprint(tiny_animatediff_dir, "animatediff")
    captions = {}
    for key, entries in samples.items():
        assert sorted(entries) == ["json", "latents.npy", "text_embeds.npy"]
        clip = decode_sample({"__key__": key, **entries})
        assert clip.record.model_family == "animatediff" and clip.record.encoder_fingerprint == fingerprint
        assert clip.latents.shape == (8, 4, 8, 8) and clip.latents.dtype == np.float16
        assert clip.text_embeds.shape == (77, 16) and clip.cond_latent is None and clip.image_embeds is None
        assert clip.record.vae_scaling_factor == pytest.approx(0.18215)
        # The caption's embedding, as the encoder computes it for that caption alone.
        np.testing.assert_allclose(clip.text_embeds.astype(np.float32),
                                   encoder.encode_text(clip.record.caption).numpy(), rtol=2e-3, atol=2e-3)
        captions[clip.record.source] = clip.record.caption
    # The source without a caption took the spec's default prompt; the others kept their own.
    assert captions[UNCAPTIONED] == DEFAULT_PROMPT and len(set(captions.values())) == len(GOOD) + 1
    ledger = {row["source"]: row["reason_code"] for row in
              pq.read_table(demo["preprocess"] / "failures.parquet").to_pylist()}
    assert ledger == BROKEN


def test_without_a_default_prompt_an_uncaptioned_source_fails_before_decoding(synthetic_corpus, tiny_animatediff_dir):
    cfg = PreprocessConfig(input=str(synthetic_corpus), output=Path("unused"), model=tiny_animatediff_dir,
                           family="animatediff", num_frames=8)
    # The uri names no file: the source must fail for its caption before anything opens it.
    (row,) = prepare_source({"source": UNCAPTIONED, "uri": "/nonexistent.mp4", "caption": ""}, cfg)
    assert (row["stage"], row["reason_code"], row["last_of_source"]) == ("prepare", "no_caption", True)
    assert "preprocess.default_prompt" in row["reason"]
    captioned = prepare_source({"source": UNCAPTIONED, "uri": "/nonexistent.mp4", "caption": "x"}, cfg)
    assert captioned[0]["reason_code"] == "missing_file"
    (row,) = prepare_source({"source": "a.mp4", "uri": "/nonexistent.mp4", "caption": ""},
                            cfg.model_copy(update={"family": "svd"}))
    assert row["reason_code"] == "missing_file"  # SVD needs no caption


def test_a_clip_missing_its_family_entries_is_refused_by_name(demo):
    key, entries = next(iter(read_tars(demo["preprocess"]).items()))
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


def test_post_tuning_lowered_the_loss_and_kept_frozen_weights(demo, tiny_animatediff_dir):
    run_dir = demo["train"] / "train"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 12
    _, metadata = read_adapter(run_dir / "adapter.safetensors")
    assert metadata["family"] == "animatediff"
    base = load_motion_unet(tiny_animatediff_dir)
    extend_unet(base, 32)
    freeze_for_post_tuning(base)
    replica = json.loads((Path(result["checkpoint_dir"]) / "replica-0.json").read_text())
    assert replica["frozen"] == replica["frozen_at_start"] == weights_fingerprint(
        p for p in base.parameters() if not p.requires_grad)

    shards = str(demo["preprocess"] / "shards")
    clips = [clip for _, clip in zip(range(len(GOOD) + 1), rank_stream(list_shards(shards), 0, 1, 0))]
    scheduler = load_scheduler(tiny_animatediff_dir)
    before = fixed_loss(base, scheduler, clips)
    load_adapter(base, run_dir / "adapter.safetensors")  # strict: names, shapes and family checked
    assert fixed_loss(base, scheduler, clips) < before


def test_training_refuses_dropout_and_shards_of_the_other_family(demo, tiny_animatediff_dir, tiny_svd_dir,
                                                                  tmp_path):
    from tests.test_train import write_shards

    runs, ad_shards = tmp_path / "runs", str(demo["preprocess"] / "shards")
    cfg = TrainConfig(svd_dir=tiny_animatediff_dir, shards=ad_shards, storage_path=runs, cond_dropout=0.1)
    with pytest.raises(ValueError, match="cond_dropout 0.1 drops SVD's image conditioning"):
        run_training(cfg)
    with pytest.raises(ValueError, match=r"hold animatediff clips .* is a svd checkpoint"):
        run_training(cfg.model_copy(update={"svd_dir": tiny_svd_dir, "cond_dropout": 0.0}))
    write_shards(tmp_path / "svd-shards", num_shards=1, per_shard=1)
    with pytest.raises(ValueError, match=r"hold svd clips .* is a animatediff checkpoint"):
        run_training(cfg.model_copy(update={"shards": str(tmp_path / "svd-shards"), "cond_dropout": 0.0}))
    assert not runs.exists()  # refused before any run folder or MLflow store was made


def test_the_demo_generates_from_the_preprocessed_captions_and_evaluates(demo):
    out = demo["out"]
    records = [json.loads(path.read_text()) for path in sorted((demo["generate"] / "videos").glob("*.json"))]
    assert [r["id"] for r in records] == ["video0", "video1"]
    captions = {e["cap"] for e in json.loads((demo["workdir"] / "corpus" / "metadata.json").read_text())}
    for record in records:
        assert record["frames"] == 32 and (record["height"], record["width"]) == (64, 64)
        assert record["method"] == "exvideo" and record["source"]["prompt"] in captions | {DEFAULT_PROMPT}
        assert record["adapter"]["path"] == str(demo["train"] / "train" / "adapter.safetensors")
    assert Path(re.search(r"^  report +(\S+)$", out, re.M).group(1)).is_file()
    assert "CLIP consistency skipped" in (demo["evaluate"] / "report" / "index.html").read_text()


def test_the_spec_refuses_what_an_animatediff_model_cannot_do_before_any_stage(tiny_animatediff_dir, tmp_path):
    from exvideo.config import ConfigError
    from orchestration.demo import FAMILY_DEMOS
    from orchestration.spec import load_spec

    spec = FAMILY_DEMOS["animatediff"][0]
    paths = [f"workdir={tmp_path / 'work'}", f"model={tiny_animatediff_dir}", f"corpus={tmp_path / 'none.json'}"]
    with pytest.raises(ConfigError, match=r"method 'chain' is a SVD \(image-to-video\) method.*"
                                          r"train.cond_dropout 0.2 drops SVD's image conditioning"):
        load_spec(spec, [*paths, "generate.params.method=chain", "train.cond_dropout=0.2"])
    with pytest.raises(ConfigError, match="declares model family 'svd' but .* holds a AnimateDiffPipeline"):
        load_spec(spec, [*paths, "family=svd"])
    assert load_spec(spec, paths).model_family == "animatediff"
    assert not (tmp_path / "work").exists()

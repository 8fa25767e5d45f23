"""Preprocessing and re-sharding end to end: real mp4s (broken ones included), a real local Ray, real tar shards."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from exvideo.samples import decode_sample
from preprocessing.config import PreprocessConfig
from exvideo.families import encoder_fingerprint
from preprocessing.encode import ClipEncoder
from exvideo.outputs import OutputMismatchError
from preprocessing.config import ReshardConfig
from preprocessing.reshard import run_reshard
from preprocessing.run import run_preprocess
from preprocessing.shards import read_sample_entries

BROKEN = {"videos/missing.mp4": "missing_file", "videos/zero_bytes.mp4": "empty_file",
          "videos/not_a_video.mp4": "not_a_video", "videos/truncated.mp4": "corrupt_stream",
          "videos/too_short.mp4": "too_short", "videos/tiny.mp4": "too_small",
          "videos/vfr.mp4": "variable_frame_rate"}
COPIES = 6  # extra copies of the good videos: enough work that a run can be killed half-way


@pytest.fixture(scope="session")
def corpus(synthetic_corpus) -> Path:
    """The synthetic manifest plus copies of its good videos, and one duplicated row."""
    entries = json.loads(synthetic_corpus.read_text())
    good = [e for e in entries if e["path"] not in BROKEN]
    for n in range(COPIES):
        for entry in good:
            copy = entry["path"].replace(".mp4", f"_copy{n}.mp4")
            shutil.copy(synthetic_corpus.parent / entry["path"], synthetic_corpus.parent / copy)
            entries.append({"path": copy, "cap": entry["cap"]})
    entries.append(dict(good[0]))
    manifest = synthetic_corpus.parent / "corpus.json"
    manifest.write_text(json.dumps(entries))
    return manifest


def make_config(corpus: Path, model: Path, output: Path, **fields) -> PreprocessConfig:
    return PreprocessConfig(input=str(corpus), output=output, model=model, num_frames=8, frame_stride=2,
                            clips_per_video=2, height=64, width=64, shard_max_samples=4, progress=False, **fields)


@pytest.fixture(scope="session")
def preprocessed(ray_local, corpus, tiny_svd_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("preprocessed") / "out"
    cfg = make_config(corpus, tiny_svd_dir, output)
    return cfg, run_preprocess(cfg)


def read_tars(folder: Path) -> dict[str, dict]:
    """key -> raw entries of every sample in every tar, read with webdataset's own tar reader."""
    samples = {}
    for shard in sorted((folder / "shards").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            assert sample["__key__"] not in samples, f"duplicate key {sample['__key__']}"
            samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


def test_shards_decode_to_the_contract(preprocessed, tiny_svd_dir):
    cfg, manifest = preprocessed
    samples = read_tars(cfg.output)
    good_videos = 5 * (1 + COPIES)
    # Windows of 15 source frames: 24-frame videos give one clip, 30 and more give two.
    assert len(samples) == manifest["counts"]["samples"] == (3 * 2 + 2 * 1) * (1 + COPIES)
    assert manifest["counts"]["sources"] == good_videos + len(BROKEN) + 1
    fingerprint = encoder_fingerprint(tiny_svd_dir)
    for key, entries in samples.items():
        clip = decode_sample({"__key__": key, **entries})
        assert clip.latents.shape == (8, 4, 8, 8) and clip.latents.dtype == np.float16
        assert clip.cond_latent.shape == (4, 8, 8) and clip.image_embeds.shape == (1, 32)
        assert clip.record.config_hash == cfg.content_hash() and clip.record.encoder_fingerprint == fingerprint
        assert (clip.record.height, clip.record.width, clip.record.num_frames) == (64, 64, 8)
        # frame 0's unscaled latent is the scaled clip latent divided by the factor
        np.testing.assert_allclose(clip.cond_latent.astype(np.float32),
                                   clip.latents[0].astype(np.float32) / clip.record.vae_scaling_factor,
                                   rtol=2e-3, atol=2e-3)
    portrait = [decode_sample({"__key__": k, **e}).record for k, e in samples.items()
                if json.loads(e["json"])["source"] == "videos/portrait.mp4"]
    assert portrait[0].crop == [0, 16, 64, 64] and portrait[0].caption == "a tall phone video"


def test_latents_match_a_direct_encoder_call(preprocessed, tiny_svd_dir, synthetic_corpus):
    from preprocessing.decode import ClipDecoder
    from preprocessing.probe import VideoFile

    cfg, _ = preprocessed
    index = pq.read_table(cfg.output / "index.parquet").to_pylist()
    row = next(r for r in index if r["source"] == "videos/fast_wide.mp4" and r["clip_index"] == 1)
    decoder = ClipDecoder(VideoFile(str(synthetic_corpus.parent / "videos/fast_wide.mp4")), 96, 64, 64, 64)
    frames = decoder.clip(list(range(15, 30, 2)))
    latents, cond, embeds = ClipEncoder(cfg, "cpu", cfg.content_hash(), "x").encode_pixels(frames)
    clip = decode_sample(read_sample_entries(cfg.output / "shards" / row["shard"], row["offset"], row["bytes"]))
    # Same numbers up to float16 rounding of results that another process's thread count may order differently.
    np.testing.assert_allclose(clip.latents.astype(np.float32), latents.astype(np.float32), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(clip.image_embeds.astype(np.float32), embeds.astype(np.float32), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(clip.cond_latent.astype(np.float32), cond.astype(np.float32), rtol=2e-3, atol=1e-4)
    assert clip.record.frame_indices == list(range(15, 30, 2)) and clip.record.fps == 15.0


def test_index_and_stats_match_the_tars(preprocessed):
    cfg, manifest = preprocessed
    index = pq.read_table(cfg.output / "index.parquet").to_pylist()
    stats = pq.read_table(cfg.output / "shards.parquet").to_pylist()
    samples = read_tars(cfg.output)
    assert sorted(r["key"] for r in index) == sorted(samples)
    for row in index:
        entries = read_sample_entries(cfg.output / "shards" / row["shard"], row["offset"], row["bytes"])
        assert {k: v for k, v in entries.items() if k != "__key__"} == samples[row["key"]]
        record = json.loads(entries["json"])
        assert (record["source"], record["motion_bucket"]) == (row["source"], row["motion_bucket"])
    tars = sorted(p.name for p in (cfg.output / "shards").iterdir())
    assert tars == [s["shard"] for s in stats] and all(s["samples"] <= 4 for s in stats)
    assert sum(s["samples"] for s in stats) == len(index)
    assert all(s["bytes"] == (cfg.output / "shards" / s["shard"]).stat().st_size for s in stats)
    assert manifest["counts"]["bytes"] == sum(s["bytes"] for s in stats) and manifest["status"] == "complete"


def test_every_bad_input_is_in_the_ledger(preprocessed):
    cfg, manifest = preprocessed
    ledger = pq.read_table(cfg.output / "failures.parquet").to_pylist()
    by_source = {r["source"]: r for r in ledger if r["stage"] == "probe"}
    assert {s: r["reason_code"] for s, r in by_source.items()} == BROKEN
    assert all(r["reason"] for r in ledger)
    assert "3 frames" in by_source["videos/too_short.mp4"]["reason"]
    assert "16x16" in by_source["videos/tiny.mp4"]["reason"]
    duplicate, = [r for r in ledger if r["stage"] == "manifest"]
    assert duplicate["reason_code"] == "duplicate" and duplicate["source"] == "videos/calm_square.mp4"
    assert manifest["counts"]["failures_by_reason"] == {**{code: 1 for code in BROKEN.values()}, "duplicate": 1}


def test_rerun_is_a_no_op_and_other_configs_are_refused(preprocessed):
    cfg, first = preprocessed
    shards_before = {p.name: p.stat().st_mtime_ns for p in (cfg.output / "shards").iterdir()}
    again = run_preprocess(cfg.model_copy(update={"encode_batch_size": 2}))  # execution knobs may change
    assert again["this_invocation"]["sources_processed"] == 0 and again["counts"] == first["counts"]
    assert {p.name: p.stat().st_mtime_ns for p in (cfg.output / "shards").iterdir()} == shards_before
    with pytest.raises(OutputMismatchError, match=r"num_frames: 8 -> 6.*new output folder"):
        run_preprocess(cfg.model_copy(update={"num_frames": 6}))


def test_an_encoder_pool_that_leaves_no_cpu_to_decode_is_refused(preprocessed, tmp_path):
    """Two encoders on the session's 2-CPU Ray would take both CPUs and wait forever for a decode task."""
    cfg, _ = preprocessed
    crowded = cfg.model_copy(update={"output": tmp_path / "crowded", "encode_actors": 2})
    with pytest.raises(ValueError, match=r"^preprocess needs 3 CPU \(the cluster has 2\) for encode_actors 2 \(one "
                                         r"CPU each\) and one CPU to decode, more than this machine's Ray will ever "
                                         r"have: lower them, or set ray_address to a larger cluster$"):
        run_preprocess(crowded)
    manifest = json.loads((crowded.output / "run.json").read_text())
    assert manifest["status"] == "failed" and not list(crowded.output.glob("shards/*.tar"))


def test_killed_run_resumes_to_the_same_shards(preprocessed, corpus, tiny_svd_dir, tmp_path):
    cfg, _ = preprocessed
    output = tmp_path / "killed"
    killed_cfg = make_config(corpus, tiny_svd_dir, output)
    command = [sys.executable, "-m", "orchestration.cli", "preprocess", *(
        f"--set={k}={v}" for k, v in {**killed_cfg.model_dump(mode="json", exclude_none=True),
                                      "ray_address": ray.get_runtime_context().gcs_address}.items())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 300  # a loaded machine starts Ray workers slowly
    while not (output / "commits" / "000000.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run to kill ended or never started"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = json.loads((output / "run.json").read_text())  # nothing could record the kill: the pid tells
    assert killed["status"] == "running" and killed["pid"] == process.pid
    committed = len(list((output / "commits").glob("*.json")))
    total = len(list((cfg.output / "commits").glob("*.json")))
    assert committed < total, "the run finished before it was killed"
    # What a kill in the middle of writing a shard leaves behind: a temporary tar and a tar with no commit.
    (output / "shards" / f".shard-{committed:06d}.tar.tmp").write_bytes(b"partial")
    shutil.copy(output / "shards" / "shard-000000.tar", output / "shards" / f"shard-{committed + 5:06d}.tar")

    resumed = run_preprocess(killed_cfg)
    assert not list(output.rglob("*.tmp"))
    assert read_tars(output) == read_tars(cfg.output)
    shard_hashes = [(s["shard"], s["sha256"]) for s in pq.read_table(output / "shards.parquet").to_pylist()]
    assert shard_hashes == [(s["shard"], s["sha256"]) for s in pq.read_table(cfg.output / "shards.parquet").to_pylist()]
    ledger = pq.read_table(output / "failures.parquet").to_pylist()
    assert len(ledger) == len({(r["source"], r["stage"], r["clip_index"]) for r in ledger}) == len(BROKEN) + 1
    assert resumed["counts"]["samples"] == len(read_tars(cfg.output))


def test_reshard_filters_shuffles_and_keeps_payloads(preprocessed, tmp_path):
    cfg, manifest = preprocessed
    source_samples = read_tars(cfg.output)
    index = pq.read_table(cfg.output / "index.parquet").to_pylist()
    keys_file = tmp_path / "keys.txt"
    excluded_key = next(r["key"] for r in index if r["motion_bucket"] >= 20 and r["caption"])
    keys_file.write_text("\n".join(r["key"] for r in index if r["key"] != excluded_key))
    rs = ReshardConfig(input=cfg.output, output=tmp_path / "resharded", shard_max_samples=7, motion_bucket_min=20,
                       sources=["videos/*copy[0-3].mp4", "videos/fast_wide.mp4", "videos/calm_square.mp4"],
                       require_caption=True, keys_file=keys_file, shuffle_seed=7, progress=False)
    result = run_reshard(rs)
    kept = pq.read_table(rs.output / "index.parquet").to_pylist()
    filtered = pq.read_table(rs.output / "filtered.parquet").to_pylist()
    counts = result["counts"]
    assert counts["input"] == len(index) == counts["kept"] + counts["filtered"] == len(kept) + len(filtered)
    assert sorted(r["key"] for r in kept + filtered) == sorted(r["key"] for r in index)
    assert set(counts["filtered_by_reason"]) == {"motion_bucket", "source", "no_caption", "key_list"}
    assert all(r["motion_bucket"] >= 20 and r["caption"] for r in kept)
    resharded = read_tars(rs.output)
    assert sorted(resharded) == sorted(r["key"] for r in kept)
    assert all(resharded[k] == source_samples[k] for k in resharded)  # byte-identical payloads
    stats = pq.read_table(rs.output / "shards.parquet").to_pylist()
    assert [s["samples"] for s in stats][:-1] == [7] * (len(stats) - 1)
    assert sum(s["samples"] for s in stats) == len(kept)
    order = [r["key"] for r in kept]
    in_input_order = [r["key"] for r in index if r["key"] in set(order)]
    assert order != in_input_order  # shuffled
    again = run_reshard(rs)  # same config: resumes (nothing left to write) and gives the same index
    assert pq.read_table(rs.output / "index.parquet").to_pylist() == kept and again["counts"] == counts
    with pytest.raises(OutputMismatchError, match="shuffle_seed: 7 -> 8"):
        run_reshard(rs.model_copy(update={"shuffle_seed": 8}))


def test_reshard_without_filters_keeps_every_sample(preprocessed, tmp_path):
    cfg, _ = preprocessed
    result = run_reshard(ReshardConfig(input=cfg.output, output=tmp_path / "all", shard_max_samples=1000,
                                       progress=False))
    assert result["counts"]["kept"] == result["counts"]["input"] and result["counts"]["shards"] == 1
    assert read_tars(tmp_path / "all") == read_tars(cfg.output)
    with tarfile.open(tmp_path / "all" / "shards" / "shard-000000.tar") as tar:
        assert all(m.mtime == 0 for m in tar)


def test_a_workflow_reshard_that_keeps_nothing_stops_there_naming_the_filters(preprocessed, tiny_svd_dir, tmp_path):
    from orchestration.spec import validate_spec
    from orchestration.stages import StageRun, run_reshard as run_reshard_stage

    cfg, _ = preprocessed
    (tmp_path / "keys.txt").write_text("no-such-key\n")
    spec = validate_spec({"workdir": str(tmp_path / "work"), "corpus": cfg.input, "model": str(tiny_svd_dir),
                          "reshard": {"keys_file": str(tmp_path / "keys.txt"), "progress": False}})
    run = StageRun(spec, tmp_path / "work" / "reshard", {"preprocess": {"shards": str(cfg.output / "shards")}}, "")
    with pytest.raises(ValueError, match=r"reshard kept none of its \d+ samples \(filtered by reason: "
                                         r"\{'key_list': \d+\}\); loosen the reshard section's filters"):
        run_reshard_stage(run)

def test_cli_makes_a_corpus_and_refuses_a_foreign_output(preprocessed, tmp_path, capsys):
    from orchestration.cli import main

    cfg, _ = preprocessed
    assert main(["make-synthetic-corpus", str(tmp_path / "c"), "--no-broken"]) == 0
    assert len(json.loads((tmp_path / "c" / "metadata.json").read_text())) == 5
    code = main(["preprocess", f"--set=input={tmp_path / 'c' / 'metadata.json'}", f"--set=output={cfg.output}",
                 f"--set=model={cfg.model}"])
    assert code == 2 and "written by another configuration" in capsys.readouterr().err

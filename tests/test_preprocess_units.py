"""Preprocessing pieces on real files, without Ray: manifests, probing every bad input, windows, crops, motion."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from decord import VideoReader

from exvideo.motion import motion_bucket_id
from preprocessing.clips import clip_windows
from preprocessing.config import PreprocessConfig
from preprocessing.decode import ClipDecoder, centre_crop_box, clip_motion, scaled_size
from preprocessing.ledger import SourceError
from preprocessing.manifest import read_sources
from preprocessing.prepare import prepare_source, sample_key
from preprocessing.probe import VideoFile, probe
from preprocessing.synthetic import GOOD_VIDEOS


def config(**fields) -> PreprocessConfig:
    base = dict(input="unused", output="unused", model="unused", num_frames=8, frame_stride=2, height=64, width=64)
    return PreprocessConfig(**{**base, **fields})


def test_manifest_formats_resolve_relative_paths(tmp_path):
    videos = tmp_path / "data"
    videos.mkdir()
    rows = [{"path": "a.mp4", "caption": "first"}, {"path": "/abs/b.mp4", "caption": None}]
    (videos / "m.json").write_text(json.dumps([{"path": "a.mp4", "cap": "first"}, {"path": "/abs/b.mp4"}]))
    (videos / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (videos / "m.csv").write_text("path,caption\na.mp4,first\n/abs/b.mp4,\n")
    pq.write_table(pa.Table.from_pylist(rows), videos / "m.parquet")
    for name in ("m.json", "m.jsonl", "m.csv", "m.parquet"):
        sources, failures = read_sources(str(videos / name))
        assert failures == []
        assert [(s["source"], s["uri"], s["caption"]) for s in sources] == [
            ("a.mp4", str(videos / "a.mp4"), "first"), ("/abs/b.mp4", "/abs/b.mp4", "")], name


def test_folder_input_and_bad_manifest_rows(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("sub/b.MP4", "a.webm", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    sources, failures = read_sources(str(tmp_path))
    assert [s["source"] for s in sources] == ["a.webm", "sub/b.MP4"] and failures == []
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"path": "a.mp4"}, {"path": ""}, {"path": "a.mp4"}, {"cap": "no path"}]))
    sources, failures = read_sources(str(manifest))
    assert [s["source"] for s in sources] == ["a.mp4"]
    assert [(f.source, f.reason_code) for f in failures] == [
        ("<manifest row 1>", "bad_manifest_row"), ("a.mp4", "duplicate"), ("<manifest row 3>", "bad_manifest_row")]
    with pytest.raises(ValueError, match="has no 'path' column"):
        (tmp_path / "m.csv").write_text("file\na.mp4\n")
        read_sources(str(tmp_path / "m.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sources(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("name, code", [
    ("missing.mp4", "missing_file"), ("zero_bytes.mp4", "empty_file"), ("not_a_video.mp4", "not_a_video"),
    ("truncated.mp4", "corrupt_stream"), ("too_short.mp4", "too_short"), ("tiny.mp4", "too_small"),
    ("vfr.mp4", "variable_frame_rate"),
])
def test_every_broken_file_gets_its_reason(synthetic_corpus, name, code):
    uri = str(synthetic_corpus.parent / "videos" / name)
    with pytest.raises(SourceError) as caught:
        probe(VideoFile(uri), config())
    assert caught.value.stage == "probe" and caught.value.reason_code == code
    row, = prepare_source({"source": name, "uri": uri, "caption": ""}, config())
    assert (row["stage"], row["reason_code"], row["pixels"], row["last_of_source"]) == ("probe", code, b"", True)


def test_policies_for_portrait_and_variable_frame_rate(synthetic_corpus):
    videos = synthetic_corpus.parent / "videos"
    portrait = probe(VideoFile(str(videos / "portrait.mp4")), config())
    assert (portrait.width, portrait.height, portrait.num_frames, portrait.fps) == (64, 96, 24, 24.0)
    with pytest.raises(SourceError, match="portrait"):
        probe(VideoFile(str(videos / "portrait.mp4")), config(allow_portrait=False))
    vfr = probe(VideoFile(str(videos / "vfr.mp4")), config(reject_variable_frame_rate=False))
    assert vfr.num_frames == 24 and vfr.fps < 24


def test_clip_windows():
    cfg = config(num_frames=4, frame_stride=2)  # span 7
    assert clip_windows(20, cfg) == [[0, 2, 4, 6]]
    assert clip_windows(20, cfg.model_copy(update={"clips_per_video": 5})) == [[0, 2, 4, 6], [7, 9, 11, 13]]
    assert clip_windows(20, cfg.model_copy(update={"clips_per_video": 3, "clip_spacing": 5})) == [
        [0, 2, 4, 6], [5, 7, 9, 11], [10, 12, 14, 16]]
    assert clip_windows(6, cfg) == []


def test_short_side_resize_and_centre_crop():
    assert scaled_size(1280, 720, 512, 512) == (910, 512)
    assert scaled_size(720, 1280, 512, 512) == (512, 910)
    assert scaled_size(64, 64, 64, 64) == (64, 64)
    assert centre_crop_box(910, 512, 512, 512) == [199, 0, 512, 512]


@pytest.mark.parametrize("target", [64, 32])  # 32: decord cannot scale 96x64 to 48x32, torch does
def test_decoded_clip_is_the_centre_of_the_scaled_frame(synthetic_corpus, target):
    path = str(synthetic_corpus.parent / "videos" / "fast_wide.mp4")  # 96x64
    decoder = ClipDecoder(VideoFile(path), 96, 64, target, target)
    frames = decoder.clip([0, 3, 6])
    assert frames.shape == (3, target, target, 3) and frames.dtype == np.uint8
    assert decoder.crop == [target // 4, 0, target, target] and decoder.scaled_in_decoder == (target == 64)
    native = torch.from_numpy(VideoReader(path).get_batch([0, 3, 6]).asnumpy()).permute(0, 3, 1, 2).float()
    scaled = torch.nn.functional.interpolate(native, size=(target, target * 3 // 2), mode="bilinear",
                                             antialias=True).permute(0, 2, 3, 1)
    centre = scaled[:, :, target // 4: target // 4 + target].numpy()
    assert np.abs(frames.astype(np.float32) - centre).mean() < 2.0


def test_motion_in_slices_equals_the_reference_definition():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(6, 150, 40, 3), dtype=np.uint8)
    bucket, score = clip_motion(frames)
    expected_bucket, expected_score = motion_bucket_id(torch.from_numpy(frames).float() / 127.5 - 1)
    assert bucket == expected_bucket and score == pytest.approx(expected_score, rel=1e-9)


def test_prepare_makes_clips_with_stable_keys(synthetic_corpus):
    uri = str(synthetic_corpus.parent / "videos" / "medium_long.mp4")  # 48 frames at 25 fps
    rows = prepare_source({"source": "videos/medium_long.mp4", "uri": uri, "caption": "c"},
                          config(clips_per_video=4))
    assert [r["clip_index"] for r in rows] == [0, 1, 2]  # three 15-frame windows fit in 48 frames
    assert [r["last_of_source"] for r in rows] == [False, False, True]
    assert rows[1]["frame_indices"] == list(range(15, 30, 2)) and rows[1]["fps"] == 12.5
    assert rows[0]["key"] == sample_key("videos/medium_long.mp4", 0) and "." not in rows[0]["key"]
    assert len(rows[0]["pixels"]) == 8 * 64 * 64 * 3 and 0 <= rows[0]["motion_bucket"] <= 127


def test_synthetic_corpus_is_varied(synthetic_corpus):
    entries = json.loads(synthetic_corpus.read_text())
    assert len(entries) == len(GOOD_VIDEOS) + 7
    sizes = {(s.width, s.height) for s in GOOD_VIDEOS}
    assert len(sizes) >= 3 and len({s.fps for s in GOOD_VIDEOS}) >= 3
    reader = VideoReader(str(synthetic_corpus.parent / "videos" / "fast_wide.mp4"))
    assert len(reader) == 36 and reader.get_avg_fps() == 30 and reader[0].shape == (64, 96, 3)


def test_unreadable_uri_is_a_read_error():
    row, = prepare_source({"source": "a.mp4", "uri": "nosuchfs://bucket/a.mp4", "caption": ""}, config())
    assert (row["stage"], row["reason_code"]) == ("probe", "read_error") and "nosuchfs://bucket/a.mp4" in row["reason"]


def test_shards_close_at_the_byte_or_sample_limit(tmp_path):
    from preprocessing.reshard import plan_shards
    from preprocessing.shards import ShardSetWriter, member_bytes, read_commits, sample_spans

    def entries(i):
        return {"__key__": f"k{i:03d}", "latents.npy": bytes(1000 + i), "json": b"{}"}

    size = member_bytes(entries(0))  # 512 + 1024 + 512 + 512
    assert size == 2560
    writer = ShardSetWriter(tmp_path, max_samples=10, max_bytes=3 * size)
    for i in range(7):
        writer.add(entries(i), {"key": f"k{i:03d}", "source": "s", "motion_bucket": i, "caption": ""})
    writer.done_sources.append("s")
    writer.commit()
    commits = read_commits(tmp_path)
    assert [len(c["samples"]) for c in commits] == [3, 3, 1] and commits[-1]["done_sources"] == ["s"]
    spans = sample_spans(tmp_path / "shards" / "shard-000001.tar")
    assert sorted(spans) == ["k003", "k004", "k005"] and all(length == size for _, length in spans.values())
    rows = [{"bytes": 100}] * 5
    assert [len(s) for s in plan_shards(rows, max_samples=2, max_bytes=1000)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(rows, max_samples=10, max_bytes=250)] == [2, 2, 1]
    assert [len(s) for s in plan_shards([{"bytes": 5000}], max_samples=10, max_bytes=250)] == [1]


def test_videos_on_a_non_local_filesystem_are_read_as_bytes(synthetic_corpus):
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    memory = fsspec.filesystem("memory")
    memory.pipe("/corpus/clip.mp4", (synthetic_corpus.parent / "videos" / "fast_wide.mp4").read_bytes())
    filesystem = PyFileSystem(FSSpecHandler(memory))
    video = VideoFile("/corpus/clip.mp4", filesystem)
    info = probe(video, config())
    assert (info.width, info.height, info.num_frames) == (96, 64, 36)
    frames = ClipDecoder(video, info.width, info.height, 64, 64).clip([0, 2, 4])
    local = ClipDecoder(VideoFile(str(synthetic_corpus.parent / "videos" / "fast_wide.mp4")), 96, 64, 64, 64)
    assert np.array_equal(frames, local.clip([0, 2, 4]))
    with pytest.raises(SourceError, match="no file"):
        VideoFile("/corpus/absent.mp4", filesystem)


def test_sample_digests_ignore_shard_layout_and_refuse_a_sample_written_twice(tmp_path):
    from webdataset import TarWriter

    from preprocessing.shards import sample_digests

    samples = [{"__key__": f"k{i}", "a.npy": bytes([i]) * 10, "json": b"{}"} for i in range(4)]
    for folder, layout in (("one", [samples]), ("two", [samples[:1], samples[1:]])):
        (tmp_path / folder).mkdir()
        for n, group in enumerate(layout):
            with TarWriter(str(tmp_path / folder / f"shard-{n:06d}.tar")) as sink:
                for sample in group:
                    sink.write(sample)
    assert sample_digests(tmp_path / "one") == sample_digests(tmp_path / "two")
    assert len(sample_digests(tmp_path / "one")) == 4
    with TarWriter(str(tmp_path / "two" / "shard-000002.tar")) as sink:
        sink.write(samples[2])
    with pytest.raises(ValueError, match=r"k2\.a\.npy appears twice .* \(again in shard-000002\.tar\)"):
        sample_digests(tmp_path / "two")


@pytest.mark.parametrize("raised, status", [(KeyboardInterrupt, "stopped"), (OSError(28, "No space left"), "failed")])
def test_a_run_manifest_records_how_a_run_ended(tmp_path, raised, status):
    import os

    from exvideo.outputs import recording_run

    with recording_run(tmp_path, "run.json", {"num_frames": 8}, stage="preprocess"):
        running = json.loads((tmp_path / "run.json").read_text())
    assert running["status"] == "running" and running["pid"] == os.getpid() and running["host"]
    with pytest.raises(type(raised) if isinstance(raised, Exception) else raised):
        with recording_run(tmp_path, "run.json", {"num_frames": 8}, stage="preprocess"):
            raise raised
    ended = json.loads((tmp_path / "run.json").read_text())
    assert ended["status"] == status and ended["identity"] == {"num_frames": 8} and ended["stage"] == "preprocess"
    assert ended["error"] == ("KeyboardInterrupt: " if status == "stopped" else "OSError: [Errno 28] No space left")

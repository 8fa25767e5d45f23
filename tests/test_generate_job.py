"""The batch job on a real local Ray, a tiny real SVD checkpoint with an adapter, and a tiny text-to-image model."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import decord
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exvideo import extend_unet, load_unet, save_adapter
from orchestration.cli import main as cli_main
from pipelines.generate.params import GenerationParams
from pipelines.generate.rows import check_row, read_rows
from pipelines.generate.text_to_image import first_frame_from_text, load_text_to_image, write_tiny_text_to_image

GOOD = ["from-image", "from-prompt", "seeded"]


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, tiny_svd_dir):
    root = tmp_path_factory.mktemp("job")
    unet = extend_unet(load_unet(tiny_svd_dir), num_frames=16)
    adapter = save_adapter(unet, root / "adapter.safetensors")
    text_to_image = write_tiny_text_to_image(root / "tiny-t2i")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(images / "a.png")
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / "b.jpg")
    (images / "broken.png").write_text("not an image")
    rows = [
        {"id": "from-image", "image": "images/a.png"},
        {"id": "from-prompt", "prompt": "a red cat"},
        {"id": "seeded", "image": str(images / "b.jpg"), "seed": 3, "num_frames": 8, "fps": 12},
        {"id": "missing", "image": "images/nowhere.png"},
        {"id": "unreadable", "image": "images/broken.png"},
        {"id": "bad-param", "image": "images/a.png", "num_frames": "many"},
        {"id": "too-long", "image": "images/a.png", "num_frames": 17},
        {"id": "typo", "image": "images/a.png", "sead": 4},
        {"id": "from-image", "image": "images/b.jpg"},
        {"id": "../escape", "image": "images/a.png"},
        {"id": "no-source"},
    ]
    listing = root / "rows.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"root": root, "adapter": adapter, "text_to_image": text_to_image, "listing": listing}


EXPECTED_FAILURES = {
    "missing": "does not exist", "unreadable": "unreadable", "bad-param": "num_frames", "too-long": "exceeds",
    "typo": "unknown parameter", "from-image": "duplicate id", "../escape": "must be 1-128", "no-source": "exactly one",
}


def _run(job_inputs, *extra: str) -> int:
    return cli_main([
        "generate", "--set", f"input={job_inputs['listing']}", "--set", f"output={job_inputs['root'] / 'out'}",
        "--set", f"model={job_inputs['model']}", "--set", f"adapter={job_inputs['adapter']}",
        "--set", f"text_to_image={job_inputs['text_to_image']}", "--set", "text_to_image_steps=2",
        "--set", "params.num_frames=10", "--set", "params.height=64", "--set", "params.width=64",
        "--set", "params.steps=2", "--set", "device=cpu", *extra,
    ])


@pytest.fixture(scope="module")
def first_run(job_inputs, tiny_svd_dir, ray_local):
    job_inputs["model"] = tiny_svd_dir
    assert _run(job_inputs) == 0
    return job_inputs["root"] / "out"


def test_job_makes_exactly_the_good_rows(first_run, job_inputs):
    videos = first_run / "videos"
    assert sorted(p.name for p in videos.iterdir()) == sorted(
        f"{row_id}{suffix}" for row_id in GOOD for suffix in (".mp4", ".png", ".json"))
    adapter_sha = hashlib.sha256(job_inputs["adapter"].read_bytes()).hexdigest()
    for row_id, frames, fps, seed in [("from-image", 10, 30, 0), ("from-prompt", 10, 30, 0), ("seeded", 8, 12, 3)]:
        reader = decord.VideoReader(str(videos / f"{row_id}.mp4"))
        assert len(reader) == frames and reader[0].shape == (64, 64, 3)
        assert reader.get_avg_fps() == pytest.approx(fps)
        assert PIL.Image.open(videos / f"{row_id}.png").size == (64, 64)
        record = json.loads((videos / f"{row_id}.json").read_text())
        assert (record["frames"], record["fps"], record["seed"], record["method"]) == (frames, fps, seed, "exvideo")
        assert record["adapter"]["sha256"] == adapter_sha
        assert len(record["frames_sha256"]) == 64 and int(record["frames_sha256"], 16) >= 0  # hex sha256 of the frames
        assert GenerationParams.model_validate(record["params"]).num_frames == frames
        assert record["timings"]["total_s"] >= record["timings"]["denoise_s"] > 0
    assert json.loads((videos / "from-prompt.json").read_text())["source"]["prompt"] == "a red cat"
    # The prompt row's first frame is what the named text-to-image pipeline makes for it, seeded like the video.
    text_to_image = load_text_to_image(job_inputs["text_to_image"], torch.device("cpu"), torch.float32)
    expected = first_frame_from_text(text_to_image, "a red cat", 64, 64, steps=2, seed=0)
    assert np.array_equal(np.asarray(PIL.Image.open(videos / "from-prompt.png")), np.asarray(expected))


def test_job_records_a_reason_for_every_bad_row(first_run):
    failures = [json.loads(line) for line in (first_run / "failures.jsonl").read_text().splitlines()]
    reasons = {failure["id"]: failure["reason"] for failure in failures}
    assert sorted(reasons) == sorted(EXPECTED_FAILURES)
    for row_id, fragment in EXPECTED_FAILURES.items():
        assert fragment in reasons[row_id], (row_id, reasons[row_id])
    summary = json.loads((first_run / "summary.json").read_text())
    assert summary["made"] == sorted(GOOD) and summary["failed"] == len(EXPECTED_FAILURES)
    assert not [p for p in first_run.rglob(".*tmp*")]  # nothing half-written left


def test_rerun_skips_finished_rows_and_redoes_only_unfinished_ones(first_run, job_inputs, capsys):
    videos = first_run / "videos"
    kept = (videos / "from-image.mp4").stat().st_mtime_ns
    (videos / "seeded.json").unlink()  # as if the job died before finishing this row
    (videos / ".seeded.tmp-4242.mp4").write_bytes(b"half an mp4")  # ... in the middle of writing its video
    assert _run(job_inputs) == 0
    summary = json.loads((first_run / "summary.json").read_text())
    assert summary["made"] == ["seeded"] and summary["skipped_done"] == ["from-image", "from-prompt"]
    assert (videos / "from-image.mp4").stat().st_mtime_ns == kept
    out = capsys.readouterr().out
    assert "1 made, 2 already done (skipped)" in out and ".seeded.tmp-4242.mp4" in out
    assert not list(videos.glob(".*"))

    # Another sampling setting, or the same setting in a row of its own: the finished rows were made otherwise.
    records = {p.name: p.read_bytes() for p in videos.glob("*.json")}
    assert _run(job_inputs, "--set", "params.steps=3") == 2
    assert capsys.readouterr().err == (
        f"exvideo generate: error: output {first_run} holds videos of 3 row(s) made with another configuration: "
        "from-image (params.steps: 2 -> 3), from-prompt (params.steps: 2 -> 3), seeded (params.steps: 2 -> 3). "
        "Videos of different configurations never mix: write to a new output folder, or delete those rows' files "
        "(videos/<id>.*) to make them again\n")
    assert {p.name: p.read_bytes() for p in videos.glob("*.json")} == records  # nothing made or touched

    # An image replaced under the same path: the row that reads it would now make another video.
    image = job_inputs["root"] / "images" / "b.jpg"
    kept_image = image.read_bytes()
    PIL.Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    try:
        assert _run(job_inputs) == 2
    finally:
        image.write_bytes(kept_image)
    assert re.search(r"holds videos of 1 row\(s\) made with another configuration: seeded \(images_sha256: "
                     r"\['[0-9a-f]{64}'\] -> \['[0-9a-f]{64}'\]\)", capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in videos.glob("*.json")} == records


def test_a_model_rewritten_in_place_changes_the_jobs_identity(tmp_path, tiny_svd_dir, monkeypatch):
    """The model's bytes, not only its path, decide the videos: finished rows made with the old weights are then
    refused as another configuration's (as the params.steps change above)."""
    from exvideo import tiny_svd_components
    from exvideo.outputs import changed_fields
    from pipelines.generate.config import GenerateJobConfig
    from pipelines.generate.job import job_identity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = shutil.copytree(tiny_svd_dir, tmp_path / "model")
    cfg = GenerateJobConfig(input=tmp_path / "rows.jsonl", output=tmp_path / "out", model=model)
    before = job_identity(cfg, "svd")
    assert job_identity(cfg, "svd") == before
    tiny_svd_components(seed=1).vae.save_pretrained(model / "vae")
    (changed,) = changed_fields(before, job_identity(cfg, "svd"))
    assert re.fullmatch(r"model_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'", changed)


def test_job_errors_name_the_bad_setting(job_inputs, tiny_svd_dir, capsys):
    job_inputs["model"] = tiny_svd_dir
    assert _run(job_inputs, "--set", "params.steps=0") == 2
    assert "params.steps" in capsys.readouterr().err
    assert _run(job_inputs, "--set", f"adapter={job_inputs['root'] / 'none.safetensors'}") == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err
    assert _run(job_inputs, "--set", f"model={job_inputs['root'] / 'no-model'}") == 2
    assert f"model {job_inputs['root'] / 'no-model'} does not exist (model: local diffusers" in capsys.readouterr().err


def test_csv_and_parquet_listings_read_alike(tmp_path, ray_local):
    (tmp_path / "rows.csv").write_text("id,image,prompt,seed\n007,x.png,,5\n008,,a dog,\n")
    pq.write_table(pa.table({"id": ["007", "008"], "image": ["x.png", None], "prompt": [None, "a dog"],
                             "seed": [5, None]}), tmp_path / "rows.parquet")
    defaults = GenerationParams(num_frames=10)
    for name in ("rows.csv", "rows.parquet"):
        requests = [check_row(row, n, tmp_path, defaults, True) for n, row in enumerate(read_rows(tmp_path / name))]
        assert [(r.id, r.image, r.prompt, r.params.seed, r.reason) for r in requests] == [
            ("007", str(tmp_path / "x.png"), None, 5, None), ("008", None, "a dog", 0, None)]
    (tmp_path / "rows.txt").write_text("id\n1\n")
    with pytest.raises(ValueError, match="must end in .jsonl, .json, .csv or .parquet"):
        read_rows(tmp_path / "rows.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows(tmp_path / "absent.jsonl")

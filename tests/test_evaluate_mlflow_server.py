"""Against a real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact root): the evaluate stage nests under a
workflow's parent run, its runs, metrics and artifacts are stored, and the adapter logged as a pyfunc model is
registered under an alias, loads back and makes bitwise the video the generation job (on a real local Ray) makes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from evaluation_videos import fading_to_grey_video, translating_video, write_generated
from mlflow.tracking import MlflowClient
from PIL import Image

import exvideo
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.run import run_evaluation
from pipelines.evaluate.video_model import generation_params
from pipelines.generate.config import GenerateJobConfig
from pipelines.generate.job import run_generate_job
from pipelines.generate.params import GenerationParams, SecondPass

GENERATION = {"num_frames": 4, "height": 64, "width": 64, "steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_svd_dir):
    """An adapter for the tiny model: its UNet extended to 16 frames, temporal tensors nudged off the identity."""
    svd = exvideo.load_svd(tiny_svd_dir)
    exvideo.extend_unet(svd.unet, num_frames=16)
    for parameter in exvideo.trainable_parameters(svd.unet).values():
        parameter.data.add_(0.01)
    return exvideo.save_adapter(svd.unet, tmp_path_factory.mktemp("adapter") / "adapter.safetensors")


@pytest.fixture(scope="module")
def evaluated(mlflow_server, adapter, tiny_svd_dir, tmp_path_factory):
    uri, _ = mlflow_server
    videos = tmp_path_factory.mktemp("generated")
    write_generated(videos, "pan", translating_video(1, 1, 6), method="exvideo")
    write_generated(videos, "fade", fading_to_grey_video(6), method="sliding-window")
    client = MlflowClient(uri)
    workflow = client.create_run(client.create_experiment("workflow"), run_name="workflow")
    cfg = EvaluateConfig(
        videos_dir=videos, output_dir=tmp_path_factory.mktemp("eval-out"), tracking_uri=uri,
        experiment="workflow", parent_run_id=workflow.info.run_id, svd_dir=tiny_svd_dir, adapter=adapter,
        registered_model_name="exvideo-tiny", model_alias="candidate",
    )
    return run_evaluation(cfg), workflow.info.run_id, client


@pytest.fixture(scope="module")
def generated(ray_local, adapter, tiny_svd_dir, tmp_path_factory):
    """`exvideo generate`'s job, for one image with the adapter and GENERATION: (image path, the video's record)."""
    root = tmp_path_factory.mktemp("generate")
    image = root / "first.png"
    Image.fromarray(translating_video(1, 1, 1)[0]).save(image)
    (root / "rows.jsonl").write_text(json.dumps({"id": "first", "image": "first.png"}) + "\n")
    cfg = GenerateJobConfig(input=root / "rows.jsonl", output=root / "out", model=tiny_svd_dir, adapter=adapter,
                            params=GenerationParams(**GENERATION))
    assert run_generate_job(cfg)["made"] == ["first"]
    return image, json.loads((root / "out" / "videos" / "first.json").read_text())


def test_server_stores_nested_runs_metrics_and_artifacts(evaluated):
    outcome, workflow_id, client = evaluated
    stage = client.get_run(outcome["run_id"])
    assert stage.data.tags["mlflow.parentRunId"] == workflow_id
    assert stage.data.metrics["videos_evaluated"] == 2
    children = client.search_runs([stage.info.experiment_id], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"pan", "fade"}
    assert by_name["fade"].data.metrics["contrast_ratio_last_to_first"] < 0.35
    assert "clip_to_first.last" in by_name["pan"].data.metrics
    assert len(client.get_metric_history(by_name["pan"].info.run_id, "curve.saturation")) == 6
    assert {Path(a.path).name for a in client.list_artifacts(by_name["pan"].info.run_id, "video")} == {
        "pan.mp4", "pan.json"}
    assert {Path(a.path).name for a in client.list_artifacts(stage.info.run_id, "adapter")} == {"adapter.safetensors"}
    report = Path(client.download_artifacts(stage.info.run_id, "report/index.html"))
    assert '<table id="comparison">' in report.read_text()
    assert {Path(a.path).name for a in client.list_artifacts(stage.info.run_id, "report/videos")} == {
        "0000-fade.mp4", "0001-pan.mp4"}


@pytest.fixture(scope="module")
def registered(evaluated):
    """The registered model, loaded by its alias from the server."""
    outcome, _, client = evaluated
    version = client.get_model_version_by_alias("exvideo-tiny", "candidate")
    assert version.version == outcome["model_version"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        return mlflow.pyfunc.load_model("models:/exvideo-tiny@candidate")
    finally:
        mlflow.set_tracking_uri(previous)


def test_registered_model_makes_bitwise_the_video_the_generate_job_makes(registered, generated, adapter, tmp_path):
    image, record = generated
    # Unset fields filled from the adapter's sampling defaults (an adapter without training metadata: ours).
    filled = {"fps": 30, "renormalize": False, "contrast": 1.0}
    assert record["params"] == GenerationParams(**GENERATION, **filled).model_dump(mode="json")
    assert record["sampling_defaults"]["filled"] == filled
    assert record["adapter"]["sha256"] == hashlib.sha256(Path(adapter).read_bytes()).hexdigest()
    # CPU float sums depend on how many threads split them: Ray runs a 1-CPU job worker with one torch thread, so
    # the model predicts with one here too (same device, dtype and threads: the same arithmetic).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        videos = registered.predict(pd.DataFrame({"image": [str(image)]}), params=GENERATION)
    finally:
        torch.set_num_threads(threads)
    assert videos.shape == (1, 4, 64, 64, 3) and videos.dtype == np.uint8
    assert videos.std() > 0
    # One path: the pyfunc model's frames are the job's, bit for bit (the job hashed them before mp4 encoding).
    assert hashlib.sha256(np.ascontiguousarray(videos[0]).tobytes()).hexdigest() == record["frames_sha256"]
    with pytest.raises(ValueError, match="does not exist"):
        registered.predict(pd.DataFrame({"image": [str(tmp_path / "absent.png")]}), params=GENERATION)


@pytest.mark.parametrize("bad, message", [
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"method": "chain"}, "method 'chain' cannot run in this model"),
    ({"window_stride": 30}, "window_stride 30 must be below clip_frames 25"),
    ({"second_pass": '{"strength": 2}'}, "second_pass.strength"),
    ({"second_pass": "{not json"}, "param second_pass must be a JSON object"),
])
def test_registered_model_refuses_bad_params_naming_them(registered, generated, bad, message):
    image, _ = generated
    with pytest.raises(ValueError, match=message):
        registered.predict(pd.DataFrame({"image": [str(image)]}), params={**GENERATION, **bad})


def test_signature_params_are_generation_params_fields_with_their_defaults(registered):
    specs = {spec.name: spec for spec in registered.metadata.get_params_schema().params}
    assert list(specs) == list(GenerationParams.model_fields)
    defaults = GenerationParams().model_dump()
    assert {name: spec.default for name, spec in specs.items()} == {**defaults, "num_frames": 16, "frames": "{}"}
    types = {name: spec.dtype.name for name, spec in specs.items()}
    assert (types["method"], types["steps"], types["min_guidance"], types["renormalize"]) == (
        "string", "long", "double", "boolean")
    assert (types["decode_tile"], types["second_pass"]) == ("long", "string")  # None defaults; JSON for the model
    assert (types["fps"], types["contrast"], types["frames"]) == ("long", "double", "string")
    params = generation_params(GenerationParams(num_frames=16), {
        "second_pass": '{"height": 128, "width": 96}', "decode_tile": 32, "decode_tile_overlap": 8,
        "frames": '{"3": "a.png"}'})
    assert params.second_pass == SecondPass(height=128, width=96) and params.frames == {3: "a.png"}
    assert (params.decode_tile, params.num_frames) == (32, 16)

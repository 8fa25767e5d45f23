"""Against a real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact root): the evaluate stage nests under a
workflow's parent run, its runs, metrics and artifacts are stored, and the adapter logged as a pyfunc model is
registered under an alias, loads back and generates a video."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from evaluation_videos import fading_to_grey_video, translating_video, write_generated
from mlflow.tracking import MlflowClient
from PIL import Image

import exvideo
from pipelines.evaluate.run import EvaluateConfig, run_evaluation
from pipelines.evaluate.video_model import GENERATION_DEFAULTS, generate_video

GENERATION = {"num_frames": 4, "num_inference_steps": 2, "height": 64, "width": 64, "decode_chunk_size": 4,
              "seed": 7}


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


def test_registered_model_loads_by_alias_and_generates_what_the_adapter_generates(evaluated, tiny_svd_dir, adapter,
                                                                                   tmp_path):
    outcome, _, client = evaluated
    version = client.get_model_version_by_alias("exvideo-tiny", "candidate")
    assert version.version == outcome["model_version"]
    image = tmp_path / "first.png"
    Image.fromarray(translating_video(1, 1, 1)[0]).save(image)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model("models:/exvideo-tiny@candidate")
    finally:
        mlflow.set_tracking_uri(previous)
    videos = model.predict(pd.DataFrame({"image": [str(image)]}), params=GENERATION)
    assert videos.shape == (1, 4, 64, 64, 3) and videos.dtype == np.uint8
    assert videos.std() > 0
    # The same generation call on the base checkpoint plus the adapter gives the same frames.
    svd = exvideo.load_svd(tiny_svd_dir)
    exvideo.load_adapter(svd.unet, adapter)
    with Image.open(image) as conditioning:
        expected = generate_video(svd, conditioning.convert("RGB"), **{
            **GENERATION_DEFAULTS,
            **GENERATION})
    np.testing.assert_array_equal(videos[0], expected)
    with pytest.raises(ValueError, match="does not exist"):
        model.predict(pd.DataFrame({"image": [str(tmp_path / "absent.png")]}), params=GENERATION)

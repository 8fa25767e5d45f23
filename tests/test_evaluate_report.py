"""`exvideo evaluate` end to end on a local embedded MLflow store: the report renders in headless Chromium (DOM and
screenshot), and the stage run, its nested per-video runs, metrics, curves and artifacts are in the store."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from evaluation_videos import fading_to_grey_video, static_video, translating_video, write_generated
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestration.cli import main

CHROMIUM = Path("/usr/bin/chromium")
FRAMES = 12


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_svd_dir):
    """Two runs: run-a has ExVideo-like and grey-drifting videos, run-b one more; evaluated through the CLI."""
    root = tmp_path_factory.mktemp("evaluate")
    run_a, run_b = root / "run-a", root / "run-b"
    write_generated(run_a, "still", static_video(FRAMES), method="exvideo")
    write_generated(run_a, "pan", translating_video(2, 1, FRAMES), method="exvideo", seed=1)
    write_generated(run_a, "fade", fading_to_grey_video(FRAMES), method="chained")
    write_generated(run_b, "pan-b", translating_video(1, 0, FRAMES), method="exvideo")
    (run_b / "stray.mp4").write_bytes(b"not a video")  # no record: reported, not evaluated
    output = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["evaluate", "--set", f"videos_dir=[{run_a}, {run_b}]", "--set", f"output_dir={output}",
                     "--set", f"svd_dir={tiny_svd_dir}", "--set", "contact_sheet_frames=6"])
    assert code == 0
    # The console names each skipped input with its reason, as the report does.
    assert f"  skipped {run_b / 'stray.mp4'}: no record stray.json" in printed.getvalue(), printed.getvalue()
    return output


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail("headless Chromium is missing: run scripts/system_deps.sh (apt-get install chromium)")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_report_page_has_the_tables_and_images_and_needs_no_network(evaluated, tmp_path):
    page = evaluated / "report" / "index.html"
    dom = _chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile").stdout
    comparison = re.search(r'<table id="comparison">(.*?)</table>', dom, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", comparison, re.S)
    groups = [re.findall(r'<td class="text">([^<]*)</td>', row)[:2] for row in rows[1:]]
    assert groups == [["run-a", "chained"], ["run-a", "exvideo"], ["run-b", "exvideo"]]
    assert "CLIP frame-to-frame" in rows[0] and "FVD" in rows[0]
    assert all("skipped" in row for row in rows[1:])  # no I3D given: FVD says skipped, never a number
    videos_table = re.search(r'<table id="videos">(.*?)</table>', dom, re.S).group(1)
    assert len(re.findall(r"<tr>", videos_table)) == 1 + 4
    sources = re.findall(r'<img[^>]* src="([^"]+)"', dom)
    assert len(sources) == 1 + 3 * 4  # comparison chart + contact sheet, flow and curves per video
    assert all((page.parent / source).is_file() for source in sources)
    # Each video plays from the report's own copy of its mp4, named relative to the page.
    players = re.findall(r"<video([^>]*)>", dom)
    assert len(players) == 4
    for attributes in players:
        assert all(re.search(rf"\b{name}\b", attributes) for name in ("controls", "muted", "loop"))
        assert 'preload="metadata"' in attributes
        source = re.search(r'src="([^"]+)"', attributes).group(1)
        assert re.fullmatch(r"videos/[\w.-]+\.mp4", source), source
        assert (page.parent / source).is_file()
    copies = sorted((page.parent / "videos").iterdir())
    assert len(copies) == 4 and all(copy.stat().st_size > 0 for copy in copies)
    assert not re.search(r'(src|href)="(https?:)?//', dom)
    assert "stray.mp4" in dom  # the skipped input is named on the page with its reason


def _colourful_fraction(png: Path) -> float:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float(((pixels.max(-1) - pixels.min(-1)) > 60).mean())


def test_report_screenshot_shows_the_images(evaluated, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2200", (evaluated / "report" / "index.html").as_uri(),
              profile=tmp_path / "profile")
    assert Image.open(shot).size == (1280, 2200)
    # Control: the same page with its images folder gone renders text and tables only.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(evaluated / "report" / "index.html", bare / "index.html")
    bare_shot = tmp_path / "bare.png"
    _chromium(f"--screenshot={bare_shot}", "--window-size=1280,2200", (bare / "index.html").as_uri(),
              profile=tmp_path / "profile-bare")
    with_images, without = _colourful_fraction(shot), _colourful_fraction(bare_shot)
    assert with_images > 0.005 and with_images > 4 * without, (with_images, without)


def test_store_holds_the_stage_run_nested_video_runs_metrics_curves_and_artifacts(evaluated):
    client = MlflowClient(f"sqlite:///{evaluated / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("exvideo")
    assert Path(experiment.artifact_location.removeprefix("file://")) == (evaluated / "mlartifacts").resolve()
    (stage,) = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert stage.data.metrics["videos_evaluated"] == 4 and stage.data.metrics["videos_skipped"] == 1
    assert stage.data.metrics["run-a.chained.contrast_ratio_last_to_first"] < 0.35
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["fade", "pan", "pan-b", "still"]
    pan = next(run for run in children if run.info.run_name == "pan")
    assert pan.data.tags["method"] == "exvideo" and pan.data.params["seed"] == "1"
    assert pan.data.metrics["flow_dx"] == pytest.approx(2, abs=0.6)
    history = client.get_metric_history(pan.info.run_id, "curve.contrast")
    assert sorted(m.step for m in history) == list(range(FRAMES))
    assert sorted(m.step for m in client.get_metric_history(pan.info.run_id, "curve.flicker")) == list(range(1, FRAMES))
    video_files = {Path(f.path).name for f in client.list_artifacts(pan.info.run_id, "video")}
    assert video_files == {"pan.mp4", "pan.json"}
    assert len(client.list_artifacts(pan.info.run_id, "figures")) == 3
    report_files = {Path(f.path).name for f in client.list_artifacts(stage.info.run_id, "report")}
    assert {"index.html", "summary.json", "images", "videos"} <= report_files
    assert len(client.list_artifacts(stage.info.run_id, "report/videos")) == 4


@pytest.mark.parametrize("overrides, message", [
    ([], "videos_dir"),
    (["videos_dir=/nonexistent/videos"], "does not exist"),
    (["videos_dir=.", "adapter=a.safetensors"], "svd_dir is not"),
    (["videos_dir=.", "model_alias=best"], "registered_model_name is not"),
])
def test_bad_evaluate_configs_fail_with_a_reason(overrides, message, capsys, tmp_path):
    args = ["evaluate", "--set", f"output_dir={tmp_path}"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_videos_is_an_error(tmp_path, capsys):
    assert main(["evaluate", "--set", f"videos_dir={tmp_path}", "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err

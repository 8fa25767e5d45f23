"""The workflow: spec validation, stage keys, cross-stage checks, resume after a failure in train, lineage and the
demo (the Ray Jobs API and a cluster of several nodes: test_cluster.py).

One real workflow run (tiny sizes) is shared by the module: `exvideo demo`, which first fails in train (it asks
for more CPUs than there are), is fixed and resumed; later tests rerun its spec and read its MLflow store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestration.cli import main
from exvideo.config import ConfigError
from orchestration.demo import DEMO_SPEC
from orchestration.runner import MARKER, select_stages, stage_keys
from orchestration.spec import load_spec, validate_spec

TINY_STAGES = {
    "preprocess": {"num_frames": 8, "height": 64, "width": 64, "shard_max_samples": 4},
    "train": {"num_frames": 16, "max_steps": 2, "checkpoint_every": 2, "log_every": 1,
              "gradient_checkpointing": False},
    "generate": {"conditioning_videos": 1, "params": {"num_frames": 16, "height": 64, "width": 64, "steps": 2}},
    "evaluate": {"title": "workflow test"},
}


def spec_data(root: Path, corpus: Path, model: Path) -> dict:
    return {"workdir": str(root / "work"), "corpus": str(corpus), "model": str(model), **TINY_STAGES}


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- validation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"train": {"max_steps": 0}}, r"train\.max_steps: Input should be greater than or equal to 1 \(got 0\)"),
    ({"train": {"shards": "x/*.tar"}}, r"train\.shards is set by the workflow .* remove it from the train section"),
    ({"generate": {"output": "elsewhere"}}, r"generate\.output is set by the workflow"),
    ({"train": {"precision": "bf16"}}, r"train: .*precision bf16 is for GPUs; on CPU use precision=fp32"),
    ({"preprocess": {"heigth": 64}}, r"preprocess\.heigth: Extra inputs are not permitted"),
    ({"evaluate": {"fvd_num_frames": "many"}}, r"evaluate\.fvd_num_frames: Input should be a valid integer"),
    ({"reshard": {"motion_bucket_min": 500}}, r"reshard\.motion_bucket_min: Input should be less than or equal to 127"),
    ({"generate": {"conditioning_videos": 0}}, r"generate\.conditioning_videos must be a positive integer \(got 0\)"),
    ({"trian": {}}, r"trian: Extra inputs are not permitted"),
    ({"corpus": None}, r"corpus: Input should be a valid string \(got None\)"),
])
def test_spec_validator_names_the_field_and_the_fix(tmp_path, change, message):
    data = {**spec_data(tmp_path, tmp_path / "m.json", tmp_path / "model"), **change}
    with pytest.raises(ConfigError, match=message):
        validate_spec(data)


def test_spec_reads_config_files_and_reports_bad_files(tmp_path, capsys):
    (tmp_path / "train.yaml").write_text("max_steps: 7\nlr: 0.5\n")
    data = spec_data(tmp_path, tmp_path / "m.json", tmp_path / "model")
    data["train"] = {"config_file": "train.yaml", "lr": 0.25}
    spec = load_spec(write_spec(tmp_path / "spec.yaml", data), ["train.seed=3"])
    assert spec.train == {"max_steps": 7, "lr": 0.25, "seed": 3}  # inline beats the file, overrides beat both
    assert spec.stages == ["preprocess", "train", "generate", "evaluate"]
    data["train"] = {"config_file": "missing.yaml"}
    with pytest.raises(ConfigError, match=r"train\.config_file .*missing\.yaml does not exist"):
        load_spec(write_spec(tmp_path / "spec.yaml", data))
    assert main(["run", str(tmp_path / "spec.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--only deploy: this spec's stages are preprocess, train"):
        select_stages(spec, None, "deploy")


def test_ctrl_c_ends_the_workflow_run_killed_and_the_command_with_130(tmp_path, tiny_svd_dir, monkeypatch, capsys):
    import dataclasses

    from orchestration import runner

    def ctrl_c(run):  # as if the user pressed Ctrl-C while preprocess ran
        raise KeyboardInterrupt
    monkeypatch.setitem(runner.STAGE, "preprocess", dataclasses.replace(runner.STAGE["preprocess"], run=ctrl_c,
                                                                          needs_ray=False))
    corpus = tmp_path / "corpus.json"
    corpus.write_text("[]")
    spec = write_spec(tmp_path / "spec.yaml", spec_data(tmp_path, corpus, tiny_svd_dir))
    assert main(["run", str(spec)]) == 130
    said = capsys.readouterr().err
    assert "exvideo run: interrupted. What finished is kept: rerun the same command to go on." in said
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["stage.preprocess"].startswith("stopped: ")


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(tmp_path, tiny_svd_dir, capsys):
    from exvideo.storage import hold_folder

    corpus = tmp_path / "corpus.json"
    corpus.write_text("[]")
    spec = write_spec(tmp_path / "spec.yaml", spec_data(tmp_path, corpus, tiny_svd_dir))
    with hold_folder(tmp_path / "work", "exvideo run"):  # as another invocation would hold it
        assert main(["run", str(spec)]) == 2
    said = capsys.readouterr().err
    assert f"{tmp_path / 'work'} is in use by exvideo run (pid {os.getpid()} on " in said
    assert "wait for it to end, or give this command another folder" in said
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [".exvideo.lock"]  # nothing else made


# -- cache keys: operational fields are not part of them --------------------------------------------------------

OPERATIONAL_CHANGES = {
    "preprocess": {"encode_actors": 2, "encode_batch_size": 3, "decode_threads": 2, "progress": False},
    "reshard": {"progress": False},
    "train": {"log_every": 5, "speed": {"compile_blocks": False, "checkpointing": "full"}, "cpus_per_worker": 2,
              "keep_last": 1, "gradient_checkpointing": True, "max_failures": 0, "use_gpu": True},
    "generate": {"workers": 2, "device": "cpu", "speed": {"batched_guidance": False}},
    "evaluate": {"device": "cpu", "run_name": "again"},
}


def keyed(tmp_path: Path, changes: dict, corpus: Path | None = None, model: Path | None = None) -> dict[str, str]:
    if corpus is None:
        corpus = tmp_path / "m.json"
        corpus.write_text("[]")
    if model is None:  # only what the keys read: the family's index and its encoders' folders
        model = tmp_path / "model"
        for component in ("vae", "image_encoder", "feature_extractor"):
            (model / component).mkdir(parents=True, exist_ok=True)
        (model / "model_index.json").write_text('{"_class_name": "StableVideoDiffusionPipeline"}')
    data = spec_data(tmp_path, corpus, model)
    data["reshard"] = {"shuffle_seed": 0}
    for stage, fields in changes.items():
        data[stage] = {**data[stage], **fields}
    return stage_keys(validate_spec(data))


@pytest.mark.parametrize("stage", OPERATIONAL_CHANGES)
def test_operational_fields_leave_every_stage_key_unchanged(tmp_path, stage):
    assert keyed(tmp_path, {stage: OPERATIONAL_CHANGES[stage]}) == keyed(tmp_path, {})


@pytest.mark.parametrize("stage, change, rekeyed", [
    ("preprocess", {"num_frames": 12}, ["preprocess", "reshard", "train", "generate", "evaluate"]),
    ("reshard", {"motion_bucket_min": 3}, ["reshard", "train", "generate", "evaluate"]),
    ("train", {"lr": 1e-3}, ["train", "generate", "evaluate"]),
    ("train", {"num_workers": 2}, ["train", "generate", "evaluate"]),  # the global batch
    ("generate", {"params": {**TINY_STAGES["generate"]["params"], "seed": 4}}, ["generate", "evaluate"]),
    ("generate", {"conditioning_videos": 2}, ["generate", "evaluate"]),
    ("evaluate", {"title": "other"}, ["evaluate"]),
])
def test_output_fields_rekey_their_stage_and_those_after_it(tmp_path, stage, change, rekeyed):
    before, after = keyed(tmp_path, {}), keyed(tmp_path, {stage: change})
    assert [name for name in before if before[name] != after[name]] == rekeyed


def test_the_inputs_content_keys_every_stage_and_their_place_or_times_do_not(tmp_path, tiny_svd_dir, monkeypatch):
    """A folder corpus that gains or replaces a video, or a model rewritten in place, rekeys the stages that read
    it; the same model in another folder, files only touched, and files that are not part of the input keep every
    key."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus, model = tmp_path / "videos", tmp_path / "model"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a.mp4").write_bytes(b"a" * 10)
    shutil.copytree(tiny_svd_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    first = keyed(tmp_path, {}, corpus, model)

    def changed(since: dict[str, str]) -> list[str]:
        now = keyed(tmp_path, {}, corpus, model)
        return [stage for stage in now if now[stage] != since[stage]]

    for touched in (corpus / "sub" / "a.mp4", weights):
        os.utime(touched, ns=(1, 1))
    (corpus / "notes.txt").write_text("not a video")
    (model / ".exvideo.lock").write_text("a lock is not part of the model")
    assert changed(first) == []
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(model, moved)
    assert keyed(tmp_path, {}, corpus, moved) == first
    # Other weights of the same size: the UNet's rekey the stages that read it, the VAE's every stage.
    for component, rekeyed in (("unet", ["train", "generate", "evaluate"]), ("vae", list(first))):
        rewritten = model / component / "diffusion_pytorch_model.safetensors"
        data = bytearray(rewritten.read_bytes())
        data[-1] ^= 1
        rewritten.write_bytes(bytes(data))
        assert changed(first) == rekeyed, component
        shutil.copy(moved / component / rewritten.name, rewritten)
        assert changed(first) == []
    (corpus / "b.mp4").write_bytes(b"b" * 10)  # the folder gained a video
    assert changed(first) == list(first)
    grown = keyed(tmp_path, {}, corpus, model)
    (corpus / "b.mp4").write_bytes(b"c" * 11)  # and replaced it
    assert changed(grown) == list(first)


def test_a_folder_digest_reads_each_file_once_until_it_is_rewritten(tmp_path, monkeypatch):
    from exvideo.digests import cache_file, folder_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"1234")
    (folder / "model_index.json").write_text("{}")
    digest = folder_sha256(folder)
    cached = json.loads(cache_file().read_text())
    assert sorted(cached) == [str(folder / "model_index.json"), str(folder / "unet" / "w.bin")]
    assert [p.name for p in cache_file().parent.iterdir()] == ["file-digests.json"]  # no temporary file left
    # Same size and time: taken from the cache, not read (as make and git decide a file is unchanged).
    stat = (folder / "unet" / "w.bin").stat()
    (folder / "unet" / "w.bin").write_bytes(b"5678")
    os.utime(folder / "unet" / "w.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert folder_sha256(folder) == digest
    os.utime(folder / "unet" / "w.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten: read again
    assert folder_sha256(folder) != digest
    # A cache that cannot be written (a read-only home) costs a rereading, never a wrong digest.
    # Entries of files that are gone leave the cache at its next write.
    (folder / "unet" / "w.bin").unlink()
    (folder / "model_index.json").write_text("{ }")
    folder_sha256(folder)
    assert sorted(json.loads(cache_file().read_text())) == [str(folder / "model_index.json")]
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-cache-here")
    (folder / "unet" / "w.bin").write_bytes(b"1234")
    (folder / "model_index.json").write_text("{}")
    assert folder_sha256(folder) == digest


def test_every_stage_config_declares_its_operational_fields():
    from orchestration.stages import STAGES

    declared = {stage.name: stage.operational_fields() for stage in STAGES}
    assert {"encode_actors", "encode_device", "progress", "ray_address"} <= declared["preprocess"]
    assert {"log_every", "speed", "tracking_uri", "cpus_per_worker", "use_gpu"} <= declared["train"]
    assert {"workers", "speed", "device", "ray_address"} <= declared["generate"]
    assert "num_workers" not in declared["train"] and "lr" not in declared["train"]


# -- checks across stages, before anything runs -------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"generate": {"params": {"num_frames": 64}}},
     r"generate\.params\.num_frames 64 exceeds train\.num_frames 16, the position table of the adapter"),
    ({"generate": {"params": {"num_frames": 64, "overlap": 16}}},
     r"generate\.params\.overlap 16 must be below train\.num_frames 16"),
    ({"preprocess": {"num_frames": 32}}, r"preprocess\.num_frames 32 exceeds train\.num_frames 16"),
    ({"reshard": {"require_caption": True}}, r"reshard\.require_caption is true but no video of corpus .* caption"),
    ({"reshard": {"keys_file": "/no/such/keys.txt"}}, r"reshard: keys_file /no/such/keys\.txt does not exist"),
    ({"reshard": {"motion_bucket_min": 9, "motion_bucket_max": 3}}, r"motion_bucket_min 9 > motion_bucket_max 3"),
])
def test_mismatched_stages_are_refused_before_any_folder_is_made(tmp_path, capsys, change, message):
    corpus = tmp_path / "corpus.json"
    corpus.write_text('[{"path": "a.mp4"}, {"path": "b.mp4", "cap": ""}]')
    data = spec_data(tmp_path, corpus, tmp_path / "model")
    for stage, fields in change.items():
        data[stage] = {**data.get(stage, {}), **fields}
    spec = write_spec(tmp_path / "spec.yaml", data)
    assert main(["run", str(spec)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "work").exists()


# -- one real run, failing in train and resumed -----------------------------------------------------------------

def stage_folder(workdir: Path, stage: str) -> Path:
    (folder,) = workdir.glob(f"{stage}-*")
    return folder


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# `exvideo demo` (what `make demo` runs) on the shipped spec, shrunk to the fewest steps.
DEMO_SHRINK = ["preprocess.num_frames=8", "train.num_frames=16", "train.max_steps=2", "generate.conditioning_videos=1",
               "generate.params.num_frames=16", "generate.params.steps=2"]


def demo(workdir: Path, *overrides: str) -> tuple[int, str]:
    """Run `exvideo demo` into `workdir`; return its exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--set", f"workdir={workdir}", "--set",
                     f"spec_overrides=[{', '.join([*DEMO_SHRINK, *overrides])}]"])
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_svd_dir):
    """The demo, first failing in train and then resumed: one real workflow run that the module's tests share.

    The first run asks each training worker for more CPUs than the local Ray has, so train is refused after
    preprocess finished; the rerun asks for fewer (an operational field: same keys), and the unfinished train stage
    continues in its own folder. A copy of the session's tiny model saves the demo writing its own. The spec the
    demo ran is written out for the tests that rerun it with `exvideo run`.
    """
    root = tmp_path_factory.mktemp("workflow")
    workdir = root / "demo"
    model = shutil.copytree(tiny_svd_dir, workdir / "tiny-svd")
    assert demo(workdir, "train.cpus_per_worker=64")[0] == 2
    spec = load_spec(DEMO_SPEC, [f"workdir={workdir}", f"corpus={workdir / 'corpus' / 'metadata.json'}",
                                 f"model={model}", *DEMO_SHRINK])
    written = write_spec(root / "spec.yaml", spec.model_dump(mode="json", exclude_none=True))
    preprocess = stage_folder(workdir, "preprocess")
    failed = {"preprocess": mtimes(preprocess), "train_marker": list(workdir.glob(f"train-*/{MARKER}")),
              "train_folders": sorted(workdir.glob("train-*")), "files": mtimes(workdir)}
    failed["plan"] = plan(written)
    failed["files_after_plan"] = mtimes(workdir)
    code, printed = demo(workdir, "train.log_every=2", "train.cpus_per_worker=0.5")
    assert code == 0, printed[-3000:]
    return {"spec": written, "workdir": workdir, "failed": failed, "printed": printed}


def plan(spec: Path, *args: str) -> list[tuple[str, str, str, str]]:
    """`exvideo run SPEC --plan *args`: each stage's (name, state, action, rest of the line)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(spec), "--plan", *args]) == 0
    return re.findall(r"^  \[\d/4\] (\w+) +(\w+) +(\S+) +(.*)$", printed.getvalue(), re.M)


def test_demo_runs_the_whole_workflow_and_says_where_everything_is(workflow):
    out, workdir = workflow["printed"], workflow["workdir"]
    assert (workdir / "tiny-svd" / "model_index.json").is_file() and (workdir / "corpus" / "metadata.json").is_file()
    for stage in ("train", "generate", "evaluate"):
        assert re.search(rf"^  {stage} +ran ", out, re.M), out[-2000:]
    assert re.search(r"^  preprocess +skipped ", out, re.M)  # done in the failed first run
    videos = re.search(r"^  videos +(\S+)$", out, re.M).group(1)
    assert [p.name for p in Path(videos).glob("*.mp4")] == ["video0.mp4"]
    assert Path(re.search(r"^  report +(\S+)$", out, re.M).group(1)).is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir.resolve()}/mlflow.db" in out
    # One line per training log step (the first, then every log_every-th and the last), each printed once.
    assert re.findall(r"step \d+/2 loss", out) == ["step 1/2 loss", "step 2/2 loss"], out[-3000:]


def test_failed_train_resumes_without_redoing_preprocessing(workflow, capsys):
    workdir = workflow["workdir"]
    assert workflow["failed"]["train_marker"] == []  # the failed stage left no completion marker
    # Its log and the workflow's say why it failed, as the console did.
    for log in (stage_folder(workdir, "train") / "stage.log", workdir / "workflow.log"):
        assert "ERROR exvideo: failed: ValueError: training needs 64 CPU (the cluster has 2)" in log.read_text()
    preprocess = stage_folder(workdir, "preprocess")
    assert mtimes(preprocess) == workflow["failed"]["preprocess"]  # untouched by the resumed run
    assert sorted(workdir.glob("train-*")) == workflow["failed"]["train_folders"] == [stage_folder(workdir, "train")]
    for stage in ("train", "generate", "evaluate"):
        assert (stage_folder(workdir, stage) / MARKER).is_file()
    videos = sorted(p.name for p in (stage_folder(workdir, "generate") / "videos").glob("*.mp4"))
    assert videos == ["video0.mp4"]
    assert (stage_folder(workdir, "evaluate") / "report" / "index.html").is_file()


def test_second_run_of_a_completed_spec_does_no_work(workflow, capsys):
    workdir = workflow["workdir"]
    before = {stage: mtimes(stage_folder(workdir, stage)) for stage in ("preprocess", "train", "generate", "evaluate")}
    capsys.readouterr()
    assert main(["run", str(workflow["spec"])]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\[\d/4\] \w+: done before, skipped", out, re.M)) == 4
    assert "running in" not in out
    assert {stage: mtimes(stage_folder(workdir, stage)) for stage in before} == before
    assert re.search(rf"^  report +{re.escape(str(stage_folder(workdir, 'evaluate')))}/report/index.html$", out, re.M)
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir.resolve()}/mlflow.db" in out


def test_operational_changes_rerun_nothing(workflow, capsys):
    workdir = workflow["workdir"]
    before = {stage: mtimes(stage_folder(workdir, stage)) for stage in ("preprocess", "train", "generate", "evaluate")}
    changes = [f"{stage}.{field}={value}" for stage, field, value in (
        ("preprocess", "encode_actors", 2), ("train", "log_every", 7), ("train", "speed.compile_blocks", "false"),
        ("generate", "workers", 2), ("generate", "speed.batched_guidance", "false"), ("evaluate", "run_name", "x"))]
    capsys.readouterr()
    assert main(["run", str(workflow["spec"]), *(arg for change in changes for arg in ("--set", change))]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 4 and "running in" not in out
    assert {stage: mtimes(stage_folder(workdir, stage)) for stage in before} == before


def test_stage_runs_nest_under_the_workflow_run_with_lineage(workflow):
    workdir = workflow["workdir"]
    mlflow.set_tracking_uri(f"sqlite:///{workdir.resolve()}/mlflow.db")
    client = MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == load_spec(workflow["spec"]).experiment]
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("exvideo.stage"), []).append(run)
    parents = {run.info.run_id: run for run in by_stage["workflow"]}
    assert {run.info.status for run in parents.values()} >= {"FAILED", "FINISHED"}
    train, = by_stage["train"]
    generate, = by_stage["generate"]
    evaluate, = [run for run in by_stage["evaluate"] if "exvideo.stage_key" in run.data.tags]
    for run in (train, generate, evaluate):
        assert run.data.tags["mlflow.parentRunId"] in parents
    preprocess_shards = str(stage_folder(workdir, "preprocess") / "shards")
    assert train.data.tags["lineage.shards"] == preprocess_shards
    adapter = str(stage_folder(workdir, "train") / "train" / "adapter.safetensors")
    assert generate.data.tags["lineage.adapter"] == adapter
    assert evaluate.data.tags["lineage.videos"] == str(stage_folder(workdir, "generate") / "videos")
    assert generate.data.metrics["made"] == 1
    finished = [run.data.tags for run in parents.values() if run.info.status == "FINISHED"]
    assert all(tags["lineage.train.run"] == train.info.run_id for tags in finished)  # ran or skipped: same run
    states = [tags["stage.train"].split(":")[0] for tags in finished]
    assert states.count("ran") == 1 and set(states) == {"ran", "skipped"}


def test_only_redoes_one_stage_in_its_folder(workflow, capsys):
    workdir = workflow["workdir"]
    evaluate = workdir / f"evaluate-{stage_keys(load_spec(workflow['spec']))['evaluate']}"
    upstream = {stage: mtimes(stage_folder(workdir, stage)) for stage in ("preprocess", "train", "generate")}
    marker_before = (evaluate / MARKER).stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(workflow["spec"]), "--only", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert "[4/4] evaluate: running in" in out and out.count("done before, skipped") == 3
    assert (evaluate / MARKER).stat().st_mtime_ns > marker_before
    assert {stage: mtimes(stage_folder(workdir, stage)) for stage in upstream} == upstream


def test_the_plan_of_a_failed_run_says_train_resumes_and_makes_nothing(workflow):
    workdir, failed = workflow["workdir"], workflow["failed"]
    assert [line[:3] for line in failed["plan"]] == [
        ("preprocess", "done", "skip"), ("train", "unfinished", "resume"), ("generate", "new", "run"),
        ("evaluate", "new", "run")]
    # The folders the plan names are the ones the resumed run used.
    assert [line[3] for line in failed["plan"]] == [str(stage_folder(workdir, stage)) for stage in
                                                    ("preprocess", "train", "generate", "evaluate")]
    assert failed["files_after_plan"] == failed["files"]


def test_the_plan_of_a_finished_run_follows_from_only_changes_and_holders(workflow):
    from exvideo.storage import hold_folder

    spec, workdir = workflow["spec"], workflow["workdir"]
    before = mtimes(workdir)
    assert [line[1:3] for line in plan(spec)] == [("done", "skip")] * 4
    assert [line[1:3] for line in plan(spec, "--from", "train")] == [("done", "skip")] + [("done", "redo")] * 3
    assert [line[1:3] for line in plan(spec, "--only", "generate")] == [
        ("done", "skip"), ("done", "skip"), ("done", "redo"), ("done", "-")]
    assert [line[1:3] for line in plan(spec, "--set", "train.lr=0.002")] == [
        ("done", "skip"), ("new", "run"), ("new", "run"), ("new", "run")]
    assert [line[1:3] for line in plan(spec, "--set", "train.log_every=7")] == [("done", "skip")] * 4
    assert mtimes(workdir) == before and len(list(workdir.glob("train-*"))) == 1  # the plans made nothing

    printed = io.StringIO()
    with hold_folder(workdir, "exvideo run"), hold_folder(stage_folder(workdir, "generate"), "exvideo generate"), \
            contextlib.redirect_stdout(printed):
        assert main(["run", str(spec), "--plan"]) == 0
    said = printed.getvalue()
    assert f"the workdir is in use by exvideo run (pid {os.getpid()} on " in said
    assert re.search(rf"generate +done +skip +\S+ \(in use by exvideo generate \(pid {os.getpid()} on ", said)
    assert said.count("in use by") == 2
    assert main(["run", str(spec), "--plan", "--address", "http://127.0.0.1:8265"]) == 2


# Last: it leaves a second generate and evaluate folder, which the tests above would not expect.
def test_an_output_change_reruns_its_stage_and_those_after_it(workflow, capsys):
    workdir = workflow["workdir"]
    preprocess = mtimes(stage_folder(workdir, "preprocess"))
    capsys.readouterr()
    # A generation field (the keys test above covers train.lr, preprocess.num_frames and a reshard filter).
    assert main(["run", str(workflow["spec"]), "--set", "generate.params.seed=5"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^\[\d/4\] (\w+): (done before, skipped|running in)", out, re.M) == [
        ("preprocess", "done before, skipped"), ("train", "done before, skipped"), ("generate", "running in"),
        ("evaluate", "running in")]
    assert mtimes(stage_folder(workdir, "preprocess")) == preprocess
    assert len(list(workdir.glob("train-*"))) == 1 and len(list(workdir.glob("generate-*"))) == 2

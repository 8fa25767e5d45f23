"""The workflow on a real multi-node Ray cluster on this machine: work spreads over both worker nodes, and a
worker node lost mid-stage (its process group killed) costs no sample, step or video, nor duplicates one.

The cluster (exvideo.local_cluster) is a head with no CPUs of its own and two worker nodes, `a` and `b`, with 2
CPUs each: one encoder actor, training worker or generation actor per node, beside one decode task. Stages run as
`exvideo` commands connected with `ray_address`, as an operator runs them against a cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from exvideo.local_cluster import LocalCluster
from preprocessing.shards import sample_digests
from preprocessing.synthetic import VideoSpec, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray Data dispatches rows once every actor of a pool is up: the two tiny videos land one per actor, instead of
    # both on whichever actor started first. One OpenMP thread per process: Ray gives a 2-CPU training worker two,
    # and two such workers on this 2-core machine mostly spin waiting for each other (a tiny step took 6 s, 0.4 s
    # with one thread); the tasks and actors of 1 CPU have one already. On every node, so a driver the Jobs API
    # starts honours them too.
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=("a", "b"), cpus_per_worker=2,
                      env={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300", "OMP_NUM_THREADS": "1"}) as running:
        yield running


def node_names(cluster: LocalCluster) -> dict[str, str]:
    """Ray node id -> worker node name, for every id a worker node has had."""
    return {node: name for name, ids in cluster.node_ids().items() for node in ids}


def by_name(per_node: dict, cluster: LocalCluster) -> dict[str, dict]:
    names = node_names(cluster)
    return {names.get(node, node): counts for node, counts in per_node.items()}


def exvideo(cluster: LocalCluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(Path(sys.executable).parent / "exvideo"), *args], env=cluster.client_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def marker(folder: Path) -> dict:
    return json.loads((folder / "_complete.json").read_text())


def test_workflow_spreads_over_both_nodes_and_resumes_after_its_driver_is_killed(cluster, tmp_path, synthetic_corpus,
                                                                                tiny_svd_dir):
    """`exvideo run` connected with `ray_address`, killed (SIGKILL) once train has a checkpoint; then the same spec
    submitted through the Jobs API, which resumes in the same folders. Every stage ran on both worker nodes."""
    spec = {
        "workdir": str(tmp_path / "work"), "corpus": str(synthetic_corpus), "model": str(tiny_svd_dir),
        "ray_address": cluster.address,
        "preprocess": {"num_frames": 8, "height": 64, "width": 64, "shard_max_samples": 2, "encode_actors": 2},
        # Steps enough that the killed driver's workers are gone before the last one; every checkpoint kept.
        "train": {"num_frames": 16, "max_steps": 12, "checkpoint_every": 2, "keep_last": 6, "num_workers": 2,
                  "cpus_per_worker": 2, "gradient_checkpointing": False},
        "generate": {"conditioning_videos": 2, "workers": 2,
                     "params": {"num_frames": 16, "height": 64, "width": 64, "steps": 1}},
        "evaluate": {"title": "on two nodes"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    work = tmp_path / "work"
    driver = subprocess.Popen([str(Path(sys.executable).parent / "exvideo"), "run", str(tmp_path / "spec.yaml")],
                              env=cluster.client_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(registered(run, "checkpoint-00000002") for run in work.glob("train-*/train")), 400,
                 "train's first registered checkpoint")
    finally:
        driver.kill()
        driver.wait()
    (preprocess,), (train,) = sorted(work.glob("preprocess-*")), sorted(work.glob("train-*"))
    assert not (train / "_complete.json").exists()
    preprocessed = {p: p.stat().st_mtime_ns for p in preprocess.rglob("*")}
    saved = {p: p.stat().st_mtime_ns for p in (train / "train").glob("checkpoint-*/*")}

    done = exvideo(cluster, "run", str(tmp_path / "spec.yaml"), "--address", cluster.dashboard)
    out = done.stdout
    assert re.search(r"^submitted job \S+ to http://127\.0\.0\.1:\d+", out, re.M)
    assert re.search(r"job \S+: SUCCEEDED", out)
    assert "[1/4] preprocess: done before, skipped" in out and f"[2/4] train: running in {train}" in out
    # The workers' own lines reach the job's log: the ranks resumed from a checkpoint the killed run registered.
    resumed = {int(n) for n in re.findall(r"resumed from step (\d+)", out)}
    assert resumed and resumed <= {2, 4, 6, 8, 10}, out[-4000:]
    # Quiet by default: Ray Train's per-report INFO lines (a logger named by file path, outside ray.train) stay out.
    assert "Reporting training result" not in out, out[-4000:]
    # Resumed, not restarted: the checkpoints the killed run saved are still the very same files.
    assert saved and all(p.stat().st_mtime_ns == mtime for p, mtime in saved.items())
    assert json.loads((train / "train" / "result.json").read_text())["steps"] == 12
    assert sorted(work.glob("train-*")) == [train]
    assert {p: p.stat().st_mtime_ns for p in preprocess.rglob("*")} == preprocessed
    (generate,) = sorted(work.glob("generate-*"))
    assert all((folder / "_complete.json").is_file() for folder in (preprocess, train, generate))

    # Placement: encoders, training workers and generation workers on both worker nodes.
    for actor in ("ClipEncoder", "RayTrainWorker", "VideoMaker"):
        assert set(cluster.actors_per_worker(actor)) == {"a", "b"}, actor
    # What each node did (the few tiny clips may all reach the encoder that started first).
    decoded = by_name(marker(preprocess)["outputs"]["per_node"], cluster)
    assert set(decoded) == {"a", "b"} and all(c["sources_decoded"] >= 1 for c in decoded.values()), decoded
    run = json.loads((preprocess / "run.json").read_text())
    assert sum(c["sources_decoded"] for c in decoded.values()) == run["counts"]["sources"]  # the missing file too
    assert sum(c.get("clips_encoded", 0) for c in decoded.values()) == run["counts"]["samples"]
    result = json.loads((train / "train" / "result.json").read_text())
    assert by_name(result["worker_steps_by_node"], cluster) == {"a": 12, "b": 12}
    made = by_name(marker(generate)["outputs"]["per_node"], cluster)
    assert made == {"a": {"videos": 1}, "b": {"videos": 1}}
    records = [json.loads(p.read_text()) for p in (generate / "videos").glob("*.json")]
    assert {node_names(cluster)[r["node"]] for r in records} == {"a", "b"}

    # MLflow: each stage's run holds its per-node counts.
    client = MlflowClient(f"sqlite:///{work.resolve()}/mlflow.db")
    runs = {r.data.tags.get("exvideo.stage"): r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    for stage, name in (("preprocess", "sources_decoded"), ("train", "worker_steps"), ("generate", "videos")):
        metrics = {k for k in runs[stage].data.metrics if k.startswith("node.") and k.endswith(name)}
        assert len(metrics) == 2, (stage, runs[stage].data.metrics)


def many_videos(root: Path, count: int) -> Path:
    """A corpus of `count` small good videos (no broken ones): enough for a node to be lost mid-run."""
    specs = tuple(VideoSpec(f"v{i:02d}", num_frames=16, speed=1.0 + i % 4) for i in range(count))
    return write_corpus(root, specs, broken=False)


def registered(run_dir: Path, checkpoint: str) -> bool:
    """Whether Ray Train has registered `checkpoint` of the run (its snapshot names it): written is not enough,
    a resume starts from the latest registered one."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and checkpoint in snapshot.read_text()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def run_losing_node_b(cluster: LocalCluster, args: list[str], ready, what: str,
                      back_after_s: float | None = None) -> str:
    """Run `exvideo *args` on the cluster; once `ready()`, kill worker node b (and restart it `back_after_s` later,
    as a preempted node is replaced); return the command's output, asserting it succeeded."""
    process = subprocess.Popen([str(Path(sys.executable).parent / "exvideo"), *args], env=cluster.client_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(ready, 400, what)
        cluster.kill_worker("b")
        if back_after_s is not None:
            time.sleep(back_after_s)
            cluster.add_worker("b")
        out, _ = process.communicate(timeout=600)
    finally:
        process.kill()
        if not cluster.nodes["b"].alive:  # for the next test (the head may not have noticed the loss yet)
            cluster.add_worker("b")
    assert process.returncode == 0, out[-4000:]
    return out


def test_preprocess_survives_losing_a_worker_node_with_the_same_samples(cluster, tmp_path, tiny_svd_dir):
    manifest = many_videos(tmp_path / "corpus", 12)
    fields = [arg for value in (f"input={manifest}", f"model={tiny_svd_dir}", "num_frames=8", "height=32",
                                "width=32", "shard_max_samples=2", f"ray_address={cluster.address}",
                                "progress=false") for arg in ("--set", value)]
    # The reference with one encoder actor (one process fewer to start): the actor count is operational, the
    # samples are the same.
    exvideo(cluster, "preprocess", *fields, "--set", "encode_actors=1", "--set", f"output={tmp_path / 'undisturbed'}")
    expected = sample_digests(tmp_path / "undisturbed" / "shards")
    assert len(expected) == 12

    disturbed = tmp_path / "disturbed"
    run_losing_node_b(cluster, ["preprocess", *fields, "--set", "encode_actors=2", "--set", f"output={disturbed}"],
                      lambda: (disturbed / "commits" / "000000.json").is_file(), "the first committed shard")
    assert sample_digests(disturbed / "shards") == expected  # same keys, same bytes, none twice
    assert not [p.name for p in disturbed.rglob("*") if p.name.startswith(".")]  # no temporary file left
    run = json.loads((disturbed / "run.json").read_text())
    assert run["status"] == "complete" and run["counts"]["samples"] == 12 and run["counts"]["failures"] == 0


def test_generation_survives_losing_a_worker_node_and_makes_every_row_once(cluster, tmp_path, tiny_svd_dir):
    from PIL import Image

    rows = []
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 128, 255 - 40 * i)).save(tmp_path / f"image{i}.png")
        rows.append({"id": f"row{i}", "image": f"image{i}.png", "seed": i})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "videos-job"
    args = [arg for value in (f"input={tmp_path / 'rows.jsonl'}", f"output={output}", f"model={tiny_svd_dir}",
                              "workers=2", f"ray_address={cluster.address}", "params.method=direct",
                              "params.num_frames=8", "params.height=64", "params.width=64", "params.steps=4")
            for arg in ("--set", value)]
    run_losing_node_b(cluster, ["generate", *args], lambda: any((output / "videos").glob("*.json")),
                      "the first finished video")
    summary = json.loads((output / "summary.json").read_text())
    assert sorted(summary["made"]) == [f"row{i}" for i in range(6)] and summary["failed"] == 0
    files = sorted(p.name for p in (output / "videos").iterdir())
    assert files == sorted(f"row{i}{suffix}" for i in range(6) for suffix in (".json", ".mp4", ".png"))
    import decord

    for i in range(6):
        record = json.loads((output / "videos" / f"row{i}.json").read_text())
        assert len(decord.VideoReader(str(output / "videos" / f"row{i}.mp4"))) == record["frames"] == 8


def test_training_restarts_from_its_checkpoint_when_a_worker_node_is_lost(cluster, tmp_path, tiny_svd_dir):
    from exvideo import load_adapter, load_unet
    from test_train import write_shards

    write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    run_dir = tmp_path / "runs" / "lost"
    args = [arg for value in (f"svd_dir={tiny_svd_dir}", f"shards={tmp_path / 'shards'}",
                              f"storage_path={tmp_path / 'runs'}", "name=lost", "num_frames=16", "max_steps=16",
                              "checkpoint_every=4", "log_every=1", "num_workers=2", "cpus_per_worker=2",
                              "gradient_checkpointing=false", "max_failures=2", f"ray_address={cluster.address}",
                              f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
            for arg in ("--set", value)]
    # A preempted node replaced (by a new node, started at once): the worker group restarts once it fits again.
    out = run_losing_node_b(cluster, ["train", *args], lambda: registered(run_dir, "checkpoint-00000004"),
                            "the first checkpoint", back_after_s=0)
    # Both ranks resumed from the same saved checkpoint; from there every step ran once, in order. (Steps the lost
    # node's rank 0 printed after it may never reach this console: its log streamer went down with it.)
    restored = {int(n) for n in re.findall(r"resumed from step (\d+)", out)}
    assert len(restored) == 1 and restored <= {4, 8, 12}, out[-4000:]
    before, after = (re.findall(r"step (\d+)/16 loss", part) for part in out.split("resumed from step", 1))
    assert [int(n) for n in before] == list(range(1, len(before) + 1)), out[-6000:]
    assert [int(n) for n in after] == list(range(min(restored) + 1, 17)), out[-6000:]
    result = json.loads((run_dir / "result.json").read_text())
    names = node_names(cluster)
    by_node: dict[str, int] = {}
    for node, count in result["worker_steps_by_node"].items():  # b came back as a new node, with a new id
        by_node[names[node]] = by_node.get(names[node], 0) + count
    # The steps a checkpoint saved plus those after it: none of the lost steps counted twice.
    assert by_node == {"a": 16, "b": 16}, result["worker_steps_by_node"]
    unet = load_unet(tiny_svd_dir)
    load_adapter(unet, run_dir / "adapter.safetensors")  # strict: names and shapes

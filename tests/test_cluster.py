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
from exvideo.storage import LOCK
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


STEPS = 20  # of the workflow's training: room for a driver kill, then a node loss, each after a checkpoint


@pytest.fixture(scope="module")
def interrupted_workflow(cluster, tmp_path_factory, synthetic_corpus, tiny_svd_dir) -> dict:
    """The workflow twice interrupted in its training: `exvideo run` connected with `ray_address`, killed (SIGKILL)
    once train has a registered checkpoint; then the same spec submitted through the Jobs API, which resumes in the
    same folders, and loses worker node b (replaced at once) once the resumed training has registered a checkpoint
    of its own. One run serves two tests, the driver's loss and the node's, as a training run is the dearest
    thing on this cluster."""
    root = tmp_path_factory.mktemp("workflow")
    work = root / "work"
    spec = {
        "workdir": str(work), "corpus": str(synthetic_corpus), "model": str(tiny_svd_dir),
        "ray_address": cluster.address,
        "preprocess": {"num_frames": 8, "height": 64, "width": 64, "shard_max_samples": 2, "encode_actors": 2},
        # Every checkpoint kept: the killed run's must still be there, the very same files, at the end.
        "train": {"num_frames": 16, "max_steps": STEPS, "checkpoint_every": 2, "keep_last": STEPS // 2,
                  "log_every": 1, "num_workers": 2, "cpus_per_worker": 2, "gradient_checkpointing": False,
                  "max_failures": 2},
        "generate": {"conditioning_videos": 2, "workers": 2,
                     "params": {"num_frames": 16, "height": 64, "width": 64, "steps": 1}},
        "evaluate": {"title": "on two nodes"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    driver = subprocess.Popen([str(Path(sys.executable).parent / "exvideo"), "run", str(root / "spec.yaml")],
                              env=cluster.client_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(2 in registered_steps(run) for run in work.glob("train-*/train")), 400,
                 "train's first registered checkpoint")
    finally:
        driver.kill()
        driver.wait()
    # The killed driver's training goes down with it (its controller and workers were its actors): what it left is
    # final once they are gone.
    wait_for(lambda: not cluster.alive_actors("TrainController") and not cluster.alive_actors("RayTrainWorker"), 60,
             "the killed run's training actors to go")
    (preprocess,), (train,) = sorted(work.glob("preprocess-*")), sorted(work.glob("train-*"))
    registered = registered_steps(train / "train")
    killed = {"complete": (train / "_complete.json").exists(), "registered": registered,
              "preprocessed": {p: p.stat().st_mtime_ns for p in preprocess.rglob("*")},
              "saved": {p: p.stat().st_mtime_ns for step in registered
                        for p in (train / "train" / f"checkpoint-{step:08d}").iterdir()}}
    out = run_losing_node_b(
        cluster, ["run", str(root / "spec.yaml"), "--address", cluster.dashboard],
        lambda: max(registered_steps(train / "train"), default=0) > max(killed["registered"]),
        "a checkpoint of the resumed training", back_after_s=0)
    return {"work": work, "preprocess": preprocess, "train": train, "killed": killed, "out": out}


def resumed_steps(out: str) -> list[int]:
    """The steps the training ranks said they resumed from, ascending, once each. (Ray prints a line that several
    workers print alike once, possibly late, so a rank's own line may not be where it happened.)"""
    return sorted({int(n) for n in re.findall(r"resumed from step (\d+)", out)})


def registered_steps(run_dir: Path) -> set[int]:
    """Steps of the checkpoints Ray Train has registered for the run (its snapshot names them): written is not
    enough, a resume starts from the latest registered one."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return {int(n) for n in re.findall(r"checkpoint-(\d+)", snapshot.read_text())} if snapshot.is_file() else set()


def test_workflow_spreads_over_both_nodes_and_resumes_after_its_driver_is_killed(interrupted_workflow, cluster):
    """The rerun through the Jobs API resumes in the killed driver's folders; every stage ran on both worker
    nodes."""
    run = interrupted_workflow
    work, preprocess, train, killed, out = (run[k] for k in ("work", "preprocess", "train", "killed", "out"))
    assert not killed["complete"] and killed["registered"]
    assert re.search(r"^submitted job \S+ to http://127\.0\.0\.1:\d+", out, re.M)
    assert re.search(r"job \S+: SUCCEEDED", out)
    assert "[1/4] preprocess: done before, skipped" in out and f"[2/4] train: running in {train}" in out
    # The workers' own lines reach the job's log: the ranks resumed from the killed run's last registered checkpoint.
    assert min(resumed_steps(out)) == max(killed["registered"]), out[-4000:]
    # Quiet by default: Ray Train's per-report INFO lines (a logger named by file path, outside ray.train) stay out.
    assert "Reporting training result" not in out, out[-4000:]
    assert "\x1b[" not in out  # the job's log is a file: the workers' lines carry no colour codes
    # Resumed, not restarted: the checkpoints the killed run registered are still the very same files.
    assert killed["saved"] and all(p.stat().st_mtime_ns == mtime for p, mtime in killed["saved"].items())
    assert json.loads((train / "train" / "result.json").read_text())["steps"] == STEPS
    assert sorted(work.glob("train-*")) == [train]
    assert {p: p.stat().st_mtime_ns for p in preprocess.rglob("*")} == killed["preprocessed"]
    (generate,) = sorted(work.glob("generate-*"))
    assert all((folder / "_complete.json").is_file() for folder in (preprocess, train, generate))

    # Placement: encoders, training workers and generation workers on both worker nodes.
    for actor in ("ClipEncoder", "RayTrainWorker", "VideoMaker"):
        assert set(cluster.actors_per_worker(actor)) == {"a", "b"}, actor
    # What each node did (the few tiny clips may all reach the encoder that started first).
    decoded = by_name(marker(preprocess)["outputs"]["per_node"], cluster)
    assert set(decoded) == {"a", "b"} and all(c["sources_decoded"] >= 1 for c in decoded.values()), decoded
    summary = json.loads((preprocess / "run.json").read_text())
    assert sum(c["sources_decoded"] for c in decoded.values()) == summary["counts"]["sources"]  # the missing file too
    assert sum(c.get("clips_encoded", 0) for c in decoded.values()) == summary["counts"]["samples"]
    made = by_name(marker(generate)["outputs"]["per_node"], cluster)
    assert made == {"a": {"videos": 1}, "b": {"videos": 1}}
    records = [json.loads(p.read_text()) for p in (generate / "videos").glob("*.json")]
    assert {node_names(cluster)[r["node"]] for r in records} == {"a", "b"}

    # MLflow: each stage's run holds its per-node counts (node b had two ids in training: it was replaced).
    client = MlflowClient(f"sqlite:///{work.resolve()}/mlflow.db")
    runs = {r.data.tags.get("exvideo.stage"): r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    ids = {node[:8]: name for node, name in node_names(cluster).items()}
    for stage, name in (("preprocess", "sources_decoded"), ("train", "worker_steps"), ("generate", "videos")):
        nodes = {ids.get(key.split(".")[1], key) for key in runs[stage].data.metrics
                 if key.startswith("node.") and key.endswith(name)}
        assert nodes == {"a", "b"}, (stage, runs[stage].data.metrics)


def test_training_restarts_from_its_checkpoint_when_a_worker_node_is_lost(interrupted_workflow, cluster,
                                                                          tiny_svd_dir):
    """Node b lost in the resumed training, and replaced at once (a preempted node, a new one started): the worker
    group restarts from the latest checkpoint once it fits again; no step is lost or repeated after it."""
    from exvideo import load_adapter, load_unet

    run = interrupted_workflow
    out, run_dir = run["out"], run["train"] / "train"
    # The ranks resumed twice: from the killed run's checkpoint, then from one the resumed run registered.
    resumed = resumed_steps(out)
    assert len(resumed) == 2 and resumed[1] % 2 == 0, out[-6000:]
    first, restored = resumed
    # Rank 0's step log: from each resume on, every step ran once, in order; it breaks once, where the restart
    # went back to the restored checkpoint. (Steps the lost node's rank 0 printed just before the loss may never
    # reach this console, its log streamer gone with it: the break may skip ahead as well as go back.)
    steps = [int(n) for n in re.findall(rf"step (\d+)/{STEPS} loss", out)]
    breaks = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1]
    assert len(breaks) <= 1 and restored + 1 in steps, out[-6000:]
    cut = breaks[0] if breaks else steps.index(restored + 1)
    before, after = steps[:cut], steps[cut:]
    assert before == list(range(first + 1, first + 1 + len(before))), out[-6000:]
    assert after == list(range(restored + 1, STEPS + 1)), out[-6000:]
    result = json.loads((run_dir / "result.json").read_text())
    names = node_names(cluster)
    by_node: dict[str, int] = {}
    for node, count in result["worker_steps_by_node"].items():  # b came back as a new node, with a new id
        by_node[names[node]] = by_node.get(names[node], 0) + count
    # The steps a checkpoint saved plus those after it: none of the lost steps counted twice.
    assert by_node == {"a": STEPS, "b": STEPS}, result["worker_steps_by_node"]
    unet = load_unet(tiny_svd_dir)
    load_adapter(unet, run_dir / "adapter.safetensors")  # strict: names and shapes


def many_videos(root: Path, count: int) -> Path:
    """A corpus of `count` small good videos (no broken ones): enough for a node to be lost mid-run."""
    specs = tuple(VideoSpec(f"v{i:02d}", num_frames=16, speed=1.0 + i % 4) for i in range(count))
    return write_corpus(root, specs, broken=False)


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
    # No temporary file left; the lock the command held is no output.
    assert [p.name for p in disturbed.rglob("*") if p.name.startswith(".")] == [LOCK]
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

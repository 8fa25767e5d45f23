"""Training with Ray Train on real tar shards, a tiny real UNet and a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import webdataset as wds

from exvideo import load_adapter, load_unet, post_tuning_loss, tiny_svd_components
from exvideo.adapter import read_adapter
from exvideo.samples import ClipRecord, LatentClip, collate, encode_sample
from pipelines.train import TrainConfig, run_training
from pipelines.train.data import list_shards, rank_stream


def write_shards(directory: Path, num_shards: int, per_shard: int, num_frames: int = 6, seed: int = 0,
                 nan_keys: tuple[str, ...] = ()) -> list[str]:
    """Tiny latent clips in the shard contract, as preprocessing writes them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(num_shards):
        with wds.TarWriter(str(directory / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                key = f"clip{s:03d}_{i:03d}"
                latents = rng.standard_normal((num_frames, 4, 8, 8)).astype(np.float16)
                if key in nan_keys:
                    latents[:] = np.nan
                sink.write(encode_sample(LatentClip(
                    key=key, latents=latents, cond_latent=latents[0],
                    image_embeds=rng.standard_normal((1, 32)).astype(np.float16),
                    record=ClipRecord(source=f"{key}.mp4", fps=24.0, frame_indices=list(range(num_frames)),
                                      motion_bucket=int(rng.integers(0, 128))),
                )))
                keys.append(key)
    return keys


def config(tmp_path, tiny_svd_dir, shards, **overrides) -> TrainConfig:
    base = dict(svd_dir=tiny_svd_dir, shards=str(shards), storage_path=tmp_path / "runs", name="t",
                num_frames=16, max_steps=4, checkpoint_every=2, log_every=1, lr=1e-3, ema_decay=0.5,
                gradient_checkpointing=False)
    return TrainConfig(**{**base, **overrides})


def test_rank_streams_split_without_overlap_and_resume_exactly(tmp_path):
    keys = write_shards(tmp_path / "s", num_shards=4, per_shard=3)
    shards = list_shards(str(tmp_path / "s"))
    first = [c.key for _, c in zip(range(12), rank_stream(shards, 0, 2, seed=1))]
    second = [c.key for _, c in zip(range(12), rank_stream(shards, 1, 2, seed=1))]
    assert not set(first[:6]) & set(second[:6]) and set(first[:6]) | set(second[:6]) == set(keys)
    resumed = [c.key for _, c in zip(range(7), rank_stream(shards, 0, 2, seed=1, start=5))]
    assert resumed == first[5:12]
    few = list_shards(str(tmp_path / "s") + "/shard-000000.tar")  # fewer shards than ranks: split samples
    a = [c.key for _, c in zip(range(3), rank_stream(few, 0, 2, seed=0))]
    b = [c.key for _, c in zip(range(3), rank_stream(few, 1, 2, seed=0))]
    assert not set(a[:1]) & set(b[:1])


def test_corrupt_shard_is_skipped_and_missing_shards_are_named(tmp_path):
    write_shards(tmp_path / "s", num_shards=2, per_shard=2)
    data = (tmp_path / "s" / "shard-000001.tar").read_bytes()
    (tmp_path / "s" / "shard-000001.tar").write_bytes(data[: len(data) // 3])
    from pipelines.train.data import StreamStats
    stats = StreamStats()
    keys = [c.key for _, c in zip(range(4), rank_stream(list_shards(str(tmp_path / "s")), 0, 1, 0, stats=stats))]
    assert set(keys) >= {"clip000_000", "clip000_001"} and stats.bad_shards
    with pytest.raises(FileNotFoundError, match="no shards found"):
        list_shards(str(tmp_path / "nothing-*.tar"))


def trained_loss(unet, clips) -> float:
    """Loss at fixed noise levels and noise: comparable before and after training."""
    batch = collate(clips)
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.5] * len(clips))
    noise = torch.randn(batch.latents.shape, generator=g)
    with torch.no_grad():
        return post_tuning_loss(unet, batch, sigma=sigma, noise=noise).item()


# Two workers and a clip whose latents are NaN (a broken encoder output): its steps are skipped, counted, never applied.
TWO_WORKERS = dict(num_workers=2, max_steps=16, nan_keys=("clip001_002",))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_svd_dir, ray_local, mlflow_server):
    """One uninterrupted two-worker run, tracked on a real `mlflow server`: (config, result). The resume test
    compares an interrupted run of the same config with it."""
    root = tmp_path_factory.mktemp("train")
    write_shards(root / "shards", num_shards=2, per_shard=3, nan_keys=TWO_WORKERS["nan_keys"])
    cfg = config(root, tiny_svd_dir, root / "shards", name="straight", num_workers=2,
                 max_steps=TWO_WORKERS["max_steps"], checkpoint_every=8, tracking_uri=mlflow_server[0],
                 experiment="train-test")
    return cfg, run_training(cfg)


def test_two_workers_learn_agree_keep_frozen_weights_and_track(straight, tiny_svd_dir, mlflow_server):
    cfg, result = straight
    assert result.steps == 16
    state = json.loads((result.checkpoint_dir / "state.json").read_text())
    assert state["nonfinite_total"] >= 1
    tensors, metadata = read_adapter(result.adapter)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # Conditioned on fps 30 like the reference (the clips are 24 fps); generation defaults to what it records.
    assert (metadata["fps_condition"], metadata["fps"]) == ("30", "30")

    # Both ranks recorded the same trainable weights and untouched frozen weights (check_replicas ran too).
    replicas = [json.loads((result.checkpoint_dir / f"replica-{r}.json").read_text()) for r in (0, 1)]
    assert replicas[0]["trainable"] == replicas[1]["trainable"]
    base = load_unet(tiny_svd_dir)
    from exvideo import extend_unet, freeze_for_post_tuning
    from pipelines.train.loop import weights_fingerprint
    extend_unet(base, 16)
    freeze_for_post_tuning(base)
    assert replicas[0]["frozen"] == weights_fingerprint(p for p in base.parameters() if not p.requires_grad)

    # The adapter learned: lower loss on the training clips at fixed noise than the untrained extension.
    from pipelines.train.data import rank_stream
    clips = [c for _, c in zip(range(6), rank_stream(list_shards(cfg.shards), 0, 1, 0))]
    clips = [c for c in clips if c.key not in TWO_WORKERS["nan_keys"]]
    before = trained_loss(base, clips)
    load_adapter(base, result.adapter)
    assert trained_loss(base, clips) < before

    client = mlflow.MlflowClient(mlflow_server[0])
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["max_steps"] == "16" and run.data.params["num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 17))
    assert {"lr", "grad_norm", "samples_per_s", "step_time_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert artifacts == {"adapter/adapter.safetensors", "adapter/ema_adapter.safetensors"}
    assert (result.run_dir / "mlflow_run_id.txt").read_text() == result.mlflow_run_id


def test_stopped_then_killed_run_resumes_exactly(straight, tmp_path):
    """The straight run's config, run in pieces: stopped at step 6 and re-run with more steps (the driver resumes
    from the run's last checkpoint), then a worker killed after step 9 (Ray Train restarts the worker group from that
    checkpoint). It must end with the straight run's weights, its steps logged in one MLflow run."""
    import threading
    import time

    import psutil
    import ray
    from ray.util.state import list_actors

    cfg, straight_result = straight
    pieces = cfg.model_copy(update={"storage_path": tmp_path / "runs", "name": "pieces", "checkpoint_every": 3,
                                    "tracking_uri": None, "max_failures": 1})
    ctrl_c = signal.getsignal(signal.SIGINT)
    assert run_training(pieces.model_copy(update={"max_steps": 6})).steps == 6
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # Ray Train's Ctrl-C handler does not outlive its run
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_training(pieces)))
    thread.start()
    deadline = time.time() + 240
    while not (pieces.run_dir / "checkpoint-00000009").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    # A worker of this session's Ray: the other xdist worker's tests (a cluster of their own) may be training too.
    victims = list_actors(ray.get_runtime_context().gcs_address, detail=True,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert victims, "no Ray Train worker alive"
    psutil.Process(max(actor.pid for actor in victims)).kill()
    thread.join(timeout=300)
    resumed = outcome["result"]
    assert resumed.steps == 16
    state = json.loads((resumed.checkpoint_dir / "state.json").read_text())
    assert state["clips_consumed"] == 16
    a, _ = read_adapter(straight_result.adapter)
    b, _ = read_adapter(resumed.adapter)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)

    # One MLflow run for all pieces: the steps before the restored checkpoint logged once each; steps the killed
    # worker group made after it are made (and logged) again.
    client = mlflow.MlflowClient(pieces.resolved_tracking_uri)
    steps = [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "loss")]
    assert steps[:9] == list(range(1, 10)) and set(steps) == set(range(1, 17))
    # A second run of a finished config starts no worker and returns the same result.
    assert run_training(pieces) == resumed
    manifest = json.loads((pieces.run_dir / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == 16


def test_a_run_folder_refuses_another_configuration_but_not_more_steps(tmp_path, tiny_svd_dir):
    from exvideo.outputs import OutputMismatchError, write_run_manifest
    from pipelines.train.run import TrainResult, run_identity

    write_shards(tmp_path / "s", num_shards=1, per_shard=2)
    cfg = config(tmp_path, tiny_svd_dir, tmp_path / "s")
    write_run_manifest(cfg.run_dir, "run.json", run_identity(cfg), stage="train", status="complete", steps=4)
    finished = TrainResult(run_dir=cfg.run_dir, checkpoint_dir=cfg.run_dir / "checkpoint-00000004",
                           adapter=cfg.run_dir / "adapter.safetensors", best_adapter=None, mlflow_run_id="r",
                           steps=4, final_loss=0.5)
    finished.save(cfg.run_dir / "result.json")
    # Operational fields and fewer steps: the same run, finished; no Ray needed to say so.
    assert run_training(cfg.model_copy(update={"max_steps": 3, "log_every": 7})) == finished
    with pytest.raises(OutputMismatchError, match=r"^output .*/runs/t was written by another configuration; "
                                                  r"changed: lr: 0.001 -> 0.002; seed: 0 -> 1\. .*give the run "
                                                  r"another name or storage_path \(raising max_steps alone continues"):
        run_training(cfg.model_copy(update={"lr": 2e-3, "seed": 1}))
    # The same config on a base model rewritten in place (another UNet under the same path) is another run.
    model = shutil.copytree(tiny_svd_dir, tmp_path / "model")
    write_run_manifest(cfg.run_dir, "run.json", run_identity(cfg.model_copy(update={"svd_dir": model})),
                       stage="train", status="complete", steps=4)
    tiny_svd_components(seed=1).unet.save_pretrained(model / "unet")
    with pytest.raises(OutputMismatchError, match=r"changed: unet_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\."):
        run_training(cfg.model_copy(update={"svd_dir": model}))


def test_a_worker_group_larger_than_the_local_ray_is_refused_before_the_run_starts(tmp_path, tiny_svd_dir,
                                                                                    ray_local):
    write_shards(tmp_path / "s", num_shards=1, per_shard=2)
    cfg = config(tmp_path, tiny_svd_dir, tmp_path / "s", num_workers=3)  # the session's Ray has 2 CPUs
    with pytest.raises(ValueError, match=r"training needs 3 CPU \(the cluster has 2\) for num_workers 3 x "
                                         r"cpus_per_worker 1, more than this machine's Ray will ever have"):
        run_training(cfg)
    assert not cfg.run_dir.exists()  # no MLflow run, no run folder


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, tiny_svd_dir, ray_local):
    write_shards(tmp_path / "nan", num_shards=1, per_shard=2, nan_keys=("clip000_000", "clip000_001"))
    cfg = config(tmp_path, tiny_svd_dir, tmp_path / "nan", name="nan", max_steps=5, max_nonfinite=2, max_failures=0)
    with pytest.raises(Exception, match="2 consecutive steps had a non-finite loss"):
        run_training(cfg)
    manifest = json.loads((cfg.run_dir / "run.json").read_text())
    assert manifest["status"] == "failed" and "2 consecutive steps had a non-finite loss" in manifest["error"]


def test_ctrl_c_stops_training_with_a_message_and_its_registered_checkpoints(tmp_path, tiny_svd_dir):
    """Ctrl-C in `exvideo train`: Ray Train aborts the run and would leave silently with exit code 1; the command
    says it was interrupted and how to go on, and exits 130 as the shell's commands do, the checkpoints kept."""
    write_shards(tmp_path / "shards", num_shards=1, per_shard=4)
    run_dir = tmp_path / "runs" / "exvideo"
    fields = (f"svd_dir={tiny_svd_dir}", f"shards={tmp_path / 'shards'}", f"storage_path={tmp_path / 'runs'}",
              "num_frames=16", "max_steps=1000", "checkpoint_every=2", "gradient_checkpointing=false")
    process = subprocess.Popen([str(Path(sys.executable).parent / "exvideo"), "train",
                                *(arg for field in fields for arg in ("--set", field))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # As a user runs it: the suite's own switch for the watcher left out (conftest).
                               env={k: v for k, v in os.environ.items() if k != "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"})
    try:
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 300
        while not (snapshot.is_file() and "checkpoint-" in snapshot.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint registered"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, out[-2000:] + err[-2000:]
    assert (f"exvideo train: interrupted (training stopped; a rerun resumes from the latest checkpoint it registered "
            f"in {run_dir}). What finished is kept: rerun the same command to go on.") in err
    assert list(run_dir.glob("checkpoint-*")) and not (run_dir / "result.json").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    # The Ray this command started is on one machine, with no cloud preemption to watch: no watcher actor, and none
    # of the restart warning it printed as an error on the console (ray#53727).
    assert "PreemptionWatcher" not in out + err

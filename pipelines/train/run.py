"""The training stage's driver: MLflow run, Ray Train `TorchTrainer`, final artifacts and summary.

Resuming is re-running the same config: Ray Train finds the run snapshot under `storage_path/name` and hands the
latest checkpoint to the workers; the MLflow run id stored beside it keeps the metrics in one MLflow run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from exvideo.console import verbose
from exvideo.digests import folder_sha256
from exvideo.outputs import claim_output, recording_run, write_run_manifest
from exvideo.ray_setup import check_capacity, ensure_ray, format_per_node
from exvideo.storage import check_writable
from exvideo.tracking import experiment_id_for
from pipelines.train.config import TrainConfig
from pipelines.train.data import list_shards, shards_family
from pipelines.train.loop import BEST_ADAPTER, REPLICA_FILE, train_worker
from pipelines.train.state import ADAPTER, EMA_ADAPTER, STATE

RUN_ID_FILE = "mlflow_run_id.txt"
FINAL_ADAPTER = "adapter.safetensors"
RESULT_FILE = "result.json"
RUN_MANIFEST = "run.json"  # the run's identity (exvideo.outputs) and how its last attempt ended


@dataclass
class TrainResult:
    """Where a finished run left its outputs."""

    run_dir: Path
    checkpoint_dir: Path
    adapter: Path
    best_adapter: Path | None
    mlflow_run_id: str
    steps: int
    final_loss: float
    worker_steps_by_node: dict[str, int] = field(default_factory=dict)  # Ray node id -> steps its workers ran

    def save(self, path: Path) -> None:
        record = {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, path: Path) -> "TrainResult":
        record = json.loads(path.read_text())
        paths = ("run_dir", "checkpoint_dir", "adapter", "best_adapter")
        return cls(**{k: Path(v) if k in paths and v is not None and v != "None" else v for k, v in record.items()})


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = value


def _mlflow_run(cfg: TrainConfig) -> str:
    """Start the run's MLflow run, or return the one a previous attempt of this run started."""
    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    id_file = cfg.run_dir / RUN_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    # A new experiment in the embedded sqlite store keeps artifacts beside it, not in ./mlruns of the cwd.
    experiment_id = experiment_id_for(cfg.experiment, cfg.storage_path)
    params: dict = {}
    _flatten("", cfg.model_dump(mode="json"), params)
    with mlflow.start_run(run_name=cfg.name, experiment_id=experiment_id) as run:
        mlflow.log_params(params)
        mlflow.set_tag("exvideo.stage", "train")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(run.info.run_id)
    tmp.replace(id_file)
    return run.info.run_id


class ReplicaMismatchError(RuntimeError):
    """Workers ended with different weights, or frozen weights changed: the run's result cannot be trusted."""


def check_replicas(checkpoint_dir: Path, num_workers: int) -> list[dict]:
    """Verify that every rank's trainable weights agree and no frozen weight moved; return the ranks' records."""
    records = [json.loads((checkpoint_dir / REPLICA_FILE.format(rank=r)).read_text()) for r in range(num_workers)]
    if len({r["trainable"] for r in records}) != 1:
        raise ReplicaMismatchError(f"workers hold different trainable weights in {checkpoint_dir}: {records}")
    if any(r["frozen"] != r["frozen_at_start"] for r in records):
        raise ReplicaMismatchError(f"frozen weights changed during training ({checkpoint_dir}): {records}")
    return records


def _fit_interruptibly(trainer: TorchTrainer, cfg: TrainConfig):
    """`trainer.fit()`, with Ctrl-C an interruption that says how to go on rather than a silent exit.

    Ray Train answers Ctrl-C by aborting the run (its workers stop, the registered checkpoints stay) and then leaves
    by SystemExit, with no message, from inside `ray.get`; its handler also stays installed, so a later Ctrl-C in
    the same process (the next stage of a workflow) would abort a run long gone. Both undone here.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt(f"training stopped; a rerun resumes from the latest checkpoint it registered in "
                                f"{cfg.run_dir}") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, handler)


def run_identity(cfg: TrainConfig) -> dict:
    """What decides the adapter: the output fields and the UNet's bytes. Another value is another run; raising
    max_steps continues a run (the schedule does not depend on it)."""
    unet = Path(cfg.svd_dir) / "unet"
    return {**cfg.output_fields(exclude={"storage_path", "name", "max_steps"}),
            "unet_sha256": folder_sha256(unet if unet.is_dir() else cfg.svd_dir)}


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run `cfg.storage_path / cfg.name`; return where its outputs are.

    The run folder keeps one configuration: a config whose output fields differ from the run's (`run.json`) is
    refused, naming them; a larger `max_steps` continues the run.
    """
    shards = list_shards(cfg.shards)  # fail before starting workers if there is nothing to read
    if not (Path(cfg.svd_dir) / "unet" / "config.json").is_file() and not (Path(cfg.svd_dir) / "config.json").is_file():
        raise FileNotFoundError(f"svd_dir {cfg.svd_dir} holds no diffusers UNet (unet/config.json)")
    family = shards_family(shards)
    if family is not None and family != cfg.model_family:
        raise ValueError(f"shards {cfg.shards} hold {family} clips (their records' model_family) but svd_dir "
                         f"{cfg.svd_dir} is a {cfg.model_family} checkpoint: train on shards preprocessed with this "
                         "checkpoint's family")
    if cfg.model_family == "animatediff" and cfg.cond_dropout:
        raise ValueError(f"cond_dropout {cfg.cond_dropout} drops SVD's image conditioning; AnimateDiff post-tuning "
                         "keeps every caption (its base already learned the unconditional branch): set it to 0")
    identity = run_identity(cfg)
    claim_output(cfg.run_dir, RUN_MANIFEST, identity, remedy="give the run another name or storage_path (raising "
                                                              "max_steps alone continues it), or delete this one")
    finished = cfg.run_dir / RESULT_FILE
    if finished.is_file():
        previous = TrainResult.load(finished)
        if previous.steps >= cfg.max_steps:
            print(f"run {cfg.run_dir} already finished {previous.steps} steps (max_steps {cfg.max_steps}): "
                  f"nothing to do; adapter {previous.adapter}")
            return previous
    check_writable(cfg.storage_path)  # checkpoints go there: a read-only folder fails now, not after the first steps
    ensure_ray(cfg.ray_address)
    # Ray Train would wait a minute per attempt (`max_failures` + 1 attempts) for room for every worker.
    asked = f"num_workers {cfg.num_workers} x cpus_per_worker {cfg.cpus_per_worker:g}" + ", use_gpu" * cfg.use_gpu
    check_capacity({"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers if cfg.use_gpu else 0},
                   asked, "training", cfg.ray_address)
    with recording_run(cfg.run_dir, RUN_MANIFEST, identity, stage="train"):
        outcome, state = _train(cfg, shards)
    write_run_manifest(cfg.run_dir, RUN_MANIFEST, identity, stage="train", status="complete", steps=outcome.steps)
    print(
        f"done: {outcome.steps} steps, last interval loss {outcome.final_loss:.4f}, "
        f"{state['nonfinite_total']} non-finite steps skipped\n"
        f"  worker steps  {format_per_node({n: {'steps': s} for n, s in outcome.worker_steps_by_node.items()})}\n"
        f"  adapter       {outcome.adapter}\n  best adapter  {outcome.best_adapter}\n"
        f"  checkpoint    {outcome.checkpoint_dir}\n"
        f"  MLflow run    {outcome.mlflow_run_id} (mlflow ui --backend-store-uri {cfg.resolved_tracking_uri})"
    )
    return outcome


def _train(cfg: TrainConfig, shards: list[str]) -> tuple[TrainResult, dict]:
    """Run (or resume) the Ray Train run to `cfg.max_steps`; return its result and its last checkpoint's state."""
    run_id = _mlflow_run(cfg)
    print(f"training run {cfg.run_dir} on {len(shards)} shards; MLflow run {run_id} at {cfg.resolved_tracking_uri}")
    # Ray Train would otherwise send every print of a worker both to its stdout and through its logger, and both
    # reach this console: one line per training log step, not two. Ray Train passes the variable to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "mlflow_run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name, storage_path=str(cfg.storage_path.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's own progress lines (resources requested, worker group started) stay in its log files.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    result = _fit_interruptibly(trainer, cfg)
    checkpoint_dir = Path(result.checkpoint.path)
    state = json.loads((checkpoint_dir / STATE).read_text())
    check_replicas(checkpoint_dir, cfg.num_workers)
    # A stable path for "the adapter of this run", whatever checkpoint it came from.
    final = cfg.run_dir / FINAL_ADAPTER
    shutil.copyfile(checkpoint_dir / ADAPTER, final.with_suffix(".tmp"))
    final.with_suffix(".tmp").replace(final)
    best = cfg.run_dir / BEST_ADAPTER

    mlflow.set_tracking_uri(cfg.resolved_tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(final), artifact_path="adapter")
        if (checkpoint_dir / EMA_ADAPTER).is_file():
            mlflow.log_artifact(str(checkpoint_dir / EMA_ADAPTER), artifact_path="adapter")
        mlflow.log_metric("final_step", state["step"])
        for node, steps in state.get("worker_steps_by_node", {}).items():
            mlflow.log_metric(f"node.{node[:8]}.worker_steps", steps)
    history = state["history"]
    outcome = TrainResult(
        run_dir=cfg.run_dir, checkpoint_dir=checkpoint_dir, adapter=final,
        best_adapter=best if best.is_file() else None, mlflow_run_id=run_id, steps=state["step"],
        final_loss=history[-1]["interval_loss"] if history else float("nan"),
        worker_steps_by_node=state.get("worker_steps_by_node", {}),
    )
    outcome.save(cfg.run_dir / RESULT_FILE)
    return outcome, state

"""MLflow helpers every stage uses: where runs go, nested stage runs, metric histories, registered models.

The default store (`exvideo.config.default_tracking_uri`) is local and embedded: a sqlite file in the run directory
(`sqlite:///<run_dir>/mlflow.db`) with artifacts beside it in `<run_dir>/mlartifacts`. Any tracking URI works instead
(`http://host:5000` for a tracking server, which then decides where artifacts go).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


@contextmanager
def tracking_to(tracking_uri: str) -> Iterator[None]:
    """Send MLflow calls to `tracking_uri` inside the block and restore the previous URI after it."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def experiment_id_for(experiment: str, run_dir: Path) -> str:
    """The id of `experiment` in the current tracking store, created if new.

    A new experiment in a sqlite store keeps its artifacts in `<run_dir>/mlartifacts`; on a server, the server's
    artifact root applies.
    """
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        return existing.experiment_id
    local = mlflow.get_tracking_uri().startswith("sqlite:")
    location = (Path(run_dir) / "mlartifacts").resolve().as_uri() if local else None
    return mlflow.create_experiment(experiment, artifact_location=location)


@contextmanager
def stage_run(name: str, experiment_id: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage (or one item of a stage): nested under the active run (in its experiment), or under
    `parent_run_id` when given, or top-level in `experiment_id`."""
    active = mlflow.active_run()
    if active is not None:
        run = mlflow.start_run(run_name=name, nested=True, experiment_id=active.info.experiment_id, tags=tags)
    else:
        run = mlflow.start_run(run_name=name, experiment_id=experiment_id, parent_run_id=parent_run_id, tags=tags)
    with run:
        yield run


def log_scalars(metrics: dict[str, float]) -> None:
    """Log scalar metrics to the active run."""
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()})


def log_histories(histories: dict[str, tuple[Sequence[int], Sequence[float]]]) -> None:
    """Log each (steps, values) pair to the active run as one metric's history, in a single batch."""
    run_id = mlflow.active_run().info.run_id
    timestamp = int(time.time() * 1000)
    metrics = [Metric(name, float(value), timestamp, int(step))
               for name, (steps, values) in histories.items() for step, value in zip(steps, values)]
    MlflowClient().log_batch(run_id, metrics=metrics)


def register_model(model_uri: str, name: str, alias: str | None = None) -> str:
    """Register a logged model under `name` (a new version), optionally pointing `alias` at it; return the version."""
    registered = mlflow.register_model(model_uri, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, registered.version)
    return registered.version

"""MLflow tracking for the stages: where runs go, nested stage runs, metric curves, registered models.

The default store is local and embedded: a sqlite file in the run directory (`sqlite:///<run_dir>/mlflow.db`) with
artifacts beside it in `<run_dir>/mlartifacts`. Any tracking URI works instead (`http://host:5000` for a tracking
server, which then decides where artifacts go).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipelines.evaluate.metrics import curve_frame_index


def default_tracking_uri(run_dir: Path) -> str:
    """The embedded store of a run directory: a sqlite file inside it."""
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def use_experiment(tracking_uri: str, experiment: str, run_dir: Path) -> str:
    """Point MLflow at `tracking_uri` and make `experiment` current (created if new); return its id.

    A new experiment in a sqlite store keeps its artifacts in `<run_dir>/mlartifacts`; on a server, the server's
    artifact root applies.
    """
    mlflow.set_tracking_uri(tracking_uri)
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        location = (Path(run_dir) / "mlartifacts").resolve().as_uri() if tracking_uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def stage_run(name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
              ) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage (or one item of a stage): nested under the active run, or under `parent_run_id`."""
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=name, nested=nested, parent_run_id=None if nested else parent_run_id,
                          tags=tags) as run:
        yield run


def log_scalars(metrics: dict[str, float]) -> None:
    """Log scalar metrics to the active run."""
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()})


def log_curves(curves: dict[str, np.ndarray], prefix: str = "curve.") -> None:
    """Log each curve to the active run as a metric history whose step is the frame index."""
    run_id = mlflow.active_run().info.run_id
    timestamp = int(time.time() * 1000)
    metrics = [
        Metric(f"{prefix}{name}", float(value), timestamp, int(step))
        for name, curve in curves.items()
        for step, value in zip(curve_frame_index(name, curve), curve)
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)


def register_model(model_uri: str, name: str, alias: str | None = None) -> str:
    """Register a logged model under `name` (a new version), optionally pointing `alias` at it; return the version."""
    registered = mlflow.register_model(model_uri, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, registered.version)
    return registered.version

"""MLflow for a workflow: a parent run per invocation, and each stage's run nested under it with lineage tags.

Stages that track themselves (train, evaluate) keep their own runs; the workflow only nests and tags them. For the
others (preprocess, reshard, generate) it records a run holding the stage's key, folder and numeric outputs.
"""

from __future__ import annotations

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from orchestration.spec import WorkflowSpec
from exvideo.tracking import experiment_id_for, tracking_to


def start_workflow_run(spec: WorkflowSpec, keys: dict[str, str], spec_path: str | None) -> str:
    """Open the invocation's parent run (left RUNNING so stages can nest under it); return its id."""
    with tracking_to(spec.resolved_tracking_uri):
        experiment_id = experiment_id_for(spec.experiment, spec.workdir)
        client = MlflowClient()
        run = client.create_run(experiment_id, run_name="workflow", tags={
            "exvideo.stage": "workflow", "workflow.spec": spec_path or "", "workflow.workdir": str(spec.workdir),
            **{f"stage_key.{stage}": key for stage, key in keys.items()}})
        client.log_param(run.info.run_id, "stages", " -> ".join(keys))
        return run.info.run_id


def record_stage_run(spec: WorkflowSpec, parent_run_id: str, record, own_run_id: str | None,
                     lineage: dict[str, str]) -> str:
    """Nest the stage's run under the workflow run (creating one when the stage has none); return its id."""
    tags = {"exvideo.stage": record.name, "exvideo.stage_key": record.key, "exvideo.output": str(record.folder),
            MLFLOW_PARENT_RUN_ID: parent_run_id, **lineage}
    with tracking_to(spec.resolved_tracking_uri):
        client = MlflowClient()
        if own_run_id is None:
            experiment_id = client.get_run(parent_run_id).info.experiment_id
            run_id = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: record.name}).info.run_id
            for name, value in record.outputs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    client.log_metric(run_id, name, value)
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        else:
            run_id = own_run_id
        # Which node did what (a run that finds its work done records nothing here, like its other metrics).
        for node, counts in record.outputs.get("per_node", {}).items():
            for name, value in counts.items():
                client.log_metric(run_id, f"node.{node[:8] or 'driver'}.{name}", value)
        for name, value in tags.items():
            client.set_tag(run_id, name, value)
        client.set_tag(parent_run_id, f"lineage.{record.name}.run", run_id)
        return run_id


def end_workflow_run(spec: WorkflowSpec, parent_run_id: str, records, status: str) -> None:
    """Tag the parent run with each stage's outcome and folder, and close it."""
    with tracking_to(spec.resolved_tracking_uri):
        client = MlflowClient()
        for record in records:
            client.set_tag(parent_run_id, f"stage.{record.name}", f"{record.status}: {record.folder}")
            if record.mlflow_run_id and record.status == "skipped":
                client.set_tag(parent_run_id, f"lineage.{record.name}.run", record.mlflow_run_id)
        client.set_terminated(parent_run_id, status)

"""The workflow runner: the spec's stages as a DAG, each output keyed by content, skipped when done, resumed when not.

A stage's key hashes its config's output fields (the section's fields less the operational ones and the wired
paths; `exvideo.config`) and its inputs' keys (the corpus's and model's content for the first stages, the upstream
stages' keys after that). Operational changes (worker counts, devices, speed switches, logging) therefore keep
every key: a finished stage is reused, an unfinished one resumes in its folder with the new values. Its output folder is
`<workdir>/<stage>-<key>`; a `_complete.json` marker, written atomically after everything else, records its
outputs. A marker means "done": the stage is skipped. No marker means "not done": the stage runs again in the same
folder, and since every stage resumes from what it left there, a failed stage continues where it stopped.
Changing a stage's fields (or an upstream stage's) gives it a new key and a new folder; old folders stay.
`plan_workflow` (`exvideo run --plan`) says what a run would do, stage by stage, without doing any of it.

MLflow: one parent run per invocation, tagged with every stage's key and output folder, and one nested run per stage
that ran, carrying lineage tags (the shards that trained an adapter, the adapter that made the videos, ...).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from exvideo.console import WORKFLOW_LOG, stage_log
from exvideo.digests import folder_sha256
from exvideo.families import encoder_fingerprint
from exvideo.ray_setup import ray_target, require_reachable
from exvideo.storage import folder_holder, hold_folder, is_missing, require_dir
from orchestration.spec import WorkflowSpec
from orchestration.stages import STAGE, StageRun
from preprocessing.manifest import corpus_sha256

MARKER = "_complete.json"


@dataclass
class StageRecord:
    """One stage of one invocation: its key and folder, what happened, and what it made."""

    name: str
    key: str
    folder: Path
    status: str = "pending"  # ran | skipped (done before) | failed | not selected
    outputs: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0


def _source_keys(spec: WorkflowSpec) -> dict[str, str]:
    """Keys of the spec's own inputs: the corpus's place and content (`corpus_sha256`: a manifest's bytes, a
    folder's video names and sizes), and the model's content wherever its folder is: every file's bytes, or only
    the encoders' for preprocessing, which reads nothing else (a new UNet keeps the shards)."""
    return {"corpus": f"{spec.corpus}:{corpus_sha256(spec.corpus)[:16]}",
            "model": folder_sha256(spec.model)[:16],
            "encoders": encoder_fingerprint(spec.model, spec.model_family)}


def stage_keys(spec: WorkflowSpec) -> dict[str, str]:
    """Every stage's content key, in order."""
    keys = _source_keys(spec)
    for stage in spec.stages:
        declared = STAGE[stage]
        fields = spec.section_config(stage).output_fields(exclude=set(declared.wired))
        fields.update({key: spec.runner_value(stage, key) for key in declared.runner_keys})
        inputs = [keys[next(s for s in name.split("|") if s in keys)] for name in declared.inputs]
        digest = json.dumps({"stage": stage, "fields": fields, "inputs": inputs}, sort_keys=True)
        keys[stage] = hashlib.sha256(digest.encode()).hexdigest()[:12]
    return {stage: keys[stage] for stage in spec.stages}


def read_marker(folder: Path) -> dict | None:
    marker = folder / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _write_marker(record: StageRecord) -> None:
    marker = record.folder / MARKER
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps({"stage": record.name, "key": record.key, "outputs": record.outputs,
                               "mlflow_run_id": record.mlflow_run_id, "seconds": round(record.seconds, 2),
                               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1))
    tmp.replace(marker)


def select_stages(spec: WorkflowSpec, start: str | None, only: str | None) -> list[str]:
    """The stages this invocation may run: all, from `start` on, or `only` one."""
    for flag, stage in (("--from", start), ("--only", only)):
        if stage is not None and stage not in spec.stages:
            raise ValueError(f"{flag} {stage}: this spec's stages are {', '.join(spec.stages)}")
    if only:
        return [only]
    if start:
        return spec.stages[spec.stages.index(start):]
    return list(spec.stages)


def run_workflow(spec: WorkflowSpec, start: str | None = None, only: str | None = None,
                 spec_path: str | None = None) -> list[StageRecord]:
    """Run the spec's stages in order, skipping completed ones; return every stage's record.

    `start` / `only` select stages; selected stages run even when done (their marker is dropped first), and the
    stages before them must be complete.
    """
    selected = select_stages(spec, start, only)
    check_inputs(spec)
    records = _records(spec)
    keys = {record.name: record.key for record in records}
    with hold_folder(spec.workdir, "exvideo run"), stage_log(spec.workdir, WORKFLOW_LOG):
        from orchestration import tracking

        parent = tracking.start_workflow_run(spec, keys, spec_path)
        print(f"workflow: {len(records)} stages {' -> '.join(keys)}; MLflow run {parent} at "
              f"{spec.resolved_tracking_uri}")
        try:
            _run_records(spec, records, selected, bool(start or only), only, parent)
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt)  # Ctrl-C: MLflow's status for a run ended by its user
            tracking.end_workflow_run(spec, parent, records, "KILLED" if stopped else "FAILED")
            raise
        tracking.end_workflow_run(spec, parent, records, "FINISHED")
    return records


def _records(spec: WorkflowSpec) -> list[StageRecord]:
    return [StageRecord(name, key, spec.workdir / f"{name}-{key}") for name, key in stage_keys(spec).items()]


def check_sources(spec: WorkflowSpec) -> None:
    """Refuse a spec whose model or local corpus is not there: the stage keys are made of their content."""
    require_dir(spec.model, "model")
    if is_missing(spec.corpus):
        raise FileNotFoundError(f"corpus {spec.corpus} does not exist; point the spec's corpus at a video manifest "
                                "or a folder of videos")


def check_inputs(spec: WorkflowSpec) -> None:
    """Refuse a run whose model or local corpus is not there, or whose Ray cluster does not answer, before any
    folder is made. (Not at spec load: a spec submitted through the Jobs API names paths and an address on the
    cluster, which the submitting machine may not have or reach.)"""
    check_sources(spec)
    if any(STAGE[stage].needs_ray for stage in spec.stages):
        require_reachable(ray_target(spec.ray_address))


def _action(done: bool, selected: bool, forcing: bool) -> str:
    """What an invocation does with a stage: skip it (done), redo it (done, and selected by --from / --only), run
    it (not done: in its folder, so an unfinished one resumes), or stop (not done and not selected)."""
    if done:
        return "redo" if forcing and selected else "skip"
    return "run" if selected else "stop"


def plan_workflow(spec: WorkflowSpec, start: str | None = None, only: str | None = None) -> str:
    """What `run_workflow` with these arguments would do, without doing it: each stage's state (done, unfinished,
    new; in use by a running command) and action. Reads the workdir only: makes no folder, starts no Ray, opens no
    MLflow run."""
    selected = select_stages(spec, start, only)
    check_sources(spec)
    lines = [f"plan for {spec.workdir} (nothing is run):"]
    holder = folder_holder(spec.workdir)
    if holder:
        lines.append(f"  the workdir is in use by {holder}: exvideo run is refused until it ends")
    records, ended = _records(spec), False  # ended: the run stops before the stages after this one
    for number, record in enumerate(records, 1):
        done = read_marker(record.folder) is not None
        state = "done" if done else "unfinished" if record.folder.is_dir() else "new"
        action = "-" if ended else _action(done, record.name in selected, bool(start or only))
        notes = [f"in use by {holder}"] if (holder := folder_holder(record.folder)) else []
        if action == "run" and state == "unfinished":
            action = "resume"
        elif action == "stop":
            notes.append(f"not done: run it first with --from {record.name}")
        ended = ended or action == "stop" or record.name == only
        lines.append(f"  [{number}/{len(records)}] {record.name:<10} {state:<10} {action:<6} {record.folder}"
                     + "".join(f" ({note})" for note in notes))
    return "\n".join(lines)


def _run_records(spec: WorkflowSpec, records: list[StageRecord], selected: list[str], forcing: bool,
                 only: str | None, parent_run_id: str) -> None:
    """Skip each completed stage, run each other selected one, in order."""
    upstream: dict[str, dict] = {}
    for number, record in enumerate(records, 1):
        marker = read_marker(record.folder)
        action = _action(marker is not None, record.name in selected, forcing)
        if action == "redo":
            (record.folder / MARKER).unlink()
        if action == "skip":
            record.status, record.outputs = "skipped", marker["outputs"]
            record.mlflow_run_id = marker["mlflow_run_id"]
            print(f"[{number}/{len(records)}] {record.name}: done before, skipped ({record.folder})")
        elif action == "stop":
            record.status = "not selected"
            raise ValueError(f"{record.name} has not completed for this spec (no {record.folder / MARKER}); "
                             f"run it first: exvideo run SPEC --from {record.name}")
        else:
            print(f"[{number}/{len(records)}] {record.name}: running in {record.folder}")
            _execute(spec, record, upstream, parent_run_id)
            print(f"[{number}/{len(records)}] {record.name}: done in {record.seconds:.1f} s")
        upstream[record.name] = record.outputs
        if only and record.name == only:
            break


def _execute(spec: WorkflowSpec, record: StageRecord, upstream: dict[str, dict], parent_run_id: str) -> None:
    """Run one stage in its folder, track it, and mark it complete (the marker last)."""
    from exvideo.ray_setup import ensure_ray
    from orchestration import tracking

    stage = STAGE[record.name]
    started = time.perf_counter()
    try:
        with hold_folder(record.folder, f"the {record.name} stage of exvideo run"), stage_log(record.folder):
            if stage.needs_ray:
                ensure_ray(spec.ray_address)  # started on first need: a run with nothing to do never starts Ray
            record.outputs, run_id, lineage = stage.run(StageRun(spec, record.folder, upstream, parent_run_id))
    except BaseException as exc:
        record.status = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
        raise
    missing = set(stage.outputs) - set(record.outputs)
    if missing:
        raise RuntimeError(f"stage {record.name} returned no {', '.join(sorted(missing))} (it declares "
                           f"{', '.join(stage.outputs)}): a bug in orchestration/stages.py")
    record.seconds = time.perf_counter() - started
    record.mlflow_run_id = tracking.record_stage_run(spec, parent_run_id, record, run_id, lineage)
    _write_marker(record)
    record.status = "ran"


def format_summary(spec: WorkflowSpec, records: list[StageRecord]) -> str:
    """Where everything is: each stage's status and folder, the videos, the report and how to open MLflow."""
    lines = ["workflow summary:"]
    for record in records:
        lines.append(f"  {record.name:<10} {record.status:<8} {record.folder}")
    outputs = {record.name: record.outputs for record in records}
    for label, stage, key in (("adapter", "train", "adapter"), ("videos", "generate", "videos"),
                              ("report", "evaluate", "report")):
        if outputs.get(stage, {}).get(key):
            lines.append(f"  {label:<10} {outputs[stage][key]}")
    lines.append(f"  MLflow UI  mlflow ui --backend-store-uri {spec.resolved_tracking_uri}"
                 if spec.resolved_tracking_uri.startswith("sqlite:") else f"  MLflow     {spec.resolved_tracking_uri}")
    return "\n".join(lines)


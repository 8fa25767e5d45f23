"""The table of stages: what each stage is, declared once, for the CLI, the workflow spec and the runner.

A stage has a config class (its fields; which of them are operational is declared on the class, see
`exvideo.config`), a function that runs it on its own (`exvideo <stage>`), the inputs its cache key depends on, the
fields a workflow wires in from the spec and from upstream outputs, the outputs it hands downstream, and a
function that runs it inside a workflow. Run functions take a `StageRun` and return (outputs, mlflow_run_id or
None, lineage tags); outputs are JSON-ready and recorded in the completion marker, so later stages (and later
runs) read them from there.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exvideo.ray_setup import ray_target, require_reachable
from exvideo.storage import hold_folder, is_missing

if TYPE_CHECKING:
    from exvideo.config import StageConfig
    from orchestration.spec import WorkflowSpec

Outcome = tuple[dict, str | None, dict[str, str]]

# Stands in for a wired path while a section is validated, before the upstream output exists.
PLACEHOLDER = "/wired/by/the/workflow"


def resolve(target: str) -> Any:
    """The object a "module:name" string names (imported on first use, so `exvideo --help` stays fast)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class StageRun:
    """One stage of one workflow invocation: the spec, the stage's folder, upstream outputs, the parent MLflow run."""

    spec: WorkflowSpec
    folder: Path
    upstream: dict[str, dict]
    parent_run_id: str

    def config(self, stage: str, **wired: Any) -> StageConfig:
        """The stage's typed config: its section's fields plus the wired ones."""
        return self.spec.stage_config(stage, wired)

    def shards(self) -> str:
        """The shard folder train reads: reshard's when the spec has one, else preprocess's."""
        return (self.upstream.get("reshard") or self.upstream["preprocess"])["shards"]


@dataclass(frozen=True)
class Stage:
    """One stage, declared once."""

    name: str
    config: str  # "module:Class" of its config, in a torch-free module: a spec validates without a model library
    entry: str  # "module:function" running it on its own, given its config
    help: str
    # What its key depends on: "corpus", "model" (every file), "encoders" (the files preprocessing reads), upstream
    # stages ("a|b": the first present).
    inputs: tuple[str, ...]
    wired: Mapping[str, Any]  # fields the workflow sets (placeholders here); a section may not set them
    outputs: tuple[str, ...]  # what its completion marker records for later stages
    run: Callable[[StageRun], Outcome]
    needs_ray: bool
    folder: str  # the config field naming its output folder, where `exvideo <stage>` keeps its log
    held: str | None = None  # the config attribute naming what one command at a time may write, if not `folder`
    summary: str | None = None  # "module:function" formatting `entry`'s result, when `entry` prints none itself
    optional: bool = False  # runs only when the spec has its section
    runner_keys: Mapping[str, Any] = field(default_factory=dict)  # section keys the runner reads, with defaults
    local_inputs: tuple[str, ...] = ()  # config fields naming files or folders it reads (a URI is read remotely)

    def config_class(self) -> type[StageConfig]:
        return resolve(self.config)

    def check_inputs(self, config: StageConfig) -> None:
        """Refuse a config naming a local input that is not there, or a Ray cluster that does not answer, before the
        stage makes a folder or starts Ray."""
        if self.needs_ray:
            require_reachable(ray_target(config.ray_address))
        for name in self.local_inputs:
            value = getattr(config, name)
            for location in value if isinstance(value, list) else [value]:
                if location is not None and is_missing(location):
                    about = type(config).model_fields[name].description
                    raise FileNotFoundError(f"{name} {location} does not exist ({name}: {about or 'check the path'})")

    def operational_fields(self) -> frozenset[str]:
        """Fields that change how the stage runs, never what it writes: left out of its cache key."""
        return self.config_class().operational_fields()


def run_preprocess(run: StageRun) -> Outcome:
    from preprocessing.run import format_summary, run_preprocess as preprocess

    spec = run.spec
    manifest = preprocess(run.config("preprocess", input=spec.corpus, output=run.folder, model=spec.model,
                                     family=spec.family, ray_address=spec.ray_address))
    print(format_summary(manifest))
    counts = manifest["counts"]
    if not counts["samples"]:
        raise ValueError(f"preprocess wrote no clips from {spec.corpus} (failures by reason: "
                         f"{counts['failures_by_reason']}); check the corpus and the clip size fields")
    return ({"shards": str(run.folder / "shards"), "samples": counts["samples"], "failures": counts["failures"],
             "per_node": manifest["this_invocation"]["per_node"]},
            None, {"lineage.corpus": spec.corpus})


def run_reshard(run: StageRun) -> Outcome:
    from preprocessing.reshard import format_reshard_summary, run_reshard as reshard

    source = Path(run.upstream["preprocess"]["shards"]).parent
    summary = reshard(run.config("reshard", input=source, output=run.folder, ray_address=run.spec.ray_address))
    print(format_reshard_summary(summary))
    counts = summary["counts"]
    if not counts["kept"]:  # train would fail on an empty shard set, one stage later and less clearly
        raise ValueError(f"reshard kept none of its {counts['input']} samples (filtered by reason: "
                         f"{counts['filtered_by_reason']}); loosen the reshard section's filters")
    return {"shards": str(run.folder / "shards")}, None, {"lineage.input_shards": str(source)}


def run_train(run: StageRun) -> Outcome:
    from pipelines.train import run_training

    spec, shards = run.spec, run.shards()
    cfg = run.config("train", svd_dir=spec.model, family=spec.family, shards=shards, storage_path=run.folder,
                     name="train", tracking_uri=spec.resolved_tracking_uri, experiment=spec.experiment,
                     ray_address=spec.ray_address)
    # The run folder too, which `exvideo train` holds (not the stage folder): one pointed there is refused.
    with hold_folder(cfg.run_dir, "the train stage of exvideo run"):
        result = run_training(cfg)
    outputs = {"adapter": str(result.adapter), "run_dir": str(result.run_dir), "steps": result.steps,
               "final_loss": result.final_loss}
    return outputs, result.mlflow_run_id, {"lineage.shards": shards}


def _preprocessed_sources(run: StageRun, count: int) -> list[dict]:
    """The first `count` corpus sources that became clips: index rows {source, caption}, in corpus order."""
    import pyarrow.parquet as pq

    shards_dir = Path(run.upstream["preprocess"]["shards"]).parent
    first_clips: dict[str, dict] = {}
    for row in pq.read_table(shards_dir / "index.parquet", columns=["source", "caption"]).to_pylist():
        first_clips.setdefault(row["source"], row)
    return list(first_clips.values())[:count]


def conditioning_rows(run: StageRun, count: int) -> Path:
    """Rows generating from the first `count` preprocessed corpus videos: their first frame for SVD, their
    caption for AnimateDiff (a text-to-video model)."""
    from pipelines.generate.video_io import write_text

    sources = _preprocessed_sources(run, count)
    if run.spec.model_family == "animatediff":
        rows = [{"id": f"video{number}", "prompt": row["caption"]} for number, row in enumerate(sources)]
    else:
        rows = _first_frame_rows(run, [row["source"] for row in sources])
    listing = run.folder / "rows.jsonl"
    write_text(listing, "".join(json.dumps(row) + "\n" for row in rows))
    return listing


def _first_frame_rows(run: StageRun, sources: list[str]) -> list[dict]:
    import decord
    from PIL import Image

    from pipelines.generate.video_io import write_png
    from preprocessing.manifest import read_sources

    uris = {row["source"]: row["uri"] for row in read_sources(run.spec.corpus)[0]}
    images = run.folder / "conditioning"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, source in enumerate(sources):
        frame = decord.VideoReader(uris[source])[0].asnumpy()
        write_png(images / f"video{number}.png", Image.fromarray(frame))
        rows.append({"id": f"video{number}", "image": f"conditioning/video{number}.png"})
    return rows


def run_generate(run: StageRun) -> Outcome:
    from pipelines.generate import run_generate_job

    spec, adapter = run.spec, run.upstream["train"]["adapter"]
    wired = {"output": run.folder, "model": spec.model, "family": spec.family, "adapter": adapter,
             "ray_address": spec.ray_address}
    if "input" not in spec.generate:
        wired["input"] = conditioning_rows(run, spec.runner_value("generate", "conditioning_videos"))
    summary = run_generate_job(run.config("generate", **wired))
    if not summary["made"] and not summary["skipped_done"]:
        raise ValueError(f"generate made no video; reasons in {run.folder / 'failures.jsonl'}")
    outputs = {"videos": str(run.folder / "videos"), "made": len(summary["made"]) + len(summary["skipped_done"]),
               "failed": summary["failed"], "per_node": summary["per_node"]}
    return outputs, None, {"lineage.adapter": adapter}


def run_evaluate(run: StageRun) -> Outcome:
    from pipelines.evaluate.run import run_evaluation

    spec, videos = run.spec, run.upstream["generate"]["videos"]
    # CLIP consistency uses SVD's image encoder: an AnimateDiff checkpoint has none (the section may name one).
    fields = {"svd_dir": spec.model} if "svd_dir" not in spec.evaluate and spec.model_family == "svd" else {}
    outcome = run_evaluation(run.config(
        "evaluate", **fields, videos_dir=[videos], output_dir=run.folder, tracking_uri=spec.resolved_tracking_uri,
        experiment=spec.experiment, parent_run_id=run.parent_run_id))
    outputs = {"report": str(outcome["report"]), "videos_evaluated": len(outcome["results"])}
    return outputs, outcome["run_id"], {"lineage.videos": videos}


# In data-flow order.
STAGES: tuple[Stage, ...] = (
    Stage("preprocess", config="preprocessing.config:PreprocessConfig", entry="preprocessing.run:run_preprocess",
          summary="preprocessing.run:format_summary",
          help="corpus -> WebDataset latent shards on Ray Data (resumable); "
               "required: input=MANIFEST_OR_FOLDER output=DIR model=MODEL_DIR (SVD or AnimateDiff)",
          inputs=("corpus", "encoders"),
          wired={"input": PLACEHOLDER, "output": PLACEHOLDER, "model": PLACEHOLDER, "family": None,
                 "ray_address": None},
          outputs=("shards", "samples", "failures"), run=run_preprocess, needs_ray=True, folder="output",
          local_inputs=("input", "model")),
    Stage("reshard", config="preprocessing.config:ReshardConfig", entry="preprocessing.reshard:run_reshard",
          summary="preprocessing.reshard:format_reshard_summary",
          help="filter, shuffle and rewrite a shard set into shards of a new size; required: input=SHARDS output=DIR",
          inputs=("preprocess",), wired={"input": PLACEHOLDER, "output": PLACEHOLDER, "ray_address": None},
          outputs=("shards",), run=run_reshard, needs_ray=True, folder="output", optional=True,
          local_inputs=("input", "keys_file")),
    Stage("train", config="pipelines.train.config:TrainConfig", entry="pipelines.train:run_training",
          help="post-tune the temporal modules on latent shards (Ray Train)",
          inputs=("model", "reshard|preprocess"),
          wired={"svd_dir": PLACEHOLDER, "family": None, "shards": PLACEHOLDER, "storage_path": PLACEHOLDER,
                 "name": "train",
                 "tracking_uri": None, "experiment": "workflow", "ray_address": None},
          outputs=("adapter", "run_dir", "steps", "final_loss"), run=run_train, needs_ray=True,
          # Held per run, not per storage_path: runs of a sweep share a storage_path and train side by side.
          folder="storage_path", held="run_dir", local_inputs=("svd_dir",)),
    Stage("generate", config="pipelines.generate.config:GenerateJobConfig", entry="pipelines.generate:run_generate_job",
          help="batch-generate long videos from a listing of images or prompts",
          inputs=("model", "preprocess", "train"),
          wired={"output": PLACEHOLDER, "model": PLACEHOLDER, "family": None, "adapter": PLACEHOLDER,
                 "ray_address": None},
          outputs=("videos", "made", "failed"), run=run_generate, needs_ray=True, folder="output",
          # How many preprocessed corpus videos give their first frame (SVD) or caption (AnimateDiff) to generate
          # from (without an `input`).
          runner_keys={"conditioning_videos": 2}, local_inputs=("input", "model", "adapter", "text_to_image")),
    Stage("evaluate", config="pipelines.evaluate.config:EvaluateConfig", entry="pipelines.evaluate.run:run_evaluation",
          help="metrics, an HTML report and MLflow runs for folders of generated videos",
          inputs=("model", "generate"),
          wired={"videos_dir": [PLACEHOLDER], "output_dir": PLACEHOLDER, "tracking_uri": None,
                 "experiment": "workflow", "parent_run_id": None},
          outputs=("report", "videos_evaluated"), run=run_evaluate, needs_ray=False, folder="output_dir",
          local_inputs=("videos_dir", "svd_dir", "fvd_reference_dir", "adapter")),
)
STAGE = {stage.name: stage for stage in STAGES}

"""The workflow spec: one YAML file that describes corpus -> preprocess -> (reshard) -> train -> generate -> evaluate.

Each stage section holds that stage's own config fields inline, or `config_file: path.yaml` (relative to the spec's
folder; inline fields override the file's). The paths that connect stages (shards, adapter, videos, output folders,
the model, the tracking store) are wired by the runner, so a section never repeats them: setting one is an error.
Everything is validated when the spec is loaded, before any stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestration.config import ConfigError, StageConfig, describe_errors, read_yaml_mapping

# Stage name -> (module, config class), in data-flow order; modules import lazily so validation stays light.
STAGE_CONFIGS = {
    "preprocess": ("preprocessing.config", "PreprocessConfig"),
    "reshard": ("preprocessing.reshard", "ReshardConfig"),
    "train": ("pipelines.train.config", "TrainConfig"),
    "generate": ("pipelines.generate.job", "GenerateJobConfig"),
    "evaluate": ("pipelines.evaluate.run", "EvaluateConfig"),
}

# Fields the runner fills in from the spec and from upstream stages; the placeholder only lets a section be checked
# before the upstream output exists.
_PLACEHOLDER = "/wired/by/the/workflow"
WIRED = {
    "preprocess": {"input": _PLACEHOLDER, "output": _PLACEHOLDER, "model": _PLACEHOLDER, "ray_address": None},
    "reshard": {"input": _PLACEHOLDER, "output": _PLACEHOLDER, "ray_address": None},
    "train": {"svd_dir": _PLACEHOLDER, "shards": _PLACEHOLDER, "storage_path": _PLACEHOLDER, "name": "train",
              "tracking_uri": None, "experiment": "workflow"},
    "generate": {"output": _PLACEHOLDER, "model": _PLACEHOLDER, "adapter": _PLACEHOLDER, "ray_address": None},
    "evaluate": {"videos_dir": [_PLACEHOLDER], "output_dir": _PLACEHOLDER, "tracking_uri": None,
                 "experiment": "workflow", "parent_run_id": None},
}
# Keys a section may hold besides its stage's fields: read by the runner, not by the stage.
RUNNER_KEYS = {"generate": {"conditioning_videos"}}
OPTIONAL_STAGES = {"reshard"}


class WorkflowSpec(StageConfig):
    """The whole pipeline: where it writes, what it reads, where it tracks and runs, and each stage's fields."""

    # Relative paths are taken from the current directory and stored absolute.
    workdir: Path = Field(description="every stage's output lands in <workdir>/<stage>-<key>")
    corpus: str = Field(description="video manifest (.json, .jsonl, .csv, .parquet) or folder of videos")
    model: Path = Field(description="local diffusers-format SVD checkpoint every stage uses")
    tracking_uri: str | None = Field(None, description="MLflow store; default: sqlite:///<workdir>/mlflow.db")
    experiment: str = "exvideo-workflow"
    ray_address: str | None = Field(None, description="existing Ray cluster; none starts Ray in this process")
    preprocess: dict[str, Any] = Field(default_factory=dict)
    reshard: dict[str, Any] | None = Field(None, description="optional; none feeds preprocess's shards to train")
    train: dict[str, Any] = Field(default_factory=dict)
    generate: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)

    @field_validator("workdir", "model")
    @classmethod
    def _absolute_path(cls, value: Path) -> Path:
        # Ray workers run in their own working directories: every path a stage hands them must be absolute.
        return value.resolve()

    @field_validator("corpus")
    @classmethod
    def _absolute_local_corpus(cls, value: str) -> str:
        return value if "://" in value else str(Path(value).resolve())

    @field_validator("preprocess", "train", "generate", "evaluate", mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, value):
        # `train:` with nothing under it reads as None in YAML; it means "all defaults".
        return {} if value is None else value

    @model_validator(mode="after")
    def _sections_are_valid_stage_configs(self) -> "WorkflowSpec":
        for stage in self.stages:
            self.stage_config(stage, WIRED[stage])
        conditioning = self.generate.get("conditioning_videos", 2)
        if "input" not in self.generate and (not isinstance(conditioning, int) or conditioning < 1):
            raise ValueError(f"generate.conditioning_videos must be a positive integer (got {conditioning!r}): how "
                             "many preprocessed corpus videos give their first frame to generate from")
        return self

    @property
    def stages(self) -> list[str]:
        """The stages this spec runs, in order."""
        return [s for s in STAGE_CONFIGS if s not in OPTIONAL_STAGES or getattr(self, s) is not None]

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    def stage_fields(self, stage: str) -> dict[str, Any]:
        """The section's own stage fields (runner-only keys removed)."""
        section = getattr(self, stage) or {}
        return {k: v for k, v in section.items() if k not in RUNNER_KEYS.get(stage, set())}

    def stage_config(self, stage: str, wired: dict[str, Any]):
        """The stage's typed config: the section's fields plus `wired` (the connecting paths)."""
        import importlib

        module, name = STAGE_CONFIGS[stage]
        cls = getattr(importlib.import_module(module), name)
        fields = self.stage_fields(stage)
        for key in sorted(set(fields) & set(WIRED[stage])):
            raise ValueError(f"{stage}.{key} is set by the workflow (from the spec's top level or the previous "
                             f"stage's output); remove it from the {stage} section")
        try:
            return cls.model_validate({**fields, **wired})
        except ValidationError as exc:
            raise ValueError(f"invalid {stage} section: {describe_errors(exc, prefix=stage)}") from None


def _inline_config_files(data: dict, base: Path) -> None:
    """Replace each section's `config_file` by the file's fields (inline fields win)."""
    for stage in STAGE_CONFIGS:
        section = data.get(stage)
        if isinstance(section, dict) and "config_file" in section:
            path = Path(section.pop("config_file"))
            path = path if path.is_absolute() else base / path
            data[stage] = {**read_yaml_mapping(path, f"{stage}.config_file"), **section}


def load_spec(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> WorkflowSpec:
    """Read and validate a workflow spec; `overrides` are `section.field=value` strings applied on top."""
    from orchestration.config import _apply_override

    path = Path(path)
    data = read_yaml_mapping(path, "workflow spec")
    _inline_config_files(data, path.parent)
    for override in overrides:
        _apply_override(data, override)
    return validate_spec(data, str(path))


def validate_spec(data: dict, source: str = "<dict>") -> WorkflowSpec:
    """Validate spec data; a ConfigError names each bad field (with its section) and what to do."""
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid workflow spec {source}: {describe_errors(exc)}") from None

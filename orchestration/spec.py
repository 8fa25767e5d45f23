"""The workflow spec: one YAML file that describes corpus -> preprocess -> (reshard) -> train -> generate -> evaluate.

Each stage section holds that stage's own config fields inline, or `config_file: path.yaml` (relative to the spec's
folder; inline fields override the file's). The paths that connect stages (shards, adapter, videos, output folders,
the model, the tracking store) are wired by the runner, so a section never repeats them: setting one is an error.
Everything is validated when the spec is loaded, before any stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from exvideo.config import (
    ConfigError, StageConfig, apply_override, default_tracking_uri, describe_errors, read_yaml_mapping,
)
from exvideo.families import checkpoint_family
from exvideo.storage import is_uri
from orchestration.stages import STAGE, STAGES


class WorkflowSpec(StageConfig):
    """The whole pipeline: where it writes, what it reads, where it tracks and runs, and each stage's fields."""

    # Relative paths are taken from the current directory and stored absolute.
    workdir: Path = Field(description="every stage's output lands in <workdir>/<stage>-<key>")
    corpus: str = Field(description="video manifest (.json, .jsonl, .csv, .parquet) or folder of videos")
    model: Path = Field(description="local diffusers-format checkpoint (SVD or AnimateDiff) every stage uses")
    family: Literal["svd", "animatediff"] | None = Field(
        None, description="the model's family; unset: read from its model_index.json when a stage needs it")
    tracking_uri: str | None = Field(None, description="MLflow store; default: sqlite:///<workdir>/mlflow.db")
    experiment: str = "exvideo-workflow"
    ray_address: str | None = Field(None, description="existing Ray cluster; none starts Ray in this process")
    preprocess: dict[str, Any] = Field(default_factory=dict)
    reshard: dict[str, Any] | None = Field(None, description="optional; none feeds preprocess's shards to train")
    train: dict[str, Any] = Field(default_factory=dict)
    generate: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    _configs: dict[str, StageConfig] = PrivateAttr(default_factory=dict)

    @field_validator("workdir", "model")
    @classmethod
    def _absolute_path(cls, value: Path) -> Path:
        # Ray workers run in their own working directories: every path a stage hands them must be absolute.
        return value.resolve()

    @field_validator("corpus")
    @classmethod
    def _absolute_local_corpus(cls, value: str) -> str:
        return value if is_uri(value) else str(Path(value).resolve())

    @field_validator("preprocess", "train", "generate", "evaluate", mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, value):
        # `train:` with nothing under it reads as None in YAML; it means "all defaults".
        return {} if value is None else value

    @model_validator(mode="after")
    def _sections_are_valid_stage_configs(self) -> "WorkflowSpec":
        configs = {stage: self.stage_config(stage, STAGE[stage].wired) for stage in self.stages}
        self._configs = configs
        conditioning = self.runner_value("generate", "conditioning_videos")
        if "input" not in self.generate and (not isinstance(conditioning, int) or conditioning < 1):
            raise ValueError(f"generate.conditioning_videos must be a positive integer (got {conditioning!r}): how "
                             "many preprocessed corpus videos give their first frame to generate from")
        check_across_stages(self, configs)
        return self

    def section_config(self, stage: str) -> StageConfig:
        """The stage's config as validated when the spec loaded (wired fields hold placeholders)."""
        return self._configs[stage]

    @property
    def stages(self) -> list[str]:
        """The stages this spec runs, in order."""
        return [stage.name for stage in STAGES if not stage.optional or getattr(self, stage.name) is not None]

    @property
    def model_family(self) -> str:
        """The model's family: as declared, else read from the checkpoint's model_index.json (SVD without one)."""
        return checkpoint_family(self.model, self.family)

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri(self.workdir)

    def stage_fields(self, stage: str) -> dict[str, Any]:
        """The section's own stage fields (runner-only keys removed)."""
        section = getattr(self, stage) or {}
        return {k: v for k, v in section.items() if k not in STAGE[stage].runner_keys}

    def runner_value(self, stage: str, key: str) -> Any:
        """A key of the section that the runner reads, or its default."""
        return (getattr(self, stage) or {}).get(key, STAGE[stage].runner_keys[key])

    def stage_config(self, stage: str, wired: dict[str, Any]) -> StageConfig:
        """The stage's typed config: the section's fields plus `wired` (the connecting paths)."""
        fields = self.stage_fields(stage)
        for key in sorted(set(fields) & set(STAGE[stage].wired)):
            raise ValueError(f"{stage}.{key} is set by the workflow (from the spec's top level or the previous "
                             f"stage's output); remove it from the {stage} section")
        try:
            return STAGE[stage].config_class().model_validate({**fields, **wired})
        except ValidationError as exc:
            raise ValueError(f"invalid {stage} section: {describe_errors(exc, prefix=stage)}") from None


def check_across_stages(spec: WorkflowSpec, configs: dict[str, StageConfig]) -> None:
    """Refuse, when the spec loads, what would otherwise fail after the stages before it ran; name both fields."""
    problems = []
    preprocess, train, generate = configs["preprocess"], configs["train"], configs["generate"]
    if train.trainable == "temporal" and preprocess.num_frames > train.num_frames:
        problems.append(f"preprocess.num_frames {preprocess.num_frames} exceeds train.num_frames "
                        f"{train.num_frames}, the position table the clips train: raise train.num_frames or "
                        "shorten the clips")
    params = generate.params
    if params.method == "exvideo" and params.overlap is not None and params.overlap >= train.num_frames:
        problems.append(f"generate.params.overlap {params.overlap} must be below train.num_frames "
                        f"{train.num_frames}: each window of a continued video is one position table long")
    elif params.method == "exvideo" and params.num_frames > train.num_frames and params.overlap is None:
        problems.append(f"generate.params.num_frames {params.num_frames} exceeds train.num_frames "
                        f"{train.num_frames}, the position table of the adapter train makes: lower "
                        "generate.params.num_frames, raise train.num_frames, or set generate.params.overlap to "
                        "continue window after window")
    problems += _family_problems(spec, train, params)
    reshard = configs.get("reshard")
    if reshard is not None and reshard.require_caption and not _corpus_has_captions(spec.corpus):
        problems.append(f"reshard.require_caption is true but no video of corpus {spec.corpus} has a caption: "
                        "every clip would be filtered out")
    if problems:
        raise ValueError("; ".join(problems))


def _family_problems(spec: WorkflowSpec, train, params) -> list[str]:
    """What the model's family cannot do, when the family is known at load (declared, or the checkpoint is there)."""
    from pipelines.generate.params import check_family

    if spec.family is None and not (spec.model / "model_index.json").is_file():
        return []  # a checkpoint written later (the demo's): the stages check when they load it
    family, problems = spec.model_family, []
    try:
        check_family(params, family)
    except ValueError as exc:
        problems.append(f"generate.params: {exc}")
    if family == "animatediff" and train.cond_dropout:
        problems.append(f"train.cond_dropout {train.cond_dropout} drops SVD's image conditioning, but model "
                        f"{spec.model} is an AnimateDiff checkpoint: set it to 0")
    return problems


def _corpus_has_captions(corpus: str) -> bool:
    """Whether any source of the corpus has a caption; True when the corpus cannot be read here (preprocess says)."""
    from preprocessing.manifest import read_sources

    try:
        rows, _ = read_sources(corpus)
    except (OSError, ValueError):
        return True
    return any((row["caption"] or "").strip() for row in rows)


def _inline_config_files(data: dict, base: Path) -> None:
    """Replace each section's `config_file` by the file's fields (inline fields win)."""
    for stage in STAGE:
        section = data.get(stage)
        if isinstance(section, dict) and "config_file" in section:
            path = Path(section.pop("config_file"))
            path = path if path.is_absolute() else base / path
            data[stage] = {**read_yaml_mapping(path, f"{stage}.config_file"), **section}


def load_spec(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> WorkflowSpec:
    """Read and validate a workflow spec; `overrides` are `section.field=value` strings applied on top."""
    path = Path(path)
    data = read_yaml_mapping(path, "workflow spec")
    _inline_config_files(data, path.parent)
    for override in overrides:
        apply_override(data, override)
    return validate_spec(data, str(path))


def validate_spec(data: dict, source: str = "<dict>") -> WorkflowSpec:
    """Validate spec data; a ConfigError names each bad field (with its section) and what to do."""
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid workflow spec {source}: {describe_errors(exc)}") from None

"""The evaluation stage's typed configuration (`exvideo evaluate`, the workflow's evaluate section).

Torch-free, like every stage's config module: a spec validates without loading a model library.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from exvideo.config import StageConfig, operational


class EvaluateConfig(StageConfig):
    """What to evaluate, where results go, and which optional models to use."""

    videos_dir: list[Path] = Field(min_length=1, description="folder(s) of <id>.mp4 + <id>.json; one per run")
    output_dir: Path = Path("runs/evaluate")
    tracking_uri: str | None = operational(None, description="default: sqlite:///<output_dir>/mlflow.db")
    experiment: str = operational("exvideo")
    run_name: str = operational("evaluate")
    parent_run_id: str | None = Field(None, description="nest the stage run under this run (e.g. a workflow's)")
    title: str = "ExVideo evaluation"
    svd_dir: Path | None = Field(None, description="local SVD checkpoint: enables CLIP consistency metrics")
    device: str = operational("cpu")
    i3d_path: Path | None = Field(None, description="local I3D TorchScript file: enables FVD")
    fvd_reference_dir: Path | None = Field(None, description="folder of real mp4 videos FVD compares against")
    fvd_num_frames: int = Field(16, ge=2)
    contact_sheet_frames: int = Field(8, ge=2)
    flow_pairs: int = Field(4, ge=1)
    adapter: Path | None = Field(None, description="adapter to log as an MLflow pyfunc model (needs svd_dir)")
    bundle_base: bool = Field(True, description="copy the SVD checkpoint into the logged model")
    registered_model_name: str | None = None
    model_alias: str | None = None

    @field_validator("videos_dir", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _model_logging_needs_its_inputs(self):
        if self.adapter is not None and self.svd_dir is None:
            raise ValueError("adapter is set but svd_dir is not: the logged model needs the base SVD checkpoint")
        if self.registered_model_name and self.adapter is None:
            raise ValueError("registered_model_name is set but adapter is not: there is no model to register")
        if self.model_alias and not self.registered_model_name:
            raise ValueError("model_alias is set but registered_model_name is not: an alias names a registered model")
        return self

"""The main job on embedded defaults: the whole workflow on a synthetic corpus and a tiny random model, on a CPU.

Writes real mp4 files (and deliberately broken ones) and a tiny checkpoint of the family's real classes in
diffusers format (SVD by default, AnimateDiff with `family=animatediff`) into the workdir, then runs the family's
workflow spec (`configs/demo.yaml`, `configs/demo_animatediff.yaml`) with its paths pointed there: preprocess ->
train -> generate -> evaluate, with an MLflow store in the workdir. Running it again reuses everything already done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

import exvideo
from exvideo.config import StageConfig
from exvideo.console import WORKFLOW_LOG, stage_log
from orchestration.runner import StageRecord, format_summary, run_workflow
from orchestration.spec import load_spec
from preprocessing.synthetic import write_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_SPEC = CONFIGS / "demo.yaml"
# Per family: the spec the demo runs, its default workdir, and the tiny model it writes (folder, the exvideo
# function writing it, name). The writer is looked up by name when it runs: reading a DemoConfig imports no torch.
FAMILY_DEMOS = {
    "svd": (DEMO_SPEC, Path("runs/demo"), "tiny-svd", "write_tiny_svd", "SVD"),
    "animatediff": (CONFIGS / "demo_animatediff.yaml", Path("runs/demo-animatediff"), "tiny-animatediff",
                    "write_tiny_animatediff", "AnimateDiff"),
}


class DemoConfig(StageConfig):
    """Which family's demo, where it writes, which spec it runs, and spec fields to override (`train.max_steps=2`)."""

    family: Literal["svd", "animatediff"] = "svd"
    workdir: Path | None = Field(None, description="default: runs/demo (SVD), runs/demo-animatediff")
    spec: Path | None = Field(None, description="default: the family's configs/demo*.yaml")
    seed: int = Field(0, ge=0, description="seed of the synthetic corpus and the tiny model's weights")
    spec_overrides: list[str] = Field(default_factory=list, description="`section.field=value` for the spec")

    @property
    def resolved_workdir(self) -> Path:
        return self.workdir or FAMILY_DEMOS[self.family][1]

    @property
    def resolved_spec(self) -> Path:
        return self.spec or FAMILY_DEMOS[self.family][0]


def prepare_inputs(cfg: DemoConfig) -> tuple[Path, Path]:
    """Write the synthetic corpus and the tiny model unless a previous demo did; return (manifest, model)."""
    _, _, folder, writer, name = FAMILY_DEMOS[cfg.family]
    manifest, model = cfg.resolved_workdir / "corpus" / "metadata.json", cfg.resolved_workdir / folder
    if not manifest.is_file():  # the corpus writer writes the manifest last
        write_corpus(manifest.parent, seed=cfg.seed)
        print(f"wrote a synthetic corpus (real mp4s, some deliberately broken): {manifest}")
    if not model.is_dir():
        getattr(exvideo, writer)(model, seed=cfg.seed)
        print(f"wrote a tiny random {name} checkpoint (diffusers format): {model}")
    return manifest, model


def run_demo(cfg: DemoConfig) -> list[StageRecord]:
    """Prepare the inputs, run the demo workflow, print where everything is; return the stages' records."""
    workdir = cfg.resolved_workdir
    workdir.mkdir(parents=True, exist_ok=True)
    with stage_log(workdir, WORKFLOW_LOG):
        manifest, model = prepare_inputs(cfg)
    spec = load_spec(cfg.resolved_spec, [f"workdir={workdir}", f"corpus={manifest}", f"model={model}",
                                         *cfg.spec_overrides])
    records = run_workflow(spec, spec_path=str(cfg.resolved_spec))
    print(format_summary(spec, records))
    return records

"""The main job on embedded defaults: the whole workflow on a synthetic corpus and a tiny random SVD, on a CPU.

Writes real mp4 files (and deliberately broken ones) and a tiny SVD checkpoint in diffusers format into the
workdir, then runs the workflow spec `configs/demo.yaml` with its paths pointed there: preprocess -> train ->
generate -> evaluate, with an MLflow store in the workdir. Running it again reuses everything already done.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from exvideo import write_tiny_svd
from exvideo.config import StageConfig
from exvideo.console import WORKFLOW_LOG, stage_log
from orchestration.runner import StageRecord, format_summary, run_workflow
from orchestration.spec import load_spec
from preprocessing.synthetic import write_corpus

DEMO_SPEC = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class DemoConfig(StageConfig):
    """Where the demo writes, which spec it runs, and spec fields to override (`train.max_steps=2`, ...)."""

    workdir: Path = Path("runs/demo")
    spec: Path = DEMO_SPEC
    seed: int = Field(0, ge=0, description="seed of the synthetic corpus and the tiny model's weights")
    spec_overrides: list[str] = Field(default_factory=list, description="`section.field=value` for the spec")


def prepare_inputs(cfg: DemoConfig) -> tuple[Path, Path]:
    """Write the synthetic corpus and the tiny model unless a previous demo did; return (manifest, model)."""
    manifest, model = cfg.workdir / "corpus" / "metadata.json", cfg.workdir / "tiny-svd"
    if not manifest.is_file():  # the corpus writer writes the manifest last
        write_corpus(manifest.parent, seed=cfg.seed)
        print(f"wrote a synthetic corpus (real mp4s, some deliberately broken): {manifest}")
    if not model.is_dir():
        write_tiny_svd(model, seed=cfg.seed)
        print(f"wrote a tiny random SVD checkpoint (diffusers format): {model}")
    return manifest, model


def run_demo(cfg: DemoConfig) -> list[StageRecord]:
    """Prepare the inputs, run the demo workflow, print where everything is; return the stages' records."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    with stage_log(cfg.workdir, WORKFLOW_LOG):
        manifest, model = prepare_inputs(cfg)
    spec = load_spec(cfg.spec, [f"workdir={cfg.workdir}", f"corpus={manifest}", f"model={model}",
                                *cfg.spec_overrides])
    records = run_workflow(spec, spec_path=str(cfg.spec))
    print(format_summary(spec, records))
    return records

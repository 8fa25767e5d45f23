"""What each workflow stage does given its upstream outputs: build the stage's config, run it, name its outputs.

Every function takes the spec, the stage's output folder and the upstream stages' outputs, and returns
(outputs, mlflow_run_id or None, lineage tags). Outputs are JSON-ready and recorded in the completion marker, so
later stages (and later runs) read them from there.
"""

from __future__ import annotations

from pathlib import Path

from orchestration.spec import WorkflowSpec

Outcome = tuple[dict, str | None, dict[str, str]]


def run_preprocess_stage(spec: WorkflowSpec, out: Path, upstream: dict[str, dict]) -> Outcome:
    from preprocessing.run import format_summary, run_preprocess

    manifest = run_preprocess(spec.stage_config("preprocess", {
        "input": spec.corpus, "output": out, "model": spec.model, "ray_address": spec.ray_address}))
    print(format_summary(manifest))
    counts = manifest["counts"]
    if not counts["samples"]:
        raise ValueError(f"preprocess wrote no clips from {spec.corpus} (failures by reason: "
                         f"{counts['failures_by_reason']}); check the corpus and the clip size fields")
    return ({"shards": str(out / "shards"), "samples": counts["samples"], "failures": counts["failures"]},
            None, {"lineage.corpus": spec.corpus})


def run_reshard_stage(spec: WorkflowSpec, out: Path, upstream: dict[str, dict]) -> Outcome:
    from preprocessing.reshard import format_reshard_summary, run_reshard

    source = Path(upstream["preprocess"]["shards"]).parent
    summary = run_reshard(spec.stage_config("reshard", {"input": source, "output": out,
                                                        "ray_address": spec.ray_address}))
    print(format_reshard_summary(summary))
    return {"shards": str(out / "shards")}, None, {"lineage.input_shards": str(source)}


def run_train_stage(spec: WorkflowSpec, out: Path, upstream: dict[str, dict]) -> Outcome:
    from pipelines.train import run_training

    shards = (upstream.get("reshard") or upstream["preprocess"])["shards"]
    result = run_training(spec.stage_config("train", {
        "svd_dir": spec.model, "shards": shards, "storage_path": out, "name": "train",
        "tracking_uri": spec.resolved_tracking_uri, "experiment": spec.experiment}))
    outputs = {"adapter": str(result.adapter), "run_dir": str(result.run_dir), "steps": result.steps,
               "final_loss": result.final_loss}
    return outputs, result.mlflow_run_id, {"lineage.shards": shards}


def _conditioning_rows(spec: WorkflowSpec, out: Path, shards_dir: Path) -> Path:
    """Rows that condition generation on the first frame of the first preprocessed corpus videos."""
    import json

    import decord
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines.generate.video_io import write_png, write_text
    from preprocessing.manifest import read_sources

    count = spec.generate.get("conditioning_videos", 2)
    used = list(dict.fromkeys(pq.read_table(shards_dir / "index.parquet", columns=["source"])["source"].to_pylist()))
    uris = {row["source"]: row["uri"] for row in read_sources(spec.corpus)[0]}
    images = out / "conditioning"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, source in enumerate(used[:count]):
        frame = decord.VideoReader(uris[source])[0].asnumpy()
        write_png(images / f"video{number}.png", Image.fromarray(frame))
        rows.append({"id": f"video{number}", "image": f"conditioning/video{number}.png"})
    listing = out / "rows.jsonl"
    write_text(listing, "".join(json.dumps(row) + "\n" for row in rows))
    return listing


def run_generate_stage(spec: WorkflowSpec, out: Path, upstream: dict[str, dict]) -> Outcome:
    from pipelines.generate import run_generate_job

    adapter = upstream["train"]["adapter"]
    wired = {"output": out, "model": spec.model, "adapter": adapter, "ray_address": spec.ray_address}
    if "input" not in spec.generate:
        wired["input"] = _conditioning_rows(spec, out, Path(upstream["preprocess"]["shards"]).parent)
    summary = run_generate_job(spec.stage_config("generate", wired))
    if not summary["made"] and not summary["skipped_done"]:
        raise ValueError(f"generate made no video; reasons in {out / 'failures.jsonl'}")
    outputs = {"videos": str(out / "videos"), "made": len(summary["made"]) + len(summary["skipped_done"]),
               "failed": summary["failed"]}
    return outputs, None, {"lineage.adapter": adapter}


def run_evaluate_stage(spec: WorkflowSpec, out: Path, upstream: dict[str, dict], parent_run_id: str) -> Outcome:
    from pipelines.evaluate.run import run_evaluation

    videos = upstream["generate"]["videos"]
    fields = {"svd_dir": spec.model} if "svd_dir" not in spec.evaluate else {}
    outcome = run_evaluation(spec.stage_config("evaluate", {
        **fields, "videos_dir": [videos], "output_dir": out, "tracking_uri": spec.resolved_tracking_uri,
        "experiment": spec.experiment, "parent_run_id": parent_run_id}))
    outputs = {"report": str(outcome["report"]), "videos_evaluated": len(outcome["results"])}
    return outputs, outcome["run_id"], {"lineage.videos": videos}

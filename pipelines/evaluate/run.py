"""The evaluate stage: metrics, report and MLflow runs for folders of generated videos.

Per video: decode, weight-free metrics, CLIP consistency when an SVD checkpoint is given, figures, and a nested MLflow
run holding its metrics, curves (metric histories stepped by frame index), video, record and figures. Per run/method
group: means and FVD (or the reason it was skipped). Then the HTML report, published atomically and logged to the
parent run, and optionally the adapter as a registered pyfunc model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
from tqdm import tqdm

from exvideo import load_adapter, load_svd
from exvideo.config import default_tracking_uri
from exvideo.tracking import experiment_id_for, log_histories, log_scalars, register_model, stage_run, tracking_to
from pipelines.evaluate import figures
from pipelines.evaluate.config import EvaluateConfig
from pipelines.evaluate.clip_metrics import FVDResult, clip_consistency, compute_fvd, fvd_skip_reason, sample_frames
from pipelines.evaluate.metrics import curve_frame_index, video_metrics
from pipelines.evaluate.report import (
    VideoResult, group_key, publish_dir, render_html, staging_dir, summarise_groups,
)
from pipelines.evaluate.video_model import log_video_model
from pipelines.evaluate.videos import GeneratedVideo, Skipped, decode, find_videos, load_conditioning, read_frames

SKIPS_SHOWN = 10  # skipped inputs named on the console; the report names them all


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _write_figures(frames: np.ndarray, curves: dict, folder: Path, stem: str, cfg: EvaluateConfig) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    figures.contact_sheet(frames, folder / f"{stem}-contact.png", cfg.contact_sheet_frames)
    figures.flow_sheet(frames, folder / f"{stem}-flow.png", cfg.flow_pairs)
    figures.curves_figure(curves, folder / f"{stem}-curves.png", title=stem)
    return {"contact_sheet": f"images/{stem}-contact.png", "flow": f"images/{stem}-flow.png",
            "curves": f"images/{stem}-curves.png"}


def _log_video_run(video: GeneratedVideo, result: VideoResult, report_dir: Path) -> None:
    with stage_run(video.record.id, tags={"method": video.record.method, "run": video.run, "kind": "video"}):
        # The declared record fields only: free-form extras may not be valid param names; the record is an artifact.
        declared = video.record.model_dump(mode="json", include=set(type(video.record).model_fields))
        mlflow.log_params({k: v for k, v in declared.items() if v is not None})
        log_scalars(result.metrics.scalars)
        log_histories({f"curve.{name}": (curve_frame_index(name, curve), curve)
                       for name, curve in result.metrics.curves.items()})
        mlflow.log_artifact(str(video.video_path), "video")
        mlflow.log_artifact(str(video.video_path.with_suffix(".json")), "video")
        for relative in result.figures.values():
            mlflow.log_artifact(str(report_dir / relative), "figures")


def _evaluate_video(video: GeneratedVideo, stem: str, svd, cfg: EvaluateConfig, report_dir: Path,
                    ) -> tuple[VideoResult, np.ndarray]:
    frames = decode(video)
    conditioning = load_conditioning(video)
    metrics = video_metrics(frames, conditioning)
    if svd is not None:
        encoder_metrics = clip_consistency(svd, frames, conditioning)
        metrics.scalars.update(encoder_metrics.scalars)
        metrics.curves.update(encoder_metrics.curves)
    paths = _write_figures(frames, metrics.curves, report_dir / "images", stem, cfg)
    # The report plays its own copy, so the folder (and its MLflow artifact) works offline and moved elsewhere.
    copy = f"videos/{stem}.mp4"
    (report_dir / "videos").mkdir(exist_ok=True)
    shutil.copyfile(video.video_path, report_dir / copy)
    result = VideoResult(video.record.id, video.record.method, video.run, metrics, paths,
                         video.record.model_dump(mode="json"), video=copy)
    return result, frames


def _fvd_by_group(cfg: EvaluateConfig, samples: dict[tuple[str, str], list[np.ndarray]],
                  ) -> dict[tuple[str, str], FVDResult]:
    reason = fvd_skip_reason(cfg.i3d_path, cfg.fvd_reference_dir)
    if reason is not None:
        return {key: FVDResult(None, reason) for key in samples}
    reference = [sample_frames(read_frames(path), cfg.fvd_num_frames)
                 for path in sorted(cfg.fvd_reference_dir.glob("*.mp4"))]
    return {key: compute_fvd(cfg.i3d_path, clips, cfg.fvd_reference_dir, reference, cfg.fvd_num_frames)
            for key, clips in samples.items()}


def _log_group_metrics(groups) -> None:
    for group in groups:
        prefix = f"{_safe(group.run)}.{_safe(group.method)}"
        log_scalars({f"{prefix}.{name}": value for name, value in group.means.items()})
        if group.fvd.value is not None:
            log_scalars({f"{prefix}.fvd": group.fvd.value})


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Evaluate every video in `cfg.videos_dir`, write the report, log to MLflow; return what was made."""
    if cfg.adapter is not None and not cfg.adapter.is_file():
        raise FileNotFoundError(f"adapter {cfg.adapter} does not exist; point adapter at an adapter .safetensors file")
    videos, skipped = [], []
    for folder in cfg.videos_dir:
        found, missed = find_videos(folder)
        videos += found
        skipped += missed
    if not videos:
        reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped) or "no .mp4 files"
        raise ValueError(f"nothing to evaluate in {[str(d) for d in cfg.videos_dir]} ({reasons})")
    svd = None
    notes = []
    if cfg.svd_dir is not None:
        svd = load_svd(cfg.svd_dir, device=cfg.device)
    else:
        notes.append("CLIP consistency skipped: no svd_dir given (its image encoder computes the features)")
    fvd_reason = fvd_skip_reason(cfg.i3d_path, cfg.fvd_reference_dir)
    if fvd_reason:
        notes.append(f"FVD skipped: {fvd_reason}")

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    report_dir = staging_dir(cfg.output_dir / "report")
    tracking_uri = cfg.tracking_uri or default_tracking_uri(cfg.output_dir)
    try:
        with tracking_to(tracking_uri):
            outcome = _evaluate_and_log(cfg, videos, skipped, svd, notes, fvd_reason, report_dir)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)  # left only when the run failed before publishing
    outcome["tracking_uri"] = tracking_uri
    print(f"evaluated {len(outcome['results'])} videos in {len(outcome['groups'])} run/method groups, skipped "
          f"{len(skipped)}; report {outcome['report']}; MLflow run {outcome['run_id']} at {tracking_uri}")
    for skip in skipped[:SKIPS_SHOWN]:
        print(f"  skipped {skip.path}: {skip.reason}")
    if len(skipped) > SKIPS_SHOWN:
        print(f"  ... and {len(skipped) - SKIPS_SHOWN} more skipped, each with its reason in the report")
    for group in outcome["groups"]:
        print(f"  {group.run} / {group.method}: {group.count} videos, flicker {group.means['flicker']:.4f}, "
              f"motion {group.means['motion']:.2f} px/frame, contrast last/first "
              f"{group.means['contrast_ratio_last_to_first']:.2f}, FVD "
              f"{'%.2f' % group.fvd.value if group.fvd.value is not None else 'skipped'}")
    return outcome


def _evaluate_and_log(cfg: EvaluateConfig, videos: list[GeneratedVideo], skipped: list[Skipped], svd,
                      notes: list[str], fvd_reason: str | None, report_dir: Path) -> dict:
    results, fvd_samples = [], {}
    experiment_id = experiment_id_for(cfg.experiment, cfg.output_dir)
    with stage_run(cfg.run_name, experiment_id, cfg.parent_run_id, tags={"stage": "evaluate"}) as parent:
        mlflow.log_params({"videos_dir": [str(d) for d in cfg.videos_dir], "svd_dir": str(cfg.svd_dir),
                           "i3d_path": str(cfg.i3d_path), "fvd_reference_dir": str(cfg.fvd_reference_dir)})
        for index, video in enumerate(tqdm(videos, desc="evaluate", unit="video")):
            stem = f"{index:04d}-{_safe(video.video_path.stem)}"
            try:
                result, frames = _evaluate_video(video, stem, svd, cfg, report_dir)
            except ValueError as exc:
                skipped.append(Skipped(video.video_path, str(exc)))
                continue
            results.append(result)
            if fvd_reason is None and len(frames) >= cfg.fvd_num_frames:
                fvd_samples.setdefault(group_key(result), []).append(sample_frames(frames, cfg.fvd_num_frames))
            _log_video_run(video, result, report_dir)
        if not results:
            raise ValueError("no video could be evaluated: " + "; ".join(f"{s.path}: {s.reason}" for s in skipped))

        groups = summarise_groups(results, _fvd_by_group(cfg, fvd_samples) if fvd_reason is None else
                                  {group_key(r): FVDResult(None, fvd_reason) for r in results})
        figures.comparison_figure([(f"{r.method} ({r.run})", r.metrics.curves) for r in results],
                                  report_dir / "images" / "comparison.png")
        notes += [f"skipped {s.path.name}: {s.reason}" for s in skipped]
        (report_dir / "index.html").write_text(render_html(cfg.title, results, groups, "images/comparison.png", notes))
        summary = {
            "groups": [{"run": g.run, "method": g.method, "videos": g.count, "means": g.means,
                        "fvd": g.fvd.value, "fvd_skip_reason": g.fvd.reason or None} for g in groups],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped],
        }
        (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
        report = publish_dir(report_dir, cfg.output_dir / "report")
        _log_group_metrics(groups)
        mlflow.log_metrics({"videos_evaluated": len(results), "videos_skipped": len(skipped)})
        mlflow.log_artifacts(str(report), "report")
        model_uri = model_version = None
        if cfg.adapter is not None:
            model_uri, model_version = _log_adapter(cfg, svd)
    return {"report": report / "index.html", "run_id": parent.info.run_id, "results": results, "groups": groups,
            "skipped": skipped, "model_uri": model_uri, "model_version": model_version}


def _log_adapter(cfg: EvaluateConfig, svd) -> tuple[str, str | None]:
    mlflow.log_artifact(str(cfg.adapter), "adapter")
    load_adapter(svd.unet, cfg.adapter)  # checks the adapter fits the base before it is logged as a model
    info = log_video_model(cfg.adapter, cfg.svd_dir, int(svd.unet.config["exvideo_num_frames"]), cfg.bundle_base)
    version = None
    if cfg.registered_model_name:
        version = register_model(info.model_uri, cfg.registered_model_name, cfg.model_alias)
    return info.model_uri, version

"""The CPU half of the pipeline, one source at a time: probe -> clip windows -> decode, crop -> motion bucket.

`prepare_source` is the Ray Data flat_map function. It turns one source row into one row per clip, or one
failure row, so every source shows up downstream: rows of a source are contiguous and the last one is marked,
which is how the driver knows a source is finished. All rows share one schema (a failure has empty pixels and
its ledger fields filled in), so Ray Data never has to reconcile blocks of different shapes.
"""

from __future__ import annotations

import hashlib

from exvideo.ray_setup import node_id
from preprocessing.clips import clip_windows
from preprocessing.config import PreprocessConfig
from preprocessing.decode import ClipDecoder, clip_motion
from preprocessing.ledger import SourceError
from preprocessing.probe import VideoFile, probe


def sample_key(source: str, clip_index: int) -> str:
    """Stable WebDataset key of a clip: a hash of the source's manifest path and the clip's index (no dots)."""
    return f"{hashlib.sha1(source.encode()).hexdigest()[:16]}_{clip_index:04d}"


def _row(source: dict, clip_index: int, **fields) -> dict:
    row = {
        "source": source["source"], "caption": source["caption"], "clip_index": clip_index,
        "key": sample_key(source["source"], clip_index), "frame_indices": [], "fps": 0.0, "crop": [],
        "motion_bucket": -1, "motion_score": 0.0, "pixels": b"", "stage": "", "reason_code": "", "reason": "",
        "last_of_source": False, "decode_node": node_id(),
    }
    row.update(fields)
    return row


def _failure_row(source: dict, clip_index: int, error: SourceError, last: bool = False) -> dict:
    return _row(source, clip_index, stage=error.stage, reason_code=error.reason_code, reason=error.reason,
                last_of_source=last)


def prepare_source(source: dict, cfg: PreprocessConfig) -> list[dict]:
    """Clip rows (uint8 pixels [T, H, W, 3] as raw bytes) of one source, or a single failure row.

    AnimateDiff learns from captions: a source without one takes `cfg.default_prompt`, or fails before decoding.
    """
    if cfg.family == "animatediff" and not source["caption"]:
        if cfg.default_prompt is None:
            error = SourceError("prepare", "no_caption", "the manifest row has no caption and AnimateDiff trains on "
                                                         "captions; add one or set preprocess.default_prompt")
            return [_failure_row(source, -1, error, last=True)]
        source = {**source, "caption": cfg.default_prompt}
    try:
        video = VideoFile(source["uri"])
        info = probe(video, cfg)
        decoder = ClipDecoder(video, info.width, info.height, cfg.width, cfg.height, cfg.decode_threads)
    except SourceError as error:
        return [_failure_row(source, -1, error, last=True)]
    except Exception as exc:  # decord can still fail opening the scaled reader of a stream it probed
        return [_failure_row(source, -1, SourceError("decode", "decode_error", _short(exc)), last=True)]
    rows = []
    for clip_index, indices in enumerate(clip_windows(info.num_frames, cfg)):
        try:
            frames = decoder.clip(indices)
        except Exception as exc:  # decord raises DECORDError or RuntimeError on damaged packets
            error = SourceError("decode", "decode_error", f"frames {indices[0]}..{indices[-1]}: {_short(exc)}")
            rows.append(_failure_row(source, clip_index, error))
            continue
        bucket, score = clip_motion(frames)
        rows.append(_row(source, clip_index, frame_indices=indices, fps=info.fps / cfg.frame_stride,
                         crop=decoder.crop, motion_bucket=bucket, motion_score=score, pixels=frames.tobytes()))
    rows[-1]["last_of_source"] = True
    return rows


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]

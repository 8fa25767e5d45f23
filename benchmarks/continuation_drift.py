"""Drift of a video longer than the position table: ExVideo continuation against `chain`, by quarter.

    python benchmarks/continuation_drift.py --json benchmarks/results/continuation_drift.json

Both make `--frames` frames from one first frame with the tiny random SVD checkpoint (or `--model DIR`): exvideo
continues windows of its `--table`-frame position table, each conditioned on the last `--overlap` frames of the
one before; chain runs the base model in clips of the same length, each conditioned on the previous clip's last
frame. Reported: the evaluation's quarter summaries (first / middle / last quarter of each drift curve), the wall
time and the peak of live tensor memory while denoising against one window's. Random tiny weights say how the
machinery behaves, not how good the videos are.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from exvideo import write_tiny_svd
from pipelines.evaluate.metrics import video_metrics
from pipelines.generate import generate_video, load_pipeline
from train_memory import LiveStorageBytes

QUARTER_KEYS = ("brightness", "contrast", "saturation", "sharpness", "ssim_to_first")


def measured_video(pipe, image, **params) -> tuple[np.ndarray, float, int]:
    """Frames, wall seconds, and the peak live tensor bytes of the denoising (the decode's output excluded)."""
    peak = {}
    first_pass = pipe._first_pass

    def tracked(*args):
        with LiveStorageBytes() as tracker:
            latents = first_pass(*args)
        peak["bytes"] = tracker.peak
        return latents

    pipe._first_pass = tracked
    start = time.perf_counter()
    try:
        video = generate_video(pipe, image, **params)
    finally:
        pipe._first_pass = first_pass
    return video.frames, time.perf_counter() - start, peak["bytes"]


def quarters(frames: np.ndarray) -> dict[str, float]:
    scalars = video_metrics(frames).scalars
    return {key: round(value, 4) for key, value in scalars.items()
            if key.split(".")[0] in QUARTER_KEYS and key.rsplit(".", 1)[-1] in ("first", "middle", "last")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="diffusers SVD directory (default: a tiny random one)")
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--table", type=int, default=32)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or write_tiny_svd(Path(scratch) / "tiny-svd")
        image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), np.uint8))
        common = {"height": args.size, "width": args.size, "steps": args.steps}
        exvideo = load_pipeline(model, table_frames=args.table)
        base = load_pipeline(model, method="direct")
        for pipe in (exvideo, base):
            pipe.set_progress_bar_config(disable=True)
        rows = {}
        _, window_s, window_peak = measured_video(exvideo, image, num_frames=args.table, **common)
        rows["exvideo, one window"] = {"frames": args.table, "wall_s": round(window_s, 2), "peak_bytes": window_peak}
        frames, wall, peak = measured_video(exvideo, image, num_frames=args.frames, overlap=args.overlap, **common)
        rows["exvideo, continued"] = {"frames": args.frames, "wall_s": round(wall, 2), "peak_bytes": peak,
                                      "peak_vs_one_window": round(peak / window_peak, 3), **quarters(frames)}
        frames, wall, peak = measured_video(base, image, num_frames=args.frames, method="chain",
                                            clip_frames=args.table, window_stride=args.table // 2, **common)
        rows["chain"] = {"frames": args.frames, "wall_s": round(wall, 2), "peak_bytes": peak, **quarters(frames)}
    report = {"command": "python benchmarks/continuation_drift.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

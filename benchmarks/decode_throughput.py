"""Clip decode + resize throughput on one core: our decoder against the ffmpeg command line, same clips, same run.

The work (results in benchmarks/RESULTS.md, "Clip decode + resize"): 128 frames of a 720p H.264 video, short
side scaled to 512, centre-cropped to 512x512, as uint8 RGB in memory. Contenders, each limited to one thread:
    ours           preprocessing.decode.ClipDecoder (decord, scaling inside the decoder, then the crop)
    decord-native  decord at native size, then torch antialiased resize (what in-decoder scaling avoids)
    ffmpeg-cli     `ffmpeg -threads 1 -i clip.mp4 -vf scale,crop -f rawvideo -` piped into numpy
The video is encoded with x264's default preset and carries film grain, so decoding costs what real footage costs.

    python benchmarks/decode_throughput.py [--repeats 5] [--frames 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from decord import VideoReader

from preprocessing.decode import ClipDecoder
from preprocessing.probe import VideoFile
from preprocessing.synthetic import VideoSpec, render_frames, write_mp4

WIDTH, HEIGHT, TARGET = 1280, 720, 512


def make_clip(folder: Path, frames: int) -> Path:
    spec = VideoSpec("bench", width=WIDTH, height=HEIGHT, fps=30, num_frames=frames, speed=8.0)
    pixels = render_frames(spec).astype(np.int16)
    grain = np.random.default_rng(0).integers(-12, 13, size=pixels.shape, dtype=np.int16)
    return write_mp4(folder / "clip720p.mp4", np.clip(pixels + grain, 0, 255).astype(np.uint8), 30, preset="medium")


def ours(path: Path, frames: int) -> np.ndarray:
    return ClipDecoder(VideoFile(str(path)), WIDTH, HEIGHT, TARGET, TARGET, threads=1).clip(list(range(frames)))


def decord_native(path: Path, frames: int) -> np.ndarray:
    native = VideoReader(str(path), num_threads=1).get_batch(list(range(frames))).asnumpy()
    scaled_width = round(WIDTH * TARGET / HEIGHT)
    x = F.interpolate(torch.from_numpy(native).permute(0, 3, 1, 2).float(), size=(TARGET, scaled_width),
                      mode="bilinear", antialias=True)
    left = (scaled_width - TARGET) // 2
    return x[..., left:left + TARGET].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ffmpeg_cli(path: Path, frames: int) -> np.ndarray:
    scaled_width = round(WIDTH * TARGET / HEIGHT)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-threads", "1", "-i", str(path),
               "-frames:v", str(frames), "-filter_threads", "1",
               "-vf", f"scale={scaled_width}:{TARGET},crop={TARGET}:{TARGET}",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    out = subprocess.run(command, check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype=np.uint8).reshape(frames, TARGET, TARGET, 3)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path = make_clip(Path(folder), args.frames)
        contenders = {"ours": ours, "decord-native": decord_native, "ffmpeg-cli": ffmpeg_cli}
        seconds = {name: [] for name in contenders}
        cpu_seconds = {name: [] for name in contenders}
        reference = ffmpeg_cli(path, args.frames)
        for name, fn in contenders.items():
            out = fn(path, args.frames)  # warm-up, and a check that all decode the same clip
            assert out.shape == reference.shape, (name, out.shape)
            print(f"{name}: mean abs difference to ffmpeg-cli {np.abs(out.astype(int) - reference).mean():.2f}")
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every contender alike
            for name, fn in contenders.items():
                cpu_start, start = _cpu_seconds(), time.perf_counter()
                fn(path, args.frames)
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(_cpu_seconds() - cpu_start)
    result = {name: {"wall_s_best": round(min(s), 3), "wall_s_median": round(float(np.median(s)), 3),
                     "cpu_s_median": round(float(np.median(cpu_seconds[name])), 3),
                     "clips_per_second_per_core": round(1 / min(s), 3)} for name, s in seconds.items()}
    # Speed relative to ffmpeg (>1: faster): best wall time, median wall time, median CPU time (this process plus
    # its children, so ffmpeg's own CPU counts; the least sensitive to other load on the machine).
    result["ours_vs_ffmpeg"] = {
        key: round(result["ffmpeg-cli"][key] / result["ours"][key], 3)
        for key in ("wall_s_best", "wall_s_median", "cpu_s_median")}
    result["work"] = f"{args.frames} frames of {WIDTH}x{HEIGHT} H.264 -> {TARGET}x{TARGET}, one thread each"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

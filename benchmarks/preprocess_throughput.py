"""End-to-end preprocessing throughput with the tiny encoder on CPU: corpus -> Ray Data -> shards.

Writes a synthetic corpus (real H.264 mp4s at 320x240, 96 frames), a tiny random SVD checkpoint, starts a local
Ray and runs `run_preprocess` twice on fresh outputs: the first run pays for starting Ray workers and loading the
encoder actor, the second shows the steady state on warm workers. Reports clips/s and sources/s of each.

    python benchmarks/preprocess_throughput.py [--videos 24] [--num-frames 16] [--size 128] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from exvideo import write_tiny_svd
from preprocessing.config import PreprocessConfig
from preprocessing.run import run_preprocess
from preprocessing.synthetic import VideoSpec, write_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        specs = tuple(VideoSpec(f"v{i:03d}", width=320, height=240, fps=24, num_frames=96, speed=1 + i % 7)
                      for i in range(args.videos))
        manifest = write_corpus(root / "corpus", good=specs, broken=False)
        model = write_tiny_svd(root / "tiny-svd")
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        ray_start = time.perf_counter() - start
        runs = {}
        for name in ("cold", "warm"):
            cfg = PreprocessConfig(input=str(manifest), output=root / name, model=model, num_frames=args.num_frames,
                                   clips_per_video=2, height=args.size, width=args.size, progress=False)
            result = run_preprocess(cfg)
            now = result["this_invocation"]
            runs[name] = {"clips": now["clips_written"], "seconds": now["seconds"],
                          "clips_per_second": now["clips_per_second"],
                          "sources_per_second": round(now["sources_processed"] / now["seconds"], 3)}
        ray.shutdown()
    print(json.dumps({"work": f"{args.videos} videos 320x240x96 -> 2 clips each of {args.num_frames} frames at "
                              f"{args.size}x{args.size}, tiny SVD encoder, CPU, {args.cpus} Ray CPUs",
                      "ray_init_seconds": round(ray_start, 2), **runs}, indent=1))


if __name__ == "__main__":
    main()

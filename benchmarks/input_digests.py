"""What the workflow pays to key its stages on the model's content: digesting a checkpoint-sized folder the first
time, again with the per-file cache (`exvideo.digests`), and without it (every byte read on every run, as the
encoder fingerprint of preprocessing did before the cache).

    python benchmarks/input_digests.py --gib 4

The folder is written once with random bytes (a few large weight files and small configs, as a diffusers
checkpoint) under a temporary directory, with its own cache folder; everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from exvideo.digests import cache_file, folder_sha256


def write_checkpoint(root: Path, gib: float) -> int:
    """A diffusers-like folder: three weight files sharing `gib` GiB, and a config beside each. Returns bytes."""
    total = 0
    for component, share in (("unet", 0.6), ("image_encoder", 0.3), ("vae", 0.1)):
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text(json.dumps({"component": component}))
        size = int(gib * share * (1 << 30))
        with open(root / component / "diffusion_pytorch_model.safetensors", "wb") as handle:
            for offset in range(0, size, 1 << 26):
                handle.write(os.urandom(min(1 << 26, size - offset)))
        total += size
    (root / "model_index.json").write_text("{}")
    return total


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="size of the synthetic checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        size = write_checkpoint(Path(tmp) / "model", args.gib)
        model = Path(tmp) / "model"
        first, digest = timed(lambda: folder_sha256(model))
        cached = [timed(lambda: folder_sha256(model))[0] for _ in range(args.repeats)]
        uncached = []
        for _ in range(args.repeats):
            cache_file().unlink()
            seconds, again = timed(lambda: folder_sha256(model))
            uncached.append(seconds)
            assert again == digest
        print(json.dumps({"bytes": size, "first_s": round(first, 3), "cached_s": [round(s, 4) for s in cached],
                          "uncached_s": [round(s, 3) for s in uncached],
                          "uncached_gib_per_s": round(size / (1 << 30) / min(uncached), 2)}, indent=1))


if __name__ == "__main__":
    main()

"""Preprocess and reshard at corpus scale on a real multi-node Ray cluster on this machine: does the per-source
cost stay flat, and the driver's memory bounded, as the corpus grows?

For each size N: a corpus of N sources (real mp4 files: a few tiny videos written by ffmpeg, hardlinked under N
names, with 1 in 100 broken), preprocessed by an `exvideo preprocess` driver connected to a head and two worker
nodes (exvideo.local_cluster), then resharded. The videos are tiny so that what is measured is the system's cost
(listing, scheduling, shard writing, the commit records and tables), not the codec's or the encoder's.

Measured per size: seconds per source (preprocess) and per sample (reshard), the driver's peak RSS (VmHWM), the
object stores' peak use summed over nodes (sampled each second), index and ledger rows, and whether every source is
accounted for (its clips in the index or its failure in the ledger).

    python benchmarks/corpus_scale.py --sizes 1000 4000 16000 --json benchmarks/results/corpus_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from exvideo import write_tiny_svd
from exvideo.local_cluster import LocalCluster
from preprocessing.synthetic import VideoSpec, render_frames, write_mp4

DISTINCT = 16


def write_scaled_corpus(root: Path, sources: int) -> tuple[Path, int]:
    """A manifest of `sources` paths (hardlinks to DISTINCT tiny videos; every 100th a zero-byte file)."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    originals = [write_mp4(root / f"original{i}.mp4", render_frames(VideoSpec(f"o{i}", width=32, height=32,
                                                                              num_frames=12, speed=1 + i % 5), i), 24)
                 for i in range(DISTINCT)]
    entries, broken = [], 0
    for n in range(sources):
        path = videos / f"{n:06d}.mp4"
        if n % 100 == 99:
            path.write_bytes(b"")
            broken += 1
        else:
            os.link(originals[n % DISTINCT], path)
        entries.append({"path": f"videos/{path.name}", "cap": f"source {n}"})
    manifest = root / "metadata.json"
    manifest.write_text(json.dumps(entries))
    return manifest, broken


class Sampler:
    """Samples the driver's peak RSS and the cluster's object-store use while a command runs."""

    def __init__(self, cluster: LocalCluster):
        self.cluster, self.driver_peak_mb, self.object_store_peak_mb = cluster, 0.0, 0.0
        self._stop = threading.Event()

    def _object_store_mb(self) -> float:
        request = urllib.request.Request(f"{self.cluster.dashboard}/nodes?view=summary",
                                         headers={"Authorization": f"Bearer {self.cluster.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                nodes = json.loads(response.read())["data"]["summary"]
        except OSError:
            return 0.0
        return sum(float(n.get("raylet", {}).get("objectStoreUsedMemory", 0)) for n in nodes) / 2**20

    def run(self, command: list[str]) -> float:
        """Run `command` to completion; return its wall time."""
        start = time.perf_counter()
        process = subprocess.Popen(command, env=self.cluster.client_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        watcher = threading.Thread(target=self._watch, args=(process.pid,), daemon=True)
        watcher.start()
        out, _ = process.communicate()
        self._stop.set()
        watcher.join()
        if process.returncode:
            raise RuntimeError(f"{' '.join(command[:3])} failed:\n{out[-3000:]}")
        return time.perf_counter() - start

    def _watch(self, pid: int) -> None:
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
                self.driver_peak_mb = max(self.driver_peak_mb, peak_kb / 1024)
            except (OSError, StopIteration):
                pass
            self.object_store_peak_mb = max(self.object_store_peak_mb, self._object_store_mb())
            time.sleep(1.0)


def measure(cluster: LocalCluster, root: Path, model: Path, sources: int) -> dict:
    manifest, broken = write_scaled_corpus(root / f"corpus-{sources}", sources)
    exvideo = str(Path(sys.executable).parent / "exvideo")
    output = root / f"shards-{sources}"
    fields = [f"input={manifest}", f"output={output}", f"model={model}", "num_frames=8", "height=32", "width=32",
              "shard_max_samples=256", "encode_actors=2", "encode_batch_size=16", f"ray_address={cluster.address}",
              "progress=false"]
    sampler = Sampler(cluster)
    preprocess_s = sampler.run([exvideo, "preprocess", *(a for f in fields for a in ("--set", f))])
    index_rows = pq.read_metadata(output / "index.parquet").num_rows
    ledger_rows = pq.read_metadata(output / "failures.parquet").num_rows
    reshard = [f"input={output}", f"output={root / f'resharded-{sources}'}", "shard_max_samples=512",
               "shuffle_seed=0", f"ray_address={cluster.address}", "progress=false"]
    reshard_sampler = Sampler(cluster)
    reshard_s = reshard_sampler.run([exvideo, "reshard", *(a for f in reshard for a in ("--set", f))])
    resharded = pq.read_metadata(root / f"resharded-{sources}" / "index.parquet").num_rows
    return {
        "sources": sources, "broken": broken, "index_rows": index_rows, "ledger_rows": ledger_rows,
        "accounted": index_rows + ledger_rows == sources, "resharded_rows": resharded,
        "preprocess_s": round(preprocess_s, 1), "preprocess_ms_per_source": round(1000 * preprocess_s / sources, 2),
        "reshard_s": round(reshard_s, 1), "reshard_ms_per_sample": round(1000 * reshard_s / max(resharded, 1), 2),
        "driver_peak_rss_mb": round(max(sampler.driver_peak_mb, reshard_sampler.driver_peak_mb), 1),
        "preprocess_driver_peak_rss_mb": round(sampler.driver_peak_mb, 1),
        "object_store_peak_mb": round(max(sampler.object_store_peak_mb, reshard_sampler.object_store_peak_mb), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="corpus-scale-") as folder:
        root = Path(folder)
        model = write_tiny_svd(root / "tiny-svd")
        with LocalCluster(root / "cluster", workers=("a", "b"), cpus_per_worker=2) as cluster:
            for size in args.sizes:
                rows.append(measure(cluster, root, model, size))
                print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    summary = {"rows": rows, "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
               "per_source_ratio_largest_to_smallest": round(rows[-1]["preprocess_ms_per_source"]
                                                             / first["preprocess_ms_per_source"], 2),
               "driver_rss_ratio_largest_to_smallest": round(rows[-1]["preprocess_driver_peak_rss_mb"]
                                                             / first["preprocess_driver_peak_rss_mb"], 2)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Writing WebDataset shards with commit records, and the tables built from them.

Layout of an output folder:
    run.json                 the run manifest: config, its hash, encoder fingerprint, counts, status
    shards/shard-000000.tar  numbered WebDataset tars (see exvideo.samples for the entries of a sample)
    commits/000000.json      one record per committed shard: its samples' index rows, the failures and the
                             sources finished since the previous commit, the shard's stats
    index.parquet            one row per sample (key, shard, byte offset and size in the tar, source, clip...)
    shards.parquet           per-shard stats
    failures.parquet         the ledger: source, stage, reason code, reason, clip index

A shard is written under a temporary name, renamed, and only then its commit record is written (also via a
temporary name). The commit records are the truth: at start-up anything not committed (temporary files, a tar
whose record never got written) is deleted, so a killed run leaves nothing half-written under a final name and
a rerun redoes exactly the uncommitted work. The parquet tables are rebuilt from the records at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset import TarWriter

from exvideo.digests import file_sha256
from exvideo.outputs import write_atomic
from preprocessing.ledger import LEDGER_SCHEMA, Failure

TAR_BLOCK = 512


def write_table_atomic(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> None:
    """A parquet file from rows, written via a temporary name."""
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def member_bytes(entries: dict) -> int:
    """Bytes a sample's entries take in a tar (a 512-byte header plus data padded to 512, per entry)."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in entries.items() if not k.startswith("__"))


def sample_spans(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (offset, length) of each sample's members in a tar: what random access (re-sharding) reads."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            end = member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
            span = spans.setdefault(key, [member.offset, end])
            span[1] = end
    return {key: (start, end - start) for key, (start, end) in spans.items()}


def read_sample_entries(shard: Path, offset: int, length: int) -> dict[str, bytes]:
    """The raw entries of one sample ({"__key__", "latents.npy", ...}) read by its span, without the other samples."""
    with open(shard, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read(length)
    entries: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for member in tar:
            key, suffix = member.name.split(".", 1)
            entries["__key__"] = key
            entries[suffix] = tar.extractfile(member).read()
    return entries


def sample_digests(shards_dir: Path) -> dict[str, str]:
    """Every sample of a shard folder: key -> sha256 of its entries' bytes (in entry-name order).

    Two shard sets hold the same samples exactly when their digests are equal, however the samples are spread over
    shards. A sample whose entry appears twice raises ValueError.
    """
    entries: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(shards_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                if name in entries.setdefault(key, {}):
                    raise ValueError(f"{member.name} appears twice in {shards_dir} (again in {shard.name})")
                entries[key][name] = tar.extractfile(member).read()
    return {key: hashlib.sha256(b"".join(data for _, data in sorted(sample.items()))).hexdigest()
            for key, sample in entries.items()}


def shard_stats(name: str, path: Path, rows: list[dict]) -> dict:
    """Per-shard stats row: counts, size, checksum, motion buckets and latent statistics of its samples."""
    buckets = np.array([r["motion_bucket"] for r in rows])
    means = np.array([r.get("latent_mean", 0.0) for r in rows])
    stds = np.array([r.get("latent_std", 0.0) for r in rows])
    return {
        "shard": name, "samples": len(rows), "bytes": path.stat().st_size, "sha256": file_sha256(path),
        "sources": len({r["source"] for r in rows}), "motion_bucket_min": int(buckets.min()),
        "motion_bucket_mean": float(buckets.mean()), "motion_bucket_max": int(buckets.max()),
        "latent_mean": float(means.mean()),
        # Pooled std of equal-sized samples: sqrt(mean of variances + variance of means).
        "latent_std": float(np.sqrt((stds**2).mean() + means.var())),
        "captioned": sum(bool(r.get("caption")) for r in rows),
    }


class ShardSetWriter:
    """Streams samples into numbered shards under `root/shards` and commits each finished shard.

    Shards close lazily, when the next sample would overflow them or at `finish`, so the commit of a shard can
    include every source whose last row arrived before it: a source is recorded as done exactly when all its
    samples are committed.
    """

    def __init__(self, root: Path, max_samples: int, max_bytes: int, first_shard: int = 0, first_commit: int = 0):
        self.root, self.max_samples, self.max_bytes = Path(root), max_samples, max_bytes
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        (self.root / "commits").mkdir(parents=True, exist_ok=True)
        self.next_shard, self.next_commit = first_shard, first_commit
        self._tar: TarWriter | None = None
        self._rows: list[dict] = []
        self._bytes = 0
        self.failures: list[Failure] = []
        self.done_sources: list[str] = []

    def _tmp_path(self) -> Path:
        return self.root / "shards" / f".shard-{self.next_shard:06d}.tar.tmp"

    def add(self, entries: dict, index_row: dict) -> None:
        """Append one sample (entries as exvideo.samples.encode_sample returns them) and its index row."""
        size = member_bytes(entries)
        if self._rows and (len(self._rows) >= self.max_samples or self._bytes + size > self.max_bytes):
            self.commit()
        if self._tar is None:
            # mtime fixed so a rerun of the same samples writes the same bytes.
            self._tar = TarWriter(str(self._tmp_path()), mtime=0)
        self._tar.write(entries)
        self._rows.append(index_row)
        self._bytes += size

    def abandon(self) -> int:
        """Drop the open shard (after a failed write): close and delete its temporary file; return its bytes."""
        pending = self._bytes
        if self._tar is not None:
            with contextlib.suppress(OSError):  # closing flushes, and the disk may still be full
                self._tar.close()
            self._tmp_path().unlink(missing_ok=True)
        self._tar, self._rows, self._bytes = None, [], 0
        return pending

    def commit(self) -> dict | None:
        """Close the open shard (if any) and commit it with the failures and done sources gathered so far."""
        if not self._rows and not self.failures and not self.done_sources:
            return None
        name, stats, rows = None, None, []
        if self._rows:
            self._tar.close()
            name = f"shard-{self.next_shard:06d}.tar"
            final = self.root / "shards" / name
            os.replace(self._tmp_path(), final)
            spans = sample_spans(final)
            rows = [{**r, "shard": name, "offset": spans[r["key"]][0], "bytes": spans[r["key"]][1]}
                    for r in self._rows]
            stats = shard_stats(name, final, rows)
            self.next_shard += 1
        record = {"commit": self.next_commit, "shard": name, "samples": rows, "stats": stats,
                  "failures": [f.to_row() for f in self.failures], "done_sources": self.done_sources}
        write_atomic(self.root / "commits" / f"{self.next_commit:06d}.json", json.dumps(record).encode())
        self.next_commit += 1
        self._tar, self._rows, self._bytes, self.failures, self.done_sources = None, [], 0, [], []
        return record


def read_commits(root: Path) -> list[dict]:
    """Commit records in order; a folder with none gives []."""
    folder = Path(root) / "commits"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9]*.json"))]


def discard_uncommitted(root: Path, commits: list[dict]) -> list[str]:
    """Delete temporary files and shards no commit record names (left by a killed run); return what went."""
    root = Path(root)
    committed = {c["shard"] for c in commits if c["shard"]}
    removed = []
    for folder in (root / "shards", root / "commits", root):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            stale_tar = folder.name == "shards" and path.suffix == ".tar" and path.name not in committed
            if path.name.endswith(".tmp") or stale_tar:
                path.unlink()
                removed.append(str(path.relative_to(root)))
    return sorted(removed)


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()), ("bytes", pa.int64()),
    ("source", pa.string()), ("clip_index", pa.int32()), ("caption", pa.string()), ("fps", pa.float64()),
    ("start_frame", pa.int64()), ("end_frame", pa.int64()), ("num_frames", pa.int32()),
    ("motion_bucket", pa.int32()), ("motion_score", pa.float64()), ("latent_mean", pa.float64()),
    ("latent_std", pa.float64()),
])


def write_tables(root: Path, commits: list[dict]) -> dict:
    """Rebuild index.parquet, shards.parquet and failures.parquet from the commit records; return counts."""
    root = Path(root)
    samples = [{c: row[c] for c in INDEX_SCHEMA.names} for record in commits for row in record["samples"]]
    stats = [record["stats"] for record in commits if record["stats"]]
    failures = [row for record in commits for row in record["failures"]]
    write_table_atomic(root / "index.parquet", samples, schema=INDEX_SCHEMA)
    write_table_atomic(root / "shards.parquet", stats)
    write_table_atomic(root / "failures.parquet", failures, schema=LEDGER_SCHEMA)
    by_reason: dict[str, int] = {}
    for row in failures:
        by_reason[row["reason_code"]] = by_reason.get(row["reason_code"], 0) + 1
    return {"samples": len(samples), "shards": len(stats), "bytes": sum(s["bytes"] for s in stats),
            "failures": len(failures), "failures_by_reason": dict(sorted(by_reason.items())),
            "sources_done": sum(len(record["done_sources"]) for record in commits)}

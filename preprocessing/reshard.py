"""Re-sharding: filter, shuffle and regroup an existing shard set into shards of a new size, payloads untouched.

Everything is planned from the input's index (one row per sample, with its byte span in its tar), so the corpus
itself is never loaded: the driver decides which samples go to which output shard, and Ray tasks copy each
sample's tar members by offset into the new shards. Copying raw members keeps every payload byte-identical.
The new index lists every kept sample and `filtered.parquet` every dropped one with the filter that dropped it,
so kept + filtered = input, and the run manifest says so.
"""

from __future__ import annotations

import fnmatch
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from tqdm import tqdm
from webdataset import TarWriter

from exvideo.ray_setup import ensure_ray, ordered_quiet_data
from preprocessing.config import ReshardConfig
from exvideo.digests import file_sha256
from exvideo.outputs import claim_output, recording_run, write_run_manifest
from preprocessing.shards import (
    INDEX_SCHEMA, member_bytes, read_sample_entries, sample_spans, shard_stats, write_table_atomic,
)

RESHARD_MANIFEST = "reshard.json"


def _filter_reason(row: dict, cfg: ReshardConfig, keys: set[str] | None) -> str | None:
    """Why a sample is dropped (the first filter it fails), or None to keep it."""
    if not cfg.motion_bucket_min <= row["motion_bucket"] <= cfg.motion_bucket_max:
        return "motion_bucket"
    if cfg.sources and not any(fnmatch.fnmatchcase(row["source"], pattern) for pattern in cfg.sources):
        return "source"
    if cfg.require_caption and not (row["caption"] or "").strip():
        return "no_caption"
    if keys is not None and row["key"] not in keys:
        return "key_list"
    return None


def plan_shards(rows: list[dict], max_samples: int, max_bytes: int) -> list[list[dict]]:
    """Group rows, in order, into shards of at most `max_samples` samples and (beyond one sample) `max_bytes`."""
    shards, current, size = [], [], 0
    for row in rows:
        if current and (len(current) >= max_samples or size + row["bytes"] > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(row)
        size += row["bytes"]
    return shards + ([current] if current else [])


def write_planned_shard(plan: dict) -> dict:
    """Write one output shard from its plan (Ray Data map function); an existing final shard is kept as is."""
    final = Path(plan["path"])
    if not final.exists():
        tmp = final.with_name(f".{final.name}.tmp")
        with TarWriter(str(tmp), mtime=0) as writer:
            for row in plan["rows"]:
                entries = read_sample_entries(Path(row["input_shard"]), row["offset"], row["bytes"])
                if entries.get("__key__") != row["key"] or member_bytes(entries) != row["bytes"]:
                    raise ValueError(f"{row['input_shard']} at offset {row['offset']} does not hold sample "
                                     f"{row['key']} as its index says; the input shard set is damaged")
                writer.write(entries)
        os.replace(tmp, final)
    spans = sample_spans(final)
    rows = [{**{c: r[c] for c in INDEX_SCHEMA.names}, "shard": final.name, "offset": spans[r["key"]][0],
             "bytes": spans[r["key"]][1]} for r in plan["rows"]]
    return {"rows": rows, "stats": shard_stats(final.name, final, rows)}


def run_reshard(cfg: ReshardConfig) -> dict:
    """Filter, shuffle and rewrite the input shard set into `cfg.output`; return the run manifest."""
    started = time.perf_counter()
    index_path = Path(cfg.input) / "index.parquet"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist; reshard reads a shard set written by "
                                "`exvideo preprocess` or `exvideo reshard`")
    keys = set(Path(cfg.keys_file).read_text().split()) if cfg.keys_file else None
    identity = {**cfg.output_fields(exclude={"output"}),
                "input": str(Path(cfg.input).resolve()), "input_index_sha256": file_sha256(index_path)}
    claim_output(cfg.output, RESHARD_MANIFEST, identity)
    shards_dir = Path(cfg.output) / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)

    rows = pq.read_table(index_path).to_pylist()
    kept, filtered = [], []
    for row in rows:
        reason = _filter_reason(row, cfg, keys)
        if reason is None:
            kept.append({**row, "input_shard": str(Path(cfg.input) / "shards" / row["shard"])})
        else:
            filtered.append({"key": row["key"], "source": row["source"], "shard": row["shard"], "reason": reason})
    if cfg.shuffle_seed is not None:
        kept = [kept[i] for i in np.random.default_rng(cfg.shuffle_seed).permutation(len(kept))]
    plans = [{"path": str(shards_dir / f"shard-{n:06d}.tar"), "rows": group}
             for n, group in enumerate(plan_shards(kept, cfg.shard_max_samples, cfg.shard_max_bytes))]
    with recording_run(cfg.output, RESHARD_MANIFEST, identity, stage="reshard"):
        ensure_ray(cfg.ray_address)
        results = []
        with ordered_quiet_data(preserve_order=False):
            if plans:
                dataset = ray.data.from_items(plans, override_num_blocks=len(plans)).map(write_planned_shard)
                results = list(tqdm(dataset.iter_rows(), total=len(plans), unit="shard", desc="reshard",
                                    disable=not cfg.progress))
        results.sort(key=lambda r: r["stats"]["shard"])
        index = [row for r in results for row in r["rows"]]
        write_table_atomic(Path(cfg.output) / "index.parquet", index, schema=INDEX_SCHEMA)
        write_table_atomic(Path(cfg.output) / "shards.parquet", [r["stats"] for r in results])
        write_table_atomic(Path(cfg.output) / "filtered.parquet", filtered)
        by_reason: dict[str, int] = {}
        for row in filtered:
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
        if len(index) + len(filtered) != len(rows):
            raise RuntimeError(f"reshard lost samples: {len(rows)} in, {len(index)} kept + {len(filtered)} "
                               "filtered")
    elapsed = time.perf_counter() - started
    return write_run_manifest(
        cfg.output, RESHARD_MANIFEST, identity, stage="reshard", status="complete",
        counts={"input": len(rows), "kept": len(index), "filtered": len(filtered),
                "filtered_by_reason": dict(sorted(by_reason.items())), "shards": len(results),
                "bytes": sum(r["stats"]["bytes"] for r in results)},
        seconds=round(elapsed, 3),
    )


def format_reshard_summary(manifest: dict) -> str:
    counts = manifest["counts"]
    reasons = "".join(f"\n    {reason}: {n}" for reason, n in counts["filtered_by_reason"].items())
    return (f"reshard {manifest['status']}: {counts['input']} samples in, {counts['kept']} kept in "
            f"{counts['shards']} shards ({counts['bytes'] / 1e6:.1f} MB), {counts['filtered']} filtered{reasons}\n"
            f"  in {manifest['seconds']:.1f} s")

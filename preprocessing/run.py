"""The preprocessing stage: corpus -> Ray Data (prepare on CPU tasks, encode on an actor pool) -> shards.

Design (README, "Preprocessing"): Ray Data streams clips in corpus order (`preserve_order`) and the driver
writes the shards itself from `iter_rows`. One writer means shard numbering, sample placement and the commit
records are deterministic, and resuming is "skip what the commit records say is done". Parallelism lives where
the cost is, in decoding and encoding; writing is a sequential copy of already-encoded bytes.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import ray
from tqdm import tqdm

from preprocessing.config import PreprocessConfig
from exvideo.families import checkpoint_family, encoder_fingerprint
from preprocessing.encode import ENCODERS, ENTRY_COLUMNS, resolve_device
from preprocessing.ledger import Failure
from preprocessing.manifest import read_sources
from exvideo.outputs import claim_output, recording_run, write_run_manifest
from preprocessing.prepare import prepare_source
from exvideo.storage import check_writable, storage_errors
from exvideo.ray_setup import add_count, check_capacity, ensure_ray, format_per_node, ordered_quiet_data
from preprocessing.shards import ShardSetWriter, discard_uncommitted, read_commits, write_tables

RUN_MANIFEST = "run.json"
MAX_INPUT_BLOCKS = 4096


def _identity(cfg: PreprocessConfig, fingerprint: str) -> dict:
    return {**cfg.content_fields(), "encoder_fingerprint": fingerprint}


def _manifest_fields(cfg: PreprocessConfig, config_hash: str, fingerprint: str) -> dict:
    return {"stage": "preprocess", "config": cfg.model_dump(mode="json"), "config_hash": config_hash,
            "encoder_fingerprint": fingerprint, "ray_version": ray.__version__}


def check_room(cfg: PreprocessConfig, device: str) -> None:
    """Refuse an encoder pool that leaves a local Ray no CPU to decode with: Ray Data would start the encoders and
    then wait forever for a decode task to feed them."""
    gpus = cfg.encode_actors * cfg.gpus_per_actor if device == "cuda" else 0
    asked = (f"encode_actors {cfg.encode_actors} (one CPU" + (f" and {cfg.gpus_per_actor:g} GPU" if gpus else "")
             + " each) and one CPU to decode")
    check_capacity({"CPU": cfg.encode_actors + 1, "GPU": gpus}, asked, "preprocess", cfg.ray_address)


def build_dataset(sources: list[dict], cfg: PreprocessConfig, config_hash: str, fingerprint: str, device: str):
    """The Ray Data pipeline over `sources`: prepare (CPU tasks) -> encode (actor pool on `device`)."""
    # Small blocks (one source each, up to a cap): decoding is the cost, so sources spread over every CPU at once.
    dataset = ray.data.from_items(sources, override_num_blocks=max(1, min(len(sources), MAX_INPUT_BLOCKS)))
    dataset = dataset.flat_map(prepare_source, fn_kwargs={"cfg": cfg})
    return dataset.map_batches(
        ENCODERS[cfg.family], fn_constructor_kwargs={"cfg": cfg, "device": device, "config_hash": config_hash,
                                            "fingerprint": fingerprint},
        batch_size=cfg.encode_batch_size, batch_format="pyarrow",
        # All encoders from the start, but the pool may shrink: after a node is lost, the encoders that restart on
        # the surviving nodes must not keep the CPUs the decode tasks feeding them need.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.encode_actors, initial_size=cfg.encode_actors),
        num_cpus=1, num_gpus=cfg.gpus_per_actor if device == "cuda" else 0,
    )


def _index_row(row: dict) -> dict:
    frames = list(row["frame_indices"])
    return {"key": row["key"], "source": row["source"], "clip_index": row["clip_index"], "caption": row["caption"],
            "fps": row["fps"], "start_frame": frames[0], "end_frame": frames[-1], "num_frames": len(frames),
            "motion_bucket": row["motion_bucket"], "motion_score": row["motion_score"],
            "latent_mean": row["latent_mean"], "latent_std": row["latent_std"]}


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run (or resume) preprocessing into `cfg.output`; return the run manifest with its counts.

    A read-only output folder is refused before any work; a filesystem that fills up stops the run with a
    StorageError naming the folder and the free space, with nothing partial under a final name. An unset
    `family` is read from the checkpoint first, so the output folder records the family it holds.
    """
    cfg = cfg.model_copy(update={"family": checkpoint_family(cfg.model, cfg.family)})
    check_writable(cfg.output)
    with storage_errors(cfg.output, "write the run's files in"):
        return _preprocess(cfg)


def _preprocess(cfg: PreprocessConfig) -> dict:
    started = time.perf_counter()
    config_hash, fingerprint = cfg.content_hash(), encoder_fingerprint(cfg.model, cfg.family)
    identity = _identity(cfg, fingerprint)
    claim_output(cfg.output, RUN_MANIFEST, identity)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    commits = read_commits(output)
    removed = discard_uncommitted(output, commits)
    if removed:
        print(f"discarded {len(removed)} uncommitted file(s) of an interrupted run: {', '.join(removed)}")
    fields = _manifest_fields(cfg, config_hash, fingerprint)
    with recording_run(output, RUN_MANIFEST, identity, **fields, started_at=datetime.now(timezone.utc).isoformat()):
        sources, done_now = _write_shards(cfg, config_hash, fingerprint, commits)
        counts = write_tables(output, read_commits(output))
    elapsed, written = time.perf_counter() - started, done_now["clips_written"]
    return write_run_manifest(
        output, RUN_MANIFEST, identity, **fields, status="complete", finished_at=datetime.now(timezone.utc).isoformat(),
        counts={**counts, "sources": sources},
        this_invocation={**done_now, "seconds": round(elapsed, 3),
                         "clips_per_second": round(written / elapsed, 3) if elapsed > 0 else 0.0},
    )


def _write_shards(cfg: PreprocessConfig, config_hash: str, fingerprint: str, commits: list[dict]) -> tuple[int, dict]:
    """Encode the sources no commit record names yet and write their shards; return the corpus's source count and
    what this invocation did (sources processed, clips written, per Ray node)."""
    output = Path(cfg.output)
    sources, manifest_failures = read_sources(cfg.input)
    done = {s for c in commits for s in c["done_sources"]}
    committed_keys = {row["key"] for c in commits for row in c["samples"]}
    recorded = {Failure(**row).identity() for c in commits for row in c["failures"]}
    pending = [s for s in sources if s["source"] not in done]
    writer = ShardSetWriter(output, cfg.shard_max_samples, cfg.shard_max_bytes,
                            first_shard=sum(1 for c in commits if c["shard"]), first_commit=len(commits))
    writer.failures += [f for f in manifest_failures if f.identity() not in recorded]

    written = 0
    per_node: dict[str, dict[str, int]] = {}  # what each Ray node did in this invocation
    ensure_ray(cfg.ray_address)
    device = resolve_device(cfg, ray.cluster_resources().get("GPU", 0))
    if pending:
        check_room(cfg, device)
    with ordered_quiet_data(), tqdm(total=len(pending), unit="video", disable=not cfg.progress,
                                     desc="preprocess") as bar, \
            storage_errors(output, "write shards in", abandon=writer.abandon):
        if pending:
            for row in build_dataset(pending, cfg, config_hash, fingerprint, device).iter_rows():
                if row["stage"]:
                    failure = Failure(row["source"], row["stage"], row["reason_code"], row["reason"],
                                      row["clip_index"])
                    if failure.identity() not in recorded:
                        writer.failures.append(failure)
                elif row["key"] not in committed_keys:
                    entries = {"__key__": row["key"], **{name: row[col] for name, col in ENTRY_COLUMNS.items() if row[col]}}
                    writer.add(entries, _index_row(row))
                    written += 1
                    add_count(per_node, row["encode_node"], "clips_encoded")
                if row["last_of_source"]:
                    add_count(per_node, row["decode_node"], "sources_decoded")
                    writer.done_sources.append(row["source"])
                    bar.update(1)
                    bar.set_postfix(clips=written, failed=len(writer.failures))
        writer.commit()
    return len(sources) + len(manifest_failures), {"sources_processed": len(pending), "clips_written": written,
                                                   "per_node": per_node}


def format_summary(manifest: dict) -> str:
    """A few human lines: what was written, what failed and why, how fast."""
    counts, now = manifest["counts"], manifest["this_invocation"]
    lines = [f"preprocess {manifest['status']}: {counts['samples']} clips in {counts['shards']} shards "
             f"({counts['bytes'] / 1e6:.1f} MB) from {counts['sources']} sources, config {manifest['config_hash']}",
             f"  this run: {now['sources_processed']} sources, {now['clips_written']} clips in {now['seconds']:.1f} s "
             f"({now['clips_per_second']:.2f} clips/s)",
             f"  failed: {counts['failures']}" + "".join(f"\n    {code}: {n}"
                                                         for code, n in counts["failures_by_reason"].items())]
    if len(now.get("per_node", {})) > 1:
        lines.append(f"  nodes: {format_per_node(now['per_node'])}")
    return "\n".join(lines)

"""Streaming cached latent clips from WebDataset shards to one training worker.

Design: each worker reads its own shards with WebDataset's tar reader (no Ray Data in between). Shards are split
by rank after a per-epoch shuffle seeded by (seed, epoch), so the stream of every rank is a pure function of
(shards, rank, world size, seed): resuming at sample N is skipping N raw samples, which makes resume exact (no
clip seen twice or skipped) without a data-loader state to checkpoint. With fewer shards than workers every rank
reads all shards and keeps every world-th sample. Nothing is materialised: samples flow one by one from the tar
stream. A corrupt shard or sample is logged, counted and skipped.
"""

from __future__ import annotations

import glob
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import webdataset as wds

from exvideo.samples import LatentClip, SampleFormatError, decode_sample
from exvideo.storage import is_uri

log = logging.getLogger(__name__)


def list_shards(spec: str) -> list[str]:
    """Shard paths from a directory (all *.tar in it), a glob, or a brace pattern; sorted, never empty."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    elif "{" in spec:
        shards = [s for s in braceexpand.braceexpand(spec)]
        absent = [s for s in shards if not is_uri(s) and not Path(s).is_file()]
        if absent:
            raise FileNotFoundError(f"shards {absent[:3]} ({len(absent)} in all) of pattern {spec} do not exist")
    else:
        shards = sorted(glob.glob(spec))
    if not shards:
        raise FileNotFoundError(f"no shards found at {spec!r}: give a directory of .tar files, a glob or a brace "
                                "pattern")
    return shards


def shards_family(shards: list[str]) -> str | None:
    """The model family the shards' clips were encoded for, from the first readable sample's record (None when no
    sample can be read: the workers then report the shards)."""
    for sample in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 handler=wds.ignore_and_continue, empty_check=False):
        try:
            return decode_sample(sample).record.model_family
        except SampleFormatError:
            continue
    return None


@dataclass
class StreamStats:
    """What a worker's stream skipped, for the run's metrics."""

    bad_shards: list[str] = field(default_factory=list)
    bad_samples: int = 0


def _raw_samples(shards: list[str], stats: StreamStats) -> Iterator[dict]:
    def skip_and_log(exc: Exception) -> bool:
        source = getattr(exc, "args", [""])[-1] if exc.args else ""
        log.warning("skipping unreadable shard data (%s): %s", source, exc)
        stats.bad_shards.append(f"{source}: {exc}"[:300])
        return True

    # Splitting is ours (by rank, below); WebDataset must not split again by node or DataLoader worker.
    yield from wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                              handler=skip_and_log, empty_check=False)


def rank_stream(shards: list[str], rank: int, world: int, seed: int, start: int = 0,
                shuffle_buffer: int = 0, stats: StreamStats | None = None) -> Iterator[LatentClip]:
    """Endless, deterministic stream of this rank's clips, starting after `start` clips already consumed."""
    stats = stats if stats is not None else StreamStats()
    position = 0
    epoch = 0
    while True:
        order = list(shards)
        random.Random(seed * 100_003 + epoch).shuffle(order)
        by_shard = len(order) >= world
        mine = order[rank::world] if by_shard else order
        buffer: list[LatentClip] = []
        shuffler = random.Random(seed * 7919 + epoch * 131 + rank)
        produced = 0
        for index, raw in enumerate(_raw_samples(mine, stats)):
            if not by_shard and index % world != rank:
                continue
            try:
                clip = decode_sample(raw)
            except SampleFormatError as exc:
                log.warning("skipping bad sample: %s", exc)
                stats.bad_samples += 1
                continue
            produced += 1
            if shuffle_buffer:
                buffer.append(clip)
                if len(buffer) < shuffle_buffer:
                    continue
                clip = buffer.pop(shuffler.randrange(len(buffer)))
            if position >= start:
                yield clip
            position += 1
        for clip in shuffler.sample(buffer, len(buffer)):
            if position >= start:
                yield clip
            position += 1
        if produced == 0:
            raise RuntimeError(
                f"rank {rank} read no valid sample from its shards {mine[:3]}... in epoch {epoch}; "
                f"unreadable: {stats.bad_shards[:3]}, bad samples: {stats.bad_samples}"
            )
        epoch += 1

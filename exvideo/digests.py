"""Content digests of what decides a run's output: single files (shards, adapters) and whole folders (a checkpoint).

A folder's digest covers its files' relative paths and bytes, so two copies of a checkpoint digest alike wherever
and whenever they were written, and one rewritten in place does not. A full-size checkpoint holds gigabytes, so
each file's digest is cached under the user's cache folder (`$XDG_CACHE_HOME/exvideo`, by default
`~/.cache/exvideo`), keyed by the file's absolute path, size and modification time, as make and git decide that a
file is unchanged: a file is read again only once it has been rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

# Above this many bytes still to read, a folder's digest shows a progress bar (a full-size checkpoint's first time).
PROGRESS_BYTES = 1 << 30


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_file() -> Path:
    """Where file digests are cached: one JSON file per user, shared by every run."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "exvideo" / "file-digests.json"


def _folder_files(folder: Path) -> list[Path]:
    """The folder's files, recursively, in path order; hidden files and folders (locks, a download tool's own
    metadata) are left out, as they are not part of what the folder holds."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_sha256(folder: str | os.PathLike) -> str:
    """Hex sha256 of every file's relative path and bytes under `folder` (hidden ones left out)."""
    folder = Path(folder).resolve()
    files = _folder_files(folder)
    digests = cached_sha256(files, progress=f"digesting {folder} (once; cached)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder).as_posix()}\0{digests[file]}\n".encode())
    return digest.hexdigest()


def cached_sha256(files: list[Path], progress: str = "digesting files (once; cached)") -> dict[Path, str]:
    """`file_sha256` of each file, read only where the cache has no entry for its path, size and time."""
    cache_path = cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    names = {file: str(Path(file).resolve()) for file in files}
    stats = {file: os.stat(file) for file in files}
    stale = [file for file in files
             if cache.get(names[file], [None])[:2] != [stats[file].st_size, stats[file].st_mtime_ns]]
    _hash_into(cache, stale, names, stats, progress)
    if stale:
        # Entries of files that are gone are dropped, so the cache holds what exists, not every path ever digested.
        current = set(names.values())
        cache = {name: entry for name, entry in cache.items() if name in current or os.path.exists(name)}
        # Commands share the cache: each writes its own temporary file and renames it, so a reader sees one
        # writer's whole file (a concurrent update may be lost, which costs a rereading, never a wrong digest).
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:  # a read-only home: the digests are right, only the next call reads the files again
            with contextlib.suppress(OSError):
                tmp.unlink()
    return {file: cache[names[file]][2] for file in files}


def _hash_into(cache: dict, files: list[Path], names: dict[Path, str], stats: dict[Path, os.stat_result],
               progress: str) -> None:
    total = sum(stats[file].st_size for file in files)
    bar = None
    if total > PROGRESS_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=progress)
    for file in files:
        cache[names[file]] = [stats[file].st_size, stats[file].st_mtime_ns, file_sha256(file)]
        if bar is not None:
            bar.update(stats[file].st_size)
    if bar is not None:
        bar.close()

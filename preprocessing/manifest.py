"""Corpus inputs -> source rows: a manifest (JSON list, JSON Lines, CSV, parquet) or a folder searched for videos.

Paths in a manifest may be absolute, URIs, or relative to the manifest's folder. Every filesystem pyarrow opens
works (local, s3://, gs://, hdfs://, ...). Rows that cannot name a video (no path, a duplicate) come back as
ledger entries, never dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from exvideo.storage import is_uri
from preprocessing.ledger import Failure

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv"})
CAPTION_COLUMNS = ("caption", "cap", "text")


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and in-filesystem path of a local path or URI (relative local paths are resolved)."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _join(base_uri: str, entry: str) -> str:
    if is_uri(entry) or posixpath.isabs(entry):
        return entry
    return posixpath.join(base_uri, entry)


def read_sources(input_uri: str) -> tuple[list[dict], list[Failure]]:
    """Source rows `{source, uri, caption}` in corpus order, and ledger entries for rows naming no usable video.

    `source` is the path as the manifest writes it (relative to a searched folder for folder input); it names
    the video in keys, records and the ledger. `uri` is where workers read it.
    """
    fs, path, info = _open_input(input_uri)
    base = input_uri if is_uri(input_uri) else path
    if info.type == pafs.FileType.Directory:
        return [{"source": name, "uri": posixpath.join(base, name), "caption": ""}
                for name in _folder_videos(fs, path)], []
    table = _read_table(fs, path)
    return _manifest_rows(table, input_uri, posixpath.dirname(base))


def corpus_sha256(input_uri: str) -> str:
    """What decides the corpus's clips, short of reading every video: a manifest's bytes (its rows name the videos;
    a changed video gets a new name or a new manifest), or a folder's video names and sizes (a folder grows, loses
    or replaces videos without any manifest saying so). Sizes, not times: a copied corpus is the same corpus."""
    fs, path, info = _open_input(input_uri)
    digest = hashlib.sha256()
    if info.type == pafs.FileType.Directory:
        for name, size in _folder_videos(fs, path).items():
            digest.update(f"{name}\0{size}\n".encode())
    else:
        with fs.open_input_stream(path) as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _open_input(input_uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = filesystem_and_path(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {input_uri} does not exist; give a manifest file or a folder of videos")
    return fs, path, info


def _folder_videos(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    """Video files under a folder, searched recursively: relative name -> size, in name order."""
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    videos = {f.path[len(path):].lstrip("/"): f.size for f in found
              if f.type == pafs.FileType.File and posixpath.splitext(f.path)[1].lower() in VIDEO_EXTENSIONS}
    return dict(sorted(videos.items()))


def _read_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix == ".parquet":
        return pq.read_table(path, filesystem=fs)
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    if suffix == ".csv":
        return pacsv.read_csv(io.BytesIO(data))
    if suffix == ".jsonl":
        return pajson.read_json(io.BytesIO(data))
    if suffix == ".json":
        try:
            rows = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"manifest {path} is not valid JSON ({exc}); JSON Lines files should end in .jsonl") \
                from None
        if not isinstance(rows, list):
            raise ValueError(f"manifest {path} must hold a JSON list of objects with a 'path', not a "
                             f"{type(rows).__name__}")
        return pa.Table.from_pylist([r if isinstance(r, dict) else {"path": None} for r in rows])
    raise ValueError(f"manifest {path}: unknown format {suffix!r}; use .json, .jsonl, .csv, .parquet or a folder")


def _manifest_rows(table: pa.Table, input_uri: str, base: str) -> tuple[list[dict], list[Failure]]:
    if "path" not in table.column_names:
        raise ValueError(f"manifest {input_uri} has no 'path' column (columns: {table.column_names})")
    caption_column = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
    paths = table.column("path").to_pylist()
    captions = table.column(caption_column).to_pylist() if caption_column else [None] * len(paths)
    rows, failures, first_row = [], [], {}
    for number, (entry, caption) in enumerate(zip(paths, captions)):
        if not isinstance(entry, str) or not entry.strip():
            failures.append(Failure(f"<manifest row {number}>", "manifest", "bad_manifest_row",
                                    f"row {number} of {input_uri} has no usable 'path' (got {entry!r})"))
            continue
        if entry in first_row:
            failures.append(Failure(entry, "manifest", "duplicate",
                                    f"row {number} repeats row {first_row[entry]}; the video is processed once"))
            continue
        first_row[entry] = number
        rows.append({"source": entry, "uri": _join(base, entry), "caption": caption or ""})
    return rows, failures

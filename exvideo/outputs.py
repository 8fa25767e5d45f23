"""Output folders belong to one configuration: a run resumes into its own folder and refuses anyone else's.

A stage records what decides its output's bytes (its identity) in a run manifest in the folder. A rerun with the same
identity resumes there; one with another identity is refused, naming each changed field (`claim_output`). The
manifest also says how the last run ended (`recording_run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from exvideo.console import STAGE_LOG
from exvideo.storage import LOCK


class OutputMismatchError(ValueError):
    """The output folder holds a run made with another config or encoder; the message says what differs."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary name in the same folder, so readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def changed_fields(previous: dict, current: dict) -> list[str]:
    """`field: old -> new` for each key whose value differs between two identities."""
    return [f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
            for k in sorted(set(previous) | set(current)) if previous.get(k) != current.get(k)]


def claim_output(folder: Path, manifest_name: str, identity: dict,
                 remedy: str = "write to a new output folder, or delete this one") -> None:
    """Check that `folder` is new, empty, or holds a run with the same `identity` (what decides its bytes).

    A different identity raises OutputMismatchError listing each changed field and ending with `remedy`: outputs of
    two configurations never mix in one folder.
    """
    folder = Path(folder)
    path = folder / manifest_name
    if not path.is_file():
        # The stage's own log (exvideo.console) and the lock of the command running it may be there: not output.
        if folder.is_dir() and any(entry.name not in (STAGE_LOG, LOCK) for entry in folder.iterdir()):
            raise OutputMismatchError(f"output {folder} is not empty and holds no {manifest_name}; "
                                      "give an empty or new folder")
        return
    changed = changed_fields(json.loads(path.read_text()).get("identity", {}), identity)
    if changed:
        raise OutputMismatchError(f"output {folder} was written by another configuration; changed: "
                                  f"{'; '.join(changed)}. Outputs of different configurations never mix: {remedy}")


def write_run_manifest(folder: Path, manifest_name: str, identity: dict, **fields) -> dict:
    """Write the run manifest (atomically) with its identity and any other fields; return it."""
    manifest = {"identity": identity, **fields}
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(folder) / manifest_name, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


@contextlib.contextmanager
def recording_run(folder: Path, manifest_name: str, identity: dict, **fields) -> Iterator[None]:
    """Write the run manifest as `running` (with this process's pid and host) for the block; if the block raises,
    record how the run ended: `stopped` (Ctrl-C) or `failed`, with the error.

    A killed process records nothing: its manifest stays `running`, naming a pid that no longer runs.
    """
    fields = {**fields, "pid": os.getpid(), "host": socket.gethostname()}
    write_run_manifest(folder, manifest_name, identity, status="running", **fields)
    try:
        yield
    except BaseException as exc:
        ended = {"status": "stopped" if isinstance(exc, KeyboardInterrupt) else "failed",
                 "error": f"{type(exc).__name__}: {exc}", "ended_at": datetime.now(timezone.utc).isoformat()}
        with contextlib.suppress(OSError):  # a full disk may refuse even this; the error raised says what happened
            write_run_manifest(folder, manifest_name, identity, **fields, **ended)
        raise

"""Where data lives (a local path or a URI) and output storage faults as one clear error.

`is_uri` tells a remote location (`s3://...`, `gs://...`, anything pyarrow's filesystems open) from a local path;
`is_missing` and `require_dir` are how a command refuses a local input that is not there before it starts anything.

A command holds each folder it writes for as long as it runs (`hold_folder`): a second command on the same folder (a
scheduler firing twice) is refused rather than both writing the same files. `folder_holder` tells who holds one.

A stage that writes its outputs checks the folder is writable before any work (`check_writable`), and wraps its
writes in `storage_errors`, which turns the operating system's ENOSPC / EROFS / EACCES into a `StorageError` naming
the folder, the free space and what to do. The stages write through temporary names and commit records, so after
the error nothing partial sits under a final name, and rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
LOCK = ".exvideo.lock"  # in a folder a command writes: names the command holding it


def is_uri(location: str) -> bool:
    """Whether `location` is a URI with a scheme (`s3://bucket/x`) rather than a local path."""
    return "://" in location


def is_missing(location: str | os.PathLike) -> bool:
    """Whether a local path names nothing. A URI is never missing here: the stage that reads it opens it remotely."""
    return not is_uri(str(location)) and not Path(location).exists()


def require_dir(path: Path, what: str) -> None:
    """Refuse a missing checkpoint directory, saying what to point at instead."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} directory {path} does not exist; point to a local diffusers-format checkpoint "
            "(nothing is downloaded) or write a tiny one with `exvideo make-tiny-model DIR [--family ...]`"
        )


class StorageError(OSError):
    """The output folder cannot take the stage's writes; the message says why and what to do."""

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` (and parents) and write and delete a probe file in it, or raise StorageError."""
    folder = Path(folder)
    with storage_errors(folder, "create files in"):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, holder: str) -> Iterator[None]:
    """Check `folder` is writable (creating it), then hold it for `holder` (e.g. "exvideo preprocess") while the
    block runs.

    If another process holds it, raise FileExistsError naming that holder, its pid, host and start time. The kernel
    drops the lock with its process, so a killed command never leaves a stale one. A URI is not held: a remote store
    has no such lock.
    """
    if is_uri(str(folder)):
        yield
        return
    check_writable(folder)
    with open(Path(folder) / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FileExistsError(f"{folder} is in use by {handle.read().strip() or 'another command'}; wait for it "
                                  "to end, or give this command another folder") from None
        handle.truncate(0)
        handle.write(f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.now(timezone.utc).isoformat(timespec='seconds')})")
        handle.flush()
        yield


def folder_holder(folder: str | os.PathLike) -> str | None:
    """Who holds `folder` (the text `hold_folder` wrote: command, pid, host, start), or None when no command does.

    Creates nothing. On a free folder the probe holds the lock for an instant, shared, so a command taking the folder
    at that very instant may be refused once and asked to retry; a lock held for minutes is what this is for.
    """
    lock = Path(folder) / LOCK
    if is_uri(str(folder)) or not lock.is_file():
        return None
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another command"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def as_storage_error(exc: OSError, folder: str | os.PathLike, what: str, needed_bytes: int | None = None) -> OSError:
    """`exc` as a StorageError when it is a full or read-only filesystem under `folder`, else `exc` itself.

    `what` says what was being done ("write shards in"), `needed_bytes` how much that write needed, where known.
    """
    folder = Path(folder)
    if isinstance(exc, StorageError):
        return exc
    if exc.errno in FULL:
        need = f"; it needed about {needed_bytes:,} bytes" if needed_bytes else ""
        return StorageError(exc.errno, f"could not {what} {folder}: the filesystem is full "
                                       f"({_free_bytes(folder):,} bytes free{need}). Free space or point the output "
                                       "at a larger disk, then rerun the same command: it resumes from what was "
                                       "committed")
    if exc.errno in NOT_WRITABLE:
        return StorageError(exc.errno, f"could not {what} {folder}: {exc.strerror.lower()} ({exc.filename}). Make "
                                       "the folder writable or choose another output folder")
    return exc


@contextlib.contextmanager
def storage_errors(folder: str | os.PathLike, what: str,
                   abandon: Callable[[], int | None] | None = None) -> Iterator[None]:
    """Raise a full or read-only filesystem met inside the block as a StorageError (see `as_storage_error`).

    On any OSError, `abandon` (if given) first drops the write in progress and returns the bytes it needed.
    """
    try:
        yield
    except OSError as exc:
        needed = abandon() if abandon is not None else None
        converted = as_storage_error(exc, folder, what, needed)
        if converted is exc:
            raise
        raise converted from exc

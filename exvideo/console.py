"""A quiet console: the libraries' informational output goes to a log file, the console keeps what users need.

What stays on the console: the stages' own lines (one per event: a stage starting or done, one line per training
log step), progress bars, warnings and errors, the final summaries. What goes to the stage's log file
(`STAGE_LOG` in its folder) instead: Ray's, Ray Data's, Ray Train's, MLflow's, transformers' and diffusers'
informational lines. `--verbose` keeps them on the console too. In Ray's worker processes the same libraries are
quietened by `worker_environment` and `quiet_worker`, which `exvideo.ray_setup` gives every worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

STAGE_LOG = "stage.log"
WORKFLOW_LOG = "workflow.log"  # in a workflow's workdir: its own lines and every stage's
VERBOSE_ENV = "EXVIDEO_VERBOSE"
# Logger -> the least level still shown on the console. transformers and diffusers warn about fallbacks that work
# (a missing optional backend, a slow tokenizer) and about nothing a user must act on, so only their errors show.
CONSOLE_LEVELS = {
    "ray": logging.WARNING, "ray.data": logging.WARNING, "ray.train": logging.WARNING, "ray.tune": logging.WARNING,
    "mlflow": logging.WARNING, "alembic": logging.WARNING,
    "transformers": logging.ERROR, "diffusers": logging.ERROR,
}
# The libraries whose loggers get console handlers of their own when they are imported.
LIBRARIES = ("ray.data", "mlflow", "transformers", "diffusers")


def verbose() -> bool:
    """Whether the libraries' informational output should reach the console (`--verbose` sets it)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _reaches_a_listed_ancestor(logger: logging.Logger) -> bool:
    """Whether the logger's records already propagate to another logger of CONSOLE_LEVELS (ray.train to ray)."""
    node = logger
    while node.propagate and node.parent is not None:
        node = node.parent
        if node.name in CONSOLE_LEVELS:
            return True
    return False


@contextlib.contextmanager
def stage_log(folder: Path | None, name: str = STAGE_LOG, libraries: tuple[str, ...] = LIBRARIES) -> Iterator[None]:
    """Inside the block, the libraries' records go to `folder/name` (nowhere with no folder); their consoles show
    warnings and errors only (everything, with `--verbose`). Levels and handlers are restored after the block. A
    block that raises ends the file with the error and its traceback (one line for Ctrl-C).

    `libraries` are imported first (see `_create_library_handlers`): a command that uses fewer of them (submitting a
    job uses Ray alone) names those, and saves the seconds the model libraries take to import.
    """
    _create_library_handlers(libraries)
    handler = None
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(folder) / name, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for logger_name, console_level in CONSOLE_LEVELS.items():
        logger = logging.getLogger(logger_name)
        saved.append((logger, logger.level, [(h, h.level) for h in _console_handlers(logger)]))
        if handler is not None:
            if not _reaches_a_listed_ancestor(logger):  # else each record would be written twice
                logger.addHandler(handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        if not verbose():
            # A library without console handlers of its own reaches the console through Python's last resort,
            # which shows warnings and errors only.
            for console in _console_handlers(logger):
                console.setLevel(max(console.level, console_level))
    try:
        yield
    except BaseException as exc:
        if handler is not None:  # the console shows the error; the log file must say why the stage ended too
            # Written, not emitted: logging would print its own traceback on the console where a full disk refuses it.
            with contextlib.suppress(OSError), handler.lock:
                handler.stream.write(handler.format(_ending_record(exc)) + handler.terminator)
                handler.flush()
        raise
    finally:
        for logger, level, consoles in saved:
            if handler is not None:
                logger.removeHandler(handler)
            logger.setLevel(level)
            for console, console_level in consoles:
                console.setLevel(console_level)
        if handler is not None:
            with contextlib.suppress(OSError):  # a full disk refuses the buffered lines; the block's own error stays
                handler.close()


def _ending_record(exc: BaseException) -> logging.LogRecord:
    """The log record of a block ended by `exc`: one line for Ctrl-C, the error with its traceback otherwise."""
    record = {"name": "exvideo", "levelno": logging.ERROR, "levelname": "ERROR"}
    if isinstance(exc, KeyboardInterrupt):
        return logging.makeLogRecord({**record, "msg": "stopped by Ctrl-C (KeyboardInterrupt)"})
    return logging.makeLogRecord({**record, "msg": f"failed: {type(exc).__name__}: {exc}",
                                  "exc_info": (type(exc), exc, exc.__traceback__)})


def _create_library_handlers(libraries: tuple[str, ...]) -> None:
    """Import `libraries`, whose loggers get console handlers of their own on import, so those handlers exist when
    `stage_log` sets their levels; quietens the libraries' own progress bars unless verbose."""
    for library in libraries:
        importlib.import_module(library)
    if "transformers" in libraries:
        import transformers

        transformers.logging.get_logger()  # its console handler is made on the first call
        if not verbose():
            transformers.logging.disable_progress_bar()
    if "diffusers" in libraries and not verbose():
        import diffusers

        diffusers.utils.logging.disable_progress_bar()


def worker_environment() -> dict[str, str]:
    """Environment variables for Ray's worker processes: transformers and diffusers read their verbosity, and
    Hugging Face its progress bars, from the environment when they are first imported, so a worker that never
    imports them pays nothing."""
    if verbose():
        return {VERBOSE_ENV: "1"}
    return {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_worker() -> None:
    """In a Ray worker process: Ray's libraries show warnings and errors only (logging levels: no imports).

    So does every logger that defers to the root logger: Ray Train names some of its loggers by file path, outside
    `ray.train` ("Reporting training result ..." at every report), and sets the root logger to INFO in its workers.
    """
    for name, level in CONSOLE_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().setLevel(logging.WARNING)


def set_up_worker() -> None:
    """Ray's worker set-up hook for every worker of our jobs.

    Pins `RAY_ADDRESS` to the worker's own cluster: Ray Train's placement-group cleaner looks its actors up through
    the state API without an address, which fails with "multiple active Ray instances" whenever another Ray runs on
    the same machine. Then quietens the libraries (`quiet_worker`) unless verbose.
    """
    import ray  # already loaded: this runs inside a Ray worker

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    if not verbose():
        quiet_worker()

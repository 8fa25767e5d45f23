"""Ray start-up for every stage, and Ray Data run in input order with our own progress display.

One rule decides which Ray a stage uses, so no stage attaches to a cluster by accident:
1. a Ray already initialised in this process (a workflow, a test session, the user's own `ray.init`);
2. else the cluster at `address` (`auto`, `ray://host:10001`, `host:6379`);
3. else the cluster named by `RAY_ADDRESS`, which the Ray Jobs API sets for the drivers it starts;
4. else a new local Ray owned by this process. Ray's own default would attach to whatever cluster the address file
   in its temp folder names, and a `ray start` killed long ago leaves that file behind, pointing at a dead GCS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator

from exvideo.console import worker_environment

# Ray is imported where it is used: the CLI checks a cluster address (`require_reachable`) before any library loads.


def ray_target(address: str | None) -> str:
    """The address `ensure_ray` hands to `ray.init`: `address`, else `RAY_ADDRESS`, else "local" (a new Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def require_reachable(target: str, timeout_s: float = 10.0) -> None:
    """Refuse a cluster address (`host:port`, `ray://host:port`) that nothing listens on, naming it: Ray itself
    retries an unreachable GCS silently for many minutes. "local" and "auto" are left to Ray."""
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if target in ("local", "auto") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {target} ({exc}); set ray_address to the head's GCS "
                              "address (HEAD:6379, `ray status` on the head shows it) or ray://HEAD:10001, or leave it "
                              "unset to start a local Ray") from None


def plain_worker_lines() -> None:
    """Where this process's output is a file or a pipe (a job's log), the workers' lines Ray prints there carry no
    colour codes: no coloured prefix, and no deduplication, whose "[repeated Nx across cluster]" summary Ray colours
    whatever RAY_COLOR_PREFIX says (a log file gets each worker's line instead). Ray reads RAY_DEDUP_LOGS when it
    is imported: a command calls this first."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray already initialised in this process, else connect or start one as the module docstring says.

    Ray's informational lines go through Python logging (`exvideo.console.stage_log` files them), and the workers'
    output reaches this console after `exvideo.console.set_up_worker` has quietened the libraries in each worker.
    """
    import ray

    if ray.is_initialized():
        return
    target = ray_target(address)
    require_reachable(target)
    # The hook lives in exvideo.console, which imports nothing: every Ray worker process runs it on start.
    runtime_env = {"worker_process_setup_hook": "exvideo.console.set_up_worker", "env_vars": worker_environment()}
    # configure_logging=False: Ray's records go through Python logging. It also drops the "ray" logger's handlers
    # (the console's and `stage_log`'s file), after which Ray's warnings would print bare and its other records
    # vanish, so they are put back.
    ray_logger = logging.getLogger("ray")
    handlers = list(ray_logger.handlers)
    plain_worker_lines()
    if target == "local":
        # A Ray on this machine alone has no cloud to announce a preemption: Ray Train's watcher would cost an actor
        # per run and print a restart warning about it as an error (ray#53727). Its controller reads this variable
        # from the driver's environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard serves the state API, which Ray Train's placement-group cleaner polls every second until it
    # sees the training controller gone: without it the detached cleaner never learns and polls forever, one more
    # busy actor per training run.
    ray.init(address=target, include_dashboard=True if target == "local" else None, runtime_env=runtime_env,
             configure_logging=False)
    for handler in handlers:
        if handler not in ray_logger.handlers:
            ray_logger.addHandler(handler)


def check_capacity(needed: dict[str, float], asked: str, what: str, address: str | None) -> None:
    """Refuse, on a local Ray, resources (`{"CPU": 3, "GPU": 0}`) it can never hold; on a cluster (which may grow),
    say what the start waits for. `asked` names the settings behind `needed`, `what` the stage.

    Ray waits without a word for room for every actor and worker: right on a cluster that grows (an autoscaler, a
    replaced node), a hang on a local Ray of fixed size.
    """
    import ray

    available = ray.cluster_resources()
    short = ", ".join(f"{amount:g} {kind} (the cluster has {available.get(kind, 0):g})"
                      for kind, amount in needed.items() if amount > available.get(kind, 0))
    if not short:
        return
    if ray_target(address) == "local":
        raise ValueError(f"{what} needs {short} for {asked}, more than this machine's Ray will ever have: lower "
                         "them, or set ray_address to a larger cluster")
    print(f"waiting for room: {what} needs {short} for {asked}; it starts once nodes join", flush=True)


@contextlib.contextmanager
def ordered_quiet_data(preserve_order: bool = True) -> Iterator[None]:
    """Ray Data keeps input order (shard layout depends on it) and leaves the progress display to our tqdm."""
    from ray.data import DataContext

    context = DataContext.get_current()
    # Ray Data's bars are off on purpose (our tqdm shows the stage's progress): its warning saying so is not news.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order, context.enable_progress_bars = preserve_order, False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def node_id() -> str:
    """The Ray node this code runs on (hex id), or "" outside Ray: what per-node counts are keyed by."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def add_count(per_node: dict[str, dict[str, int]], node: str, name: str, amount: int = 1) -> None:
    """Add `amount` to the count `name` of `node` in a `{node: {name: count}}` table."""
    counts = per_node.setdefault(node, {})
    counts[name] = counts.get(name, 0) + amount


def format_per_node(per_node: dict[str, dict[str, int]]) -> str:
    """One line for a `{node: {name: count}}` table, nodes by the first 8 characters of their id."""
    def counts_text(counts: dict[str, int]) -> str:
        return ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())

    return "; ".join(f"{node[:8] or 'driver'} {counts_text(counts)}" for node, counts in sorted(per_node.items()))

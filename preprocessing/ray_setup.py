"""Ray set-up shared by the preprocessing commands: connect or start Ray, and run Ray Data quietly in order."""

from __future__ import annotations

import contextlib

import ray
from ray.data import DataContext


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray already initialised in this process, else connect to `address` (none: start a local Ray)."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)


@contextlib.contextmanager
def ordered_quiet_data(preserve_order: bool = True):
    """Ray Data keeps input order (shard layout depends on it) and leaves the progress display to our tqdm."""
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order, context.enable_progress_bars = preserve_order, False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved

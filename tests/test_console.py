"""The quiet console: the libraries' informational records go to the stage's log file, their warnings (and the
model libraries' errors) stay on the console, and `--verbose` shows everything. Run in fresh processes, so the
libraries' own console handlers are the real ones and Ray starts here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exvideo.console import stage_log

ROOT = Path(__file__).resolve().parents[1]

# Each library's logger says one informational thing and one thing a user must see, inside `stage_log`, after
# `ensure_ray` started a local Ray (which drops the "ray" logger's handlers) when the first argument says so.
PROBE = """
import logging, sys, time
from pathlib import Path
from exvideo.ray_setup import plain_worker_lines
plain_worker_lines()  # as the exvideo command does first
from exvideo.console import stage_log
with stage_log(Path(sys.argv[1])):
    if sys.argv[2] == "ray":
        import ray
        from exvideo.ray_setup import ensure_ray
        ensure_ray()
        # Four workers' alike line, which Ray would otherwise summarise as "[repeated 3x across cluster]" in colour.
        ray.get([ray.remote(lambda: print("a worker's line")).remote() for _ in range(4)])
        time.sleep(3)  # the workers' lines reach the driver through Ray's log monitor
    for name, loud in (("ray.train", logging.WARNING), ("mlflow", logging.WARNING), ("transformers", logging.ERROR)):
        logging.getLogger(name).info(f"{name} note")
        logging.getLogger(name).log(loud, f"{name} alarm")
print("stage output")
"""


def probe(folder: Path, ray: bool, verbose: bool) -> str:
    env = {**os.environ, "EXVIDEO_VERBOSE": "1" if verbose else ""}
    done = subprocess.run([sys.executable, "-c", PROBE, str(folder), "ray" if ray else "no-ray"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return done.stdout + done.stderr


def test_informational_records_go_to_the_stage_log_and_alarms_stay_on_the_console(tmp_path):
    console = probe(tmp_path / "quiet", ray=True, verbose=False)
    assert "stage output" in console
    for name in ("ray.train", "mlflow", "transformers"):
        assert f"{name} alarm" in console and f"{name} note" not in console, console
    filed = (tmp_path / "quiet" / "stage.log").read_text()
    for name in ("ray.train", "mlflow", "transformers"):
        assert f"INFO {name}: {name} note" in filed and f" {name}: {name} alarm" in filed, filed
    assert filed.count("ray.train alarm") == 1  # once, although the handler was put back after Ray started
    # The console is a pipe here, as a job's log is a file: every worker's line, and no colour codes.
    assert console.count("a worker's line") == 4 and "\x1b[" not in console, console

    console = probe(tmp_path / "verbose", ray=False, verbose=True)
    for name in ("ray.train", "mlflow", "transformers"):
        assert f"{name} note" in console and f"{name} alarm" in console, console
    assert "ray.train note" in (tmp_path / "verbose" / "stage.log").read_text()


def test_a_block_that_raises_ends_its_log_with_why(tmp_path):
    with pytest.raises(ValueError), stage_log(tmp_path / "failed", libraries=()):
        raise ValueError("the disk is on fire")
    filed = (tmp_path / "failed" / "stage.log").read_text()
    assert re.search(r"^\S+ \S+ ERROR exvideo: failed: ValueError: the disk is on fire\nTraceback ", filed, re.M), filed
    assert filed.rstrip().endswith("ValueError: the disk is on fire")
    with pytest.raises(KeyboardInterrupt), stage_log(tmp_path / "stopped", libraries=()):
        raise KeyboardInterrupt
    filed = (tmp_path / "stopped" / "stage.log").read_text()
    assert filed.endswith("ERROR exvideo: stopped by Ctrl-C (KeyboardInterrupt)\n") and filed.count("\n") == 1

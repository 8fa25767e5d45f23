"""Shared fixtures: tiny real models of the SVD classes and copies of the reference data (docs/method.md, section 5)."""

from __future__ import annotations

import os

# One OpenMP thread in this process and in every process it starts (Ray's nodes and workers, `exvideo` commands),
# set before torch loads: the tests' tiny models gain nothing from more, and on a 2-core machine the extra threads
# mostly spin waiting for each other (3-4x the CPU time of an eager tiny-model module; a tiny training step of two
# 2-CPU workers took 6 s with two threads each, 0.4 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile's CPU kernels in scalar C++ rather than SIMD: the tests check what inductor compiles and that it
# computes what eager does, never how fast a CPU kernel runs, and g++ builds scalar kernels faster. On a new
# machine (an empty inductor cache, as CI has) test_speed took 151 core-s with SIMD and 120 without; with a warm
# cache the two are alike.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import signal
import subprocess
import sys
import time
import urllib.request

import copy
from pathlib import Path

import pytest
import torch

from exvideo import tiny_svd_components, write_tiny_svd
from exvideo.local_cluster import free_port

REFERENCE = Path(__file__).parent / "data" / "reference"

# Ray Train's controller polls its workers every 2 s by default, where a tiny run takes less; and it starts an
# actor per run watching for cloud preemption, which no test machine has. Ray Train hands both on to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def tiny_svd_dir(tmp_path_factory) -> Path:
    """A tiny random SVD checkpoint written in diffusers format, shared by the whole session (read-only)."""
    return write_tiny_svd(tmp_path_factory.mktemp("models") / "tiny-svd")


@pytest.fixture(scope="session")
def tiny_animatediff_dir(tmp_path_factory) -> Path:
    """A tiny random AnimateDiff checkpoint written in diffusers format, shared by the whole session (read-only)."""
    from exvideo.motion_models import write_tiny_animatediff

    return write_tiny_animatediff(tmp_path_factory.mktemp("models") / "tiny-animatediff")


@pytest.fixture
def tiny_unet():
    """A fresh tiny base UNet (SVD topology) for tests that modify it."""
    return copy.deepcopy(_tiny_unet_template())


_TEMPLATE = {}


def _tiny_unet_template():
    if "unet" not in _TEMPLATE:
        _TEMPLATE["unet"] = tiny_svd_components(seed=0).unet
    return _TEMPLATE["unet"]


def benchmark(name: str):
    """A module of benchmarks/ (the scripts import one another by bare name, so their folder goes on the path)."""
    import importlib

    folder = str(Path(__file__).parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def float64_backward(options, checkpointing: bool, inputs: dict) -> tuple[dict, torch.Tensor]:
    """The tiny UNet prepared for post-tuning with speed `options`, in float64, its trainable weights moved off the
    identity initialisation; runs `inputs` forward and a fixed random weighting of the output backward.

    Returns the trainable set (gradients filled) and the output.
    """
    from exvideo import prepare_for_post_tuning

    unet = copy.deepcopy(_tiny_unet_template())
    trainable = prepare_for_post_tuning(unet, 32, "fp32", checkpointing, "cpu", options)
    unet.double()
    with torch.no_grad():
        for param in trainable.values():
            param.add_(0.01 * torch.randn(param.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    output = unet(**{k: v.double() for k, v in inputs.items()}, return_dict=False)[0]
    weights = torch.randn(output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (output * weights).sum().backward()
    return trainable, output.detach()


def unet_inputs(num_frames: int, batch: int = 1, size: int = 8, seed: int = 0) -> dict:
    """Random UNet inputs for the tiny config: 8 input channels, 32-d image embedding, 3 added time ids."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, num_frames, 8, size, size, generator=g),
        "timestep": torch.tensor([0.25] * batch),
        "encoder_hidden_states": torch.randn(batch, 1, 32, generator=g),
        "added_time_ids": torch.tensor([[29.0, 127.0, 0.02]] * batch),
    }


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> Path:
    """Manifest (JSON list) of the synthetic corpus: real ffmpeg-written mp4s plus the deliberately broken files."""
    from preprocessing.synthetic import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray (2 CPUs) for the whole session (per xdist worker); tests that need Ray ask for it."""
    import ray

    started = not ray.is_initialized()
    if started:
        # "local": a Ray of this session's own, whatever other Ray runs on the machine (another session, a head).
        # The dashboard serves the state API Ray Train's placement-group cleaner needs (exvideo.ray_setup).
        ray.init(address="local", num_cpus=2, include_dashboard=True)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact folder: (uri, root)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", (root / "art").as_uri()],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        # The background job executor (for GenAI jobs) is not used here and triples the start-up time.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri, root
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # open keep-alive connections can hold a graceful shutdown
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# The suite runs on two pytest-xdist workers, a module at a time each, handed out in collection order (pyproject:
# -n 2 --dist loadfile --no-loadscope-reorder; xdist's own order, most tests first, started the 4-test cluster
# module last, alone for its last 3 minutes). These modules take longest (whole stages on Ray, a three-node
# cluster), so they go first: the workers then end on short modules and finish together.
LONGEST_FIRST = ("test_cluster", "test_miniature_experiment", "test_train", "test_speed", "test_workflow",
                 "test_animatediff_stages", "test_preprocess_pipeline", "test_train_memory_mode")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.stem
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order

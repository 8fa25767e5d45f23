"""A real multi-node Ray cluster on one machine: a head and worker nodes, each its own `ray start --block`.

Every node has its own raylet and object store, like the nodes of a real cluster, so work spreads over them and a
node can be lost (its process group killed) while the others go on. Each node runs in its own process group and
is stopped through it: `ray stop` would end every Ray on the machine, other sessions' included. Worker nodes carry
a custom resource named after them (`node-a`: 1), so placement can be asserted and forced.

Used by the tests and by `benchmarks/corpus_scale.py`; an operator can use it to try a spec against a cluster:

    with LocalCluster(root, workers=("a", "b")) as cluster:
        subprocess.run(["exvideo", "run", "spec.yaml", "--set", f"ray_address={cluster.address}"],
                       env=cluster.client_env())
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_resource(name: str) -> str:
    """The custom resource a worker node named `name` carries (one unit)."""
    return f"node-{name}"


@dataclass
class Node:
    """One `ray start --block` process (its process group is the node)."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """A head (no CPUs of its own unless `head_cpus`: drivers and Ray's services only) and named worker nodes.

    Token authentication is on, as `ray start` has it by default: `client_env()` is the environment a driver or
    `exvideo` command needs to reach the cluster.
    """

    def __init__(self, root: Path, workers: tuple[str, ...] = ("a", "b"), cpus_per_worker: int = 1,
                 head_cpus: int = 0, object_store_mb: int = 200, start_timeout_s: float = 240,
                 env: dict[str, str] | None = None):
        self.root = Path(root)
        # Every node starts with it, so Ray workers and the drivers the Jobs API starts on the head see it too.
        self.env = dict(env or {})
        self.worker_names = workers
        self.cpus_per_worker = cpus_per_worker
        self.head_cpus = head_cpus
        self.object_store_bytes = object_store_mb * 2**20
        self.start_timeout_s = start_timeout_s
        self.token = secrets.token_hex(32)
        self.port, self.dashboard_port = free_port(), free_port()
        # Ray's socket paths must fit in 107 bytes: a short temp folder, not one under the test's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.nodes: dict[str, Node] = {}
        self._starts: dict[str, int] = {}  # worker node name -> how many times it was started

    @property
    def address(self) -> str:
        """The GCS address drivers pass as `ray_address`."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's URL: the Jobs API endpoint (`exvideo run --address`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """The process environment a client of this cluster needs: its token, the cluster's own `env`, and no other
        cluster's address."""
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        return env

    def _ray_start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        log = self.root / f"node-{name}.log"
        self.root.mkdir(parents=True, exist_ok=True)
        # The node's own ports bound by the processes that listen on them (0: the system picks a free one as they
        # bind). `ray start`'s one fixed default, the dashboard agent's 52365, would clash between nodes on one
        # machine; and a port picked here, free now, can be taken before the agent binds it (by an outgoing
        # connection's local port: they come from the same range), and a raylet fate-shares with its agents: a
        # restarted node that registered, then died a second later, left the next test without it.
        ports = ["--dashboard-agent-listen-port=0"]
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                 f"--object-store-memory={self.object_store_bytes}", *ports, *args],
                env={**self.client_env(), **(env or {})}, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, log)
        self.nodes[name] = node
        return node

    def start(self) -> LocalCluster:
        """Start the head, then every worker node; return once all of them have registered."""
        self._ray_start("head", ["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                                 f"--ray-client-server-port={free_port()}"],
                        # A lost node is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s).
                        env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
        self._wait(lambda: self._jobs_api_up(), "the head's Jobs API")
        for name in self.worker_names:
            self.add_worker(name)
        return self

    def add_worker(self, name: str) -> None:
        """Start (or restart) the worker node `name` and wait until the cluster counts it."""
        # A temp folder of its own: nodes sharing one would each stream every node's worker logs to the drivers.
        # A fresh one on every start, as a replacement machine has: a node joins the head's session, so a
        # restarted node given the lost one's folder would find its logs, and its log monitor would stream the
        # dead workers' lines to the running drivers again from the start (a training step log of 1, 2, 3, 4
        # then 1, 2, ... though the restarted ranks resumed from their checkpoint).
        self._starts[name] = self._starts.get(name, 0) + 1
        folder = name if self._starts[name] == 1 else f"{name}.{self._starts[name]}"
        # The node as this start registers it: a lost node still counts alive until the head has missed its health
        # checks, and a new start gets a new node id.
        before = set(self.node_ids().get(name, [])) if self._starts[name] > 1 else set()
        self._ray_start(name, [f"--address={self.address}", f"--num-cpus={self.cpus_per_worker}",
                               f"--temp-dir={self.temp_dir / folder}",
                               f'--resources={{"{node_resource(name)}": 1}}'])
        self._wait(lambda: set(self.node_ids(alive_only=True)[name]) - before, f"worker node {name}")

    def kill_worker(self, name: str) -> None:
        """Lose worker node `name` at once: SIGKILL to its raylet, object store and workers (its process group)."""
        node = self.nodes[name]
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def alive_workers(self) -> set[str]:
        """Names of the worker nodes the cluster counts alive (the state API on the head's dashboard)."""
        return {name for name, ids in self.node_ids(alive_only=True).items() if ids}

    def node_ids(self, alive_only: bool = False) -> dict[str, list[str]]:
        """Worker node name -> the Ray node ids it has had (a restarted node gets a new id), oldest first."""
        nodes = self._state("nodes")
        return {name: [node["node_id"] for node in nodes if node_resource(name) in node["resources_total"]
                       and (node["state"] == "ALIVE" or not alive_only)] for name in self.worker_names}

    def actors_per_worker(self, name_contains: str) -> dict[str, int]:
        """Worker node name -> how many actors whose name contains `name_contains` it has hosted (dead ones too)."""
        names = {node: name for name, ids in self.node_ids().items() for node in ids}
        counts: dict[str, int] = {}
        for actor in self._actors_named(name_contains):
            if actor.get("node_id") in names:
                counts[names[actor["node_id"]]] = counts.get(names[actor["node_id"]], 0) + 1
        return counts

    def alive_actors(self, name_contains: str) -> int:
        """How many actors whose name contains `name_contains` are alive anywhere in the cluster, head included."""
        return sum(1 for actor in self._actors_named(name_contains) if actor["state"] != "DEAD")

    def _actors_named(self, name_contains: str) -> list[dict]:
        return [actor for actor in self._state("actors")
                if name_contains in (actor.get("repr_name") or actor["class_name"])]

    def _state(self, kind: str) -> list[dict]:
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{kind}?limit=10000&detail=1",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())["data"]["result"]["result"]
        except OSError:
            return []

    def _jobs_api_up(self) -> bool:
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            dead = [node for node in self.nodes.values() if not node.alive]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}:\n{n.log.read_bytes()[-1500:].decode(errors='replace')}"
                                 for n in (dead or self.nodes.values()))
                self.stop()
                raise RuntimeError(f"{what} did not come up within {self.start_timeout_s:.0f} s "
                                   f"(stopped nodes: {[n.name for n in dead]}):\n{logs}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 2) -> None:
        """Stop every node through its process group (workers first), then remove the cluster's temp folder.

        The nodes share one `grace_s` to exit on SIGTERM; whatever is left then gets SIGKILL. A throwaway cluster
        has nothing to flush, and a raylet draining its workers one after another took 20 s here.
        """
        for node in sorted(self.nodes.values(), key=lambda n: n.name == "head"):
            if node.alive:
                os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in self.nodes.values():
            try:
                node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # The whole group: a `ray start --block` that has exited can leave its raylet's children behind.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

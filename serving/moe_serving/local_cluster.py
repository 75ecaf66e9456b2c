"""A multi-node Ray cluster on one machine, each node shaped like a real node of a kind.

One Ray head plus N worker nodes, each a separate `ray start` with its own node IP on the
loopback range (127.0.0.2, 127.0.0.3, ...), each declaring to Ray what a real node declares:
CPUs, memory, `num_gpus`, and the `accelerator_type:<name>` resource exactly as Ray's GPU
autodetection names it (`moe_operator.catalog.Accelerator.ray_accelerator_type`). GPUs are
declared, not present: Ray's scheduler and Serve's placement run for real against them, which is
what placement tests need; engines on such a cluster run on the CPU.

Used by `moectl up --nodes N` (a multi-node replica on a laptop) and by the multi-node tests.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NodeShape:
    """What one Ray node declares."""

    num_cpus: float = 1
    num_gpus: int = 0
    accelerator_type: str | None = None  # Ray's name, e.g. "A100"
    memory_bytes: int | None = None
    object_store_bytes: int = 80 * 2**20  # small: ~75 MiB is Ray's minimum
    resources: dict[str, float] = field(default_factory=dict)

    def ray_start_args(self) -> list[str]:
        resources = dict(self.resources)
        if self.accelerator_type:
            # What ray/_private/accelerators/nvidia_gpu.py's autodetection adds to a GPU node.
            resources[f"accelerator_type:{self.accelerator_type}"] = 1
        args = [
            f"--num-cpus={self.num_cpus:g}",
            f"--num-gpus={self.num_gpus}",
            f"--object-store-memory={self.object_store_bytes}",
        ]
        if self.memory_bytes is not None:
            args.append(f"--memory={self.memory_bytes}")
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return args


@dataclass
class LocalNode:
    """One started worker node."""

    index: int
    ip: str
    shape: NodeShape
    pids: list[int] = field(default_factory=list)  # its Ray processes (for node-loss tests)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


class LocalCluster:
    """Start/stop a head and worker nodes; kill and restart a worker node (SIGKILL)."""

    def __init__(
        self,
        workers: list[NodeShape],
        head: NodeShape | None = None,
        *,
        temp_dir: str | None = None,
        dashboard: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.head_shape = head or NodeShape(num_cpus=1)
        self.worker_shapes = list(workers)
        self.port = _free_port()
        self.dashboard_port = _free_port() if dashboard else None
        self.dashboard = dashboard
        self.temp_dir = temp_dir
        # Token auth on every node and for this process's driver: the cluster is not open to
        # other local users, and a ~/.ray/auth_token left by another cluster cannot make the
        # nodes disagree about auth (a worker then fails to join with InvalidAuthToken).
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _process_token()}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth, **(env or {})}
        self.nodes: list[LocalNode] = []
        self._saved_env: dict[str, str | None] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a client of the dashboard's REST API presents."""
        return {"Authorization": f"Bearer {self.auth['RAY_AUTH_TOKEN']}"}

    @property
    def dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.dashboard_port else None

    def _ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_ray_bin(), *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )

    def start(self) -> LocalCluster:
        # The driver (ray.init in this process) must present the same token, in token mode.
        self._saved_env = {key: os.environ.get(key) for key in self.auth}
        os.environ.update(self.auth)
        _refresh_ray_auth()
        args = [
            "start",
            "--head",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            *self.head_shape.ray_start_args(),
        ]
        if self.dashboard:
            args += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            args.append("--include-dashboard=false")
        if self.temp_dir:
            args.append(f"--temp-dir={self.temp_dir}")
        done = self._ray(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ray start --head failed: {done.stderr[-2000:]}")
        for index, shape in enumerate(self.worker_shapes):
            self.nodes.append(self._start_worker(index, shape))
        return self

    def _start_worker(self, index: int, shape: NodeShape, attempts: int = 3) -> LocalNode:
        ip = f"127.0.0.{index + 2}"
        for attempt in range(1, attempts + 1):
            before = _ray_pids()
            done = self._ray(
                "start",
                f"--address={self.address}",
                f"--node-ip-address={ip}",
                "--disable-usage-stats",
                # Each node's own agent ports (defaults would clash on one machine).
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                *shape.ray_start_args(),
            )
            if done.returncode == 0:
                return LocalNode(index, ip, shape, pids=sorted(_ray_pids() - before))
            # On a busy machine a raylet can miss `ray start`'s registration deadline ("timed
            # out during startup"): clear what it left and start the node again.
            if "timed out during startup" not in done.stderr or attempt == attempts:
                break
            for pid in sorted(_descendants(_ray_pids() - before)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"ray start of node {ip} failed: {done.stderr[-2000:]}")

    def wait_for_nodes(self, timeout_s: float = 120) -> list[dict[str, Any]]:
        """Block until the head and every worker are alive in Ray's view (needs ray.init)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= 1 + len(self.nodes):
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {1 + len(self.nodes)} Ray nodes alive")
            time.sleep(0.5)

    def kill_node(self, index: int) -> None:
        """SIGKILL every Ray process of worker `index` (a node lost, as a dead machine would)."""
        node = self.nodes[index]
        # The node's daemons and everything they started (its workers, their vLLM processes).
        doomed = _descendants(set(node.pids))
        for pid in sorted(doomed):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart_node(self, index: int) -> LocalNode:
        node = self.nodes[index]
        self.nodes[index] = self._start_worker(index, node.shape)
        return self.nodes[index]

    def stop(self) -> None:
        try:
            self._ray("stop", "--force", timeout=120)
        finally:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = {}
            # Back to what this process had, so a later local cluster (ray.init) finds its
            # own token, not ours.
            _refresh_ray_auth()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TOKEN: list[str] = []


def _process_token() -> str:
    """One token for every local cluster this process starts (Ray caches the token a driver
    presents; one value keeps successive clusters of one process, e.g. a test session, apart
    from that cache)."""
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(16))
    return _TOKEN[0]


def _refresh_ray_auth() -> None:
    """Make this process's Ray driver re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN: Ray caches both
    (its config when imported, its token on first use) and ray.init(address=...) never turns
    token mode on by itself (ray/_private/worker.py). The same two calls Ray's own
    `reset_auth_token_state` makes (ray/_private/authentication_test_utils.py): config first,
    then the token cache."""
    from ray._raylet import (  # type: ignore[attr-defined]  # compiled; no stubs
        AuthenticationTokenLoader,
        Config,
    )

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_pids() -> set[int]:
    """PIDs of this machine's Ray node processes (raylet, agents, ...), from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"raylet" in cmd or b"dashboard/agent.py" in cmd or b"runtime_env/agent" in cmd:
            pids.add(int(entry.name))
    return pids


def _descendants(roots: set[int]) -> set[int]:
    """`roots` and every process below them (from /proc/<pid>/stat's parent field)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found

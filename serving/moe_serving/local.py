"""Run the serving application on this machine: a local Ray cluster, Ray Serve, the app.

`serve_options` is the single definition of the proxies' HTTP/gRPC options, shared by local runs
and the operator's rendered `serveConfigV2`, so both expose the same ports and gRPC servicer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from moe_serving.config import GRPC_SERVICER_FUNCTIONS, AppConfig

GRPC_SERVICE = "moe.inference.v1.InferenceService"


def serve_options(
    http_port: int = 8000,
    grpc_port: int = 9000,
    *,
    host: str = "0.0.0.0",
    request_timeout_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """`{"http_options": ..., "grpc_options": ...}` for `serve.start` and for serveConfigV2.

    The HTTP proxy serves the OpenAI API; the gRPC proxy serves `inference.proto`'s service.
    `request_timeout_s` (None = no proxy timeout) is a proxy-level backstop; the app enforces
    its own per-request deadline (`AppConfig.request_timeout_s`).
    """
    http: dict[str, Any] = {"host": host, "port": http_port}
    grpc: dict[str, Any] = {
        "port": grpc_port,
        "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
    }
    if request_timeout_s is not None:
        http["request_timeout_s"] = request_timeout_s
        grpc["request_timeout_s"] = request_timeout_s
    return {"http_options": http, "grpc_options": grpc}


class StartFailed(RuntimeError):
    """The application did not start; the message is one line: the replica's root cause."""


def start_failure(app_status: Any, exc: BaseException) -> str:
    """One line for a failed start: the root cause from the application's Serve status
    (`serve.status().applications[name]`: the replica's exception is only in its
    deployments' messages; `serve.run` raises with the application's), else from `exc`."""
    from moe_serving.failures import FAILED_APP_STATES, app_failure, root_cause

    def value(x: Any) -> str:
        return str(getattr(x, "value", x))

    if app_status is not None and value(app_status.status) in FAILED_APP_STATES:
        return app_failure(
            {
                "status": value(app_status.status),
                "message": app_status.message,
                "serveDeploymentStatuses": {
                    name: {"status": value(d.status), "message": d.message}
                    for name, d in (app_status.deployments or {}).items()
                },
            }
        )
    return root_cause(str(exc)) or type(exc).__name__


@dataclass(frozen=True)
class LocalEndpoints:
    """Where a local run listens (handed to `ready_callback`)."""

    http_url: str  # OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    grpc_target: str  # e.g. 127.0.0.1:9000
    model: str  # the served model name clients pass
    log_file: Path


class _Console:
    """Progress lines on the terminal, with elapsed time, while Ray's noise goes to the log."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.t0 = time.monotonic()

    def say(self, message: str) -> None:
        self.stream.write(f"[{time.monotonic() - self.t0:6.1f}s] {message}\n")
        self.stream.flush()

    @contextlib.contextmanager
    def step(self, what: str, every_s: float = 15.0) -> Iterator[None]:
        """Announce a long step, print a heartbeat while it runs, and report how long it took."""
        started = time.monotonic()
        self.say(f"{what} ...")
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(every_s):
                self.say(f"  ... {time.monotonic() - started:.0f}s")

        thread = threading.Thread(target=heartbeat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        self.say(f"{what}: done in {time.monotonic() - started:.1f}s")


@contextlib.contextmanager
def _output_to(log_file: Path) -> Iterator[TextIO]:
    """Send this process's stdout/stderr (and its children's: Ray's daemons) to `log_file`.

    Yields a stream on the original terminal for our own progress output. Redirects at the
    file-descriptor level, so output of C++ daemons and forwarded worker logs lands there too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        console.close()


class _Stopper:
    """SIGINT/SIGTERM handler: stops a running server, or aborts a start-up in progress."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.serving = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested.set()
        if not self.serving:
            raise KeyboardInterrupt  # interrupts ray.init / serve.run in the main thread

    def install(self) -> dict[int, Any]:
        """Install for SIGINT and SIGTERM; returns the previous handlers."""
        return {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}


def run_local(
    app: AppConfig,
    *,
    http_port: int = 8000,
    grpc_port: int = 9000,
    log_dir: Path,
    ready_callback: Callable[[LocalEndpoints], None] | None = None,
    host: str = "127.0.0.1",
    nodes: int = 0,
    ranks_per_node: int = 1,
) -> None:
    """Serve `app` locally until Ctrl-C or SIGTERM, then shut everything down.

    Starts a local Ray cluster (its log and vLLM's go to `<log_dir>/serve.log`, whose path is
    printed), starts Ray Serve's HTTP and gRPC proxies, deploys `build_app`, prints the
    endpoints and calls `ready_callback(endpoints)` once the engine answers.

    `nodes` > 0: a multi-node Ray cluster on this machine instead (`local_cluster`): a head
    that takes no rank (0 CPUs: Serve's controller, proxy and ingress need none) and `nodes`
    worker nodes of `ranks_per_node` CPUs, so each engine rank lands on a worker node.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "serve.log"
    print(f"Ray / vLLM logs: {log_file}", flush=True)
    stop = _Stopper()
    previous = stop.install()
    try:
        with _output_to(log_file) as terminal:
            _serve_until_stopped(
                app,
                http_port,
                grpc_port,
                host,
                log_file,
                terminal,
                stop,
                ready_callback,
                nodes,
                ranks_per_node,
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_until_stopped(
    app: AppConfig,
    http_port: int,
    grpc_port: int,
    host: str,
    log_file: Path,
    terminal: TextIO,
    stop: _Stopper,
    ready_callback: Callable[[LocalEndpoints], None] | None,
    nodes: int = 0,
    ranks_per_node: int = 1,
) -> None:
    import ray
    from ray import serve

    from moe_serving.app import build
    from moe_serving.local_cluster import LocalCluster, NodeShape

    console = _Console(terminal)
    cluster: LocalCluster | None = None
    try:
        if nodes > 0:
            with console.step(f"Starting a local Ray cluster: a head and {nodes} worker nodes"):
                cluster = LocalCluster(
                    [NodeShape(num_cpus=ranks_per_node)] * nodes, head=NodeShape(num_cpus=0)
                ).start()
                ray.init(address=cluster.address, log_to_driver=True, namespace="moe-local")
                cluster.wait_for_nodes()
            for node in cluster.nodes:
                console.say(f"  worker node {node.ip}: {ranks_per_node} rank(s)")
        else:
            with console.step("Starting Ray"):
                ray.init(include_dashboard=False, log_to_driver=True, namespace="moe-local")
        stop.install()  # ray.init replaced the SIGTERM handler with one that just exits
        options = serve_options(http_port, grpc_port, host=host)
        serve.start(
            # One machine's ports: only the head's proxy can bind them.
            proxy_location="HeadOnly" if cluster is not None else "EveryNode",
            http_options=options["http_options"],
            grpc_options=options["grpc_options"],
        )
        console.say(f"Ray Serve proxies on {host}:{http_port} (HTTP) and {host}:{grpc_port} (gRPC)")
        engine = app.engine
        with console.step(
            f"Loading the engine ({engine.model}, TP={engine.tensor_parallel_size}, "
            f"DP={engine.data_parallel_size}, "
            f"EP={'on' if engine.enable_expert_parallel else 'off'})"
        ):
            serve.run(
                build(app),
                name=app.deployment_name,
                route_prefix="/",
                blocking=False,
            )
        endpoints = LocalEndpoints(
            http_url=f"http://{host}:{http_port}/v1",
            grpc_target=f"{host}:{grpc_port}",
            model=engine.served_model_name,
            log_file=log_file,
        )
        console.say(f"OpenAI HTTP API: {endpoints.http_url}  (model {endpoints.model!r})")
        console.say(f"gRPC: {endpoints.grpc_target}  (service {GRPC_SERVICE})")
        console.say(
            f"Live state: {endpoints.http_url}/moe/state  (queue, replicas, tokens; metrics at "
            f"http://{host}:{http_port}/metrics)"
        )
        console.say("Serving. Press Ctrl-C to stop.")
        stop.serving = True
        if ready_callback is not None:
            # The callback's own prints belong on the terminal, not in the log.
            with contextlib.redirect_stdout(terminal):
                ready_callback(endpoints)
        while not stop.requested.wait(0.5):
            pass
        console.say("Stopping ...")
    except KeyboardInterrupt:
        console.say("Interrupted during start-up; stopping ...")
    except Exception as exc:
        app_status = None
        with contextlib.suppress(Exception):  # Serve itself may be what failed
            app_status = serve.status().applications.get(app.deployment_name)
        line = start_failure(app_status, exc)
        console.say(f"Failed: {line}")
        raise StartFailed(f"{line} (details in {log_file})") from exc
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.stop()
        console.say("Stopped.")

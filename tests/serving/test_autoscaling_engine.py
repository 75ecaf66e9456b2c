"""Queue-depth autoscaling with the real engine: `moectl up` of a spec with autoscaling 1..2.

The many-replica cases run on a cheap stand-in (test_autoscaling_served.py); this one runs the
real thing end to end: `moectl up` starts Ray and the app with the tiny MoE on vLLM (one CPU
rank per replica, one sequence at a time so that clients queue), a bounded load of 4 clients
over loopback HTTP makes Serve's controller run our policy up to 2 replicas, and idling brings
it back to 1. The replica timeline comes from the app's own `/metrics`
(`moe_serving_replicas`). Assertions are about direction and bounds, never timings: each wait
has a generous deadline only a hang reaches.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.ports import free_port
from tests.support.waiting import poll_until, wait_until

pytestmark = pytest.mark.engine

_RUNNING = re.compile(r'^moe_serving_replicas\{[^}]*state="[^"]*RUNNING"[^}]*\}\s+([0-9.]+)', re.M)
_DEPTH_REPLICA = re.compile(r'^moe_replica_queue_depth\{[^}]*replica="([^"]+)"', re.M)


class App:
    """`moectl up` in a subprocess, and what a client on loopback sees of it."""

    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, log: Path) -> None:
        self.proc, self.base, self.log = proc, f"http://127.0.0.1:{http_port}", log

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as rsp:
                return int(rsp.status), rsp.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode(errors="replace")

    def running_replicas(self) -> int | None:
        try:
            status, text = self.get("/metrics", timeout=30)
        except OSError:
            return None
        found = _RUNNING.findall(text) if status == 200 else []
        return int(float(found[0])) if found else None

    def complete(self, max_tokens: int) -> None:
        body = json.dumps(
            {"model": "tiny-moe", "prompt": "one two three", "max_tokens": max_tokens}
        ).encode()
        request = urllib.request.Request(
            self.base + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as rsp:
            assert rsp.status == 200
            assert json.loads(rsp.read())["choices"][0]["text"] is not None


@pytest.fixture(scope="module")
def app(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    work = tmp_path_factory.mktemp("autoscale-engine")
    http_port, grpc_port = free_port(), free_port()
    spec = {
        "apiVersion": "serving.moeoperator.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "scaling"},
        "spec": {
            "model": {"name": "tiny-moe", "source": str(tiny_gemma4), "maxModelLen": 256},
            "parallelism": {"expertParallel": False, "tensorParallelSize": 1},
            "resources": {"accelerator": "CPU", "gpusPerNode": 2, "cpu": "2", "memory": "8Gi"},
            "serving": {
                "maxOngoingRequests": 1,  # one sequence per replica: the rest wait (queue depth)
                "maxQueuedRequests": 64,
                "engineArgs": {"max_num_seqs": 1, "seed": 0},
            },
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 2,
                "targetQueueDepth": 1,
                "upscaleDelaySeconds": 2,
                "downscaleDelaySeconds": 5,
            },
        },
    }
    spec_file = work / "scaling.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    log = work / "moectl.log"
    env = {
        **os.environ,
        # Serve's processes read these at import: queue metrics every half second.
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "MOE_HOME": str(work / "home"),
    }
    moectl = str(Path(sys.executable).parent / "moectl")
    argv = [moectl, "up", "-f", str(spec_file), "--http-port", str(http_port)]
    argv += ["--grpc-port", str(grpc_port), "--log-dir", str(work / "logs")]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = App(proc, http_port, log)

    def healthy() -> bool:
        assert proc.poll() is None, f"moectl up exited:\n{log.read_text()[-4000:]}"
        return running.get("/health", timeout=5)[0] == 200

    try:
        wait_until(
            healthy,
            420,
            1,
            lambda _: f"never healthy:\n{log.read_text()[-4000:]}",
            ignore=(OSError,),
        )
        yield running
    finally:
        proc.send_signal(signal.SIGINT)  # moectl up's clean stop (Ctrl-C)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"])


class Timeline:
    """RUNNING engine replicas over time, polled from /metrics by a thread."""

    def __init__(self, app: App) -> None:
        self.app, self.points = app, list[tuple[float, int]]()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            n = self.app.running_replicas()
            if n is not None:
                self.points.append((time.monotonic(), n))
            self.stop.wait(1.0)

    def counts(self, since: float = 0.0) -> list[int]:
        return [k for k, _ in itertools.groupby(n for t, n in self.points if t >= since)]

    def wait(self, ok: Callable[[int], bool], what: str, timeout_s: float) -> None:
        wait_until(
            lambda: bool(self.points) and ok(self.points[-1][1]),
            timeout_s,
            0.5,
            lambda _: f"{what} never happened; timeline {self.counts()}",
        )


def test_real_engine_scales_up_under_queueing_and_back_down_when_idle(app: App) -> None:
    timeline = Timeline(app)
    stop, errors, served = threading.Event(), list[BaseException](), [0]

    def client() -> None:
        while not stop.is_set():
            try:
                app.complete(max_tokens=24)
                served[0] += 1
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    try:
        timeline.wait(lambda n: n == 1, "the first replica", 120)
        step_at = time.monotonic()
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        # 4 clients, 1 sequence per replica: 3 wait on one replica, over the target of 1.
        timeline.wait(lambda n: n == 2, "scale-up to 2 replicas", 420)
        rising = timeline.counts(since=step_at)
        # The new replica serves: keep the load on for a bounded number of requests.
        target = served[0] + 8
        poll_until(lambda: served[0] >= target or bool(errors), 300, 0.5)
        # One scrape shows both replicas' engine series (each labelled with its replica),
        # whichever replica answered it.
        labelled = poll_until(
            lambda: set(_DEPTH_REPLICA.findall(app.get("/metrics", timeout=30)[1])),
            60,
            1.0,
            ok=lambda found: len(found) >= 2,
        )
        stop.set()
        for thread in clients:
            thread.join(timeout=320)
        assert not errors, errors[:3]
        idle_from = time.monotonic()
        timeline.wait(lambda n: n == 1, "scale-down to 1 when idle", 240)
        falling = timeline.counts(since=idle_from)
    finally:
        stop.set()
        timeline.stop.set()
        timeline.thread.join(timeout=40)
    print(f"autoscaling (real engine): served {served[0]}, replicas timeline {timeline.counts()}")
    assert rising == sorted(rising) and rising[-1] == 2, f"not a rise to 2: {rising}"
    assert len(labelled) == 2, f"/metrics engine series of {labelled}, not of 2 replicas"
    assert falling == sorted(falling, reverse=True), f"not a fall to 1: {falling}"
    # Bounds over the whole run: never above max, never below min.
    assert max(timeline.counts()) == 2 and min(timeline.counts()) == 1

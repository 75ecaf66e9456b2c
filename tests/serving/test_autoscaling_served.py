"""Queue-depth autoscaling in a real Ray Serve cluster (Serve's controller runs our policy).

One Ray cluster for the module. A cheap stand-in engine (`autoscale_standin.py`: same
admission queue and `record_autoscaling_stats` contract, no vLLM, 0 CPUs) takes a bounded step
load over loopback Serve handles; a thread records the replica timeline from `serve.status()`.
The assertions are about directions and bounds of that timeline, never about timings: each
phase waits for its condition with a generous deadline that only a hang reaches.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moe_serving.config import AutoscalingArgs
from tests.support.ports import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.engine

APP = "moe"
DEPLOYMENT = "LLMEngine"
HOLD_S = 0.5  # how long a stand-in request runs
# Replicas and handles push queue metrics often, so that phases take seconds, not minutes.
_FAST_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


@dataclass
class Timeline:
    """Replica counts (not stopping) and RUNNING replicas, sampled from serve.status()."""

    points: list[tuple[float, int, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        from ray import serve

        while not self.stop.is_set():
            app = serve.status().applications.get(APP)
            dep = app.deployments.get(DEPLOYMENT) if app else None
            if dep is not None:
                states = {
                    str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()
                }
                live = sum(v for k, v in states.items() if "STOPPING" not in k)
                self.points.append((time.monotonic(), live, states.get("RUNNING", 0)))
            time.sleep(0.1)

    def counts(self, since: float = 0.0) -> list[int]:
        return [k for k, _ in itertools.groupby(live for t, live, _ in self.points if t >= since)]

    def wait(self, ok: Callable[[int, int], bool], what: str, timeout_s: float = 180) -> float:
        wait_until(
            lambda: bool(self.points) and ok(self.points[-1][1], self.points[-1][2]),
            timeout_s,
            0.1,
            lambda _: f"{what} never happened; timeline {self.counts()}",
        )
        return time.monotonic()


class StepLoad:
    """`concurrency` clients, each sending one stand-in request after the other, until stop."""

    def __init__(self, handle: object, concurrency: int) -> None:
        self.handle = handle
        self.stop = threading.Event()
        self.served = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._client) for _ in range(concurrency)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                self.handle.work.remote(HOLD_S).result(timeout_s=120)  # type: ignore[attr-defined]
                self.served += 1
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)
        assert not self.errors, self.errors[:3]


# Ray Serve reads its metric push intervals when `ray.serve` is first imported; in a full test
# run another module imported it long before this one, with the defaults (10 s). So the real
# test runs in a fresh interpreter with the fast settings from its start.
_INNER = os.environ.get("MOE_AUTOSCALE_FRESH_INTERPRETER") == "1"


@pytest.mark.skipif(_INNER, reason="this is the fresh interpreter itself")
def test_in_a_fresh_interpreter() -> None:
    env = {**os.environ, **_FAST_METRICS, "MOE_AUTOSCALE_FRESH_INTERPRETER": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout, run.stdout[-3000:]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in _FAST_METRICS}
    os.environ.update(_FAST_METRICS)  # inherited by the raylet, hence by Serve's actors
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="moe-autoscale")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.skipif(not _INNER, reason="runs via test_in_a_fresh_interpreter")
def test_standin_step_load_scales_up_within_bounds_down_to_zero_and_back(
    ray_cluster: None,
) -> None:
    import autoscale_standin
    from ray import cloudpickle, serve

    # Replicas import the stand-in by value (tests/ is not on their path).
    cloudpickle.register_pickle_by_value(autoscale_standin)
    args = AutoscalingArgs(
        min_replicas=0,
        max_replicas=3,
        initial_replicas=1,
        target_queue_depth=1.5,
        upscale_delay_s=1,
        downscale_delay_s=3,
        look_back_period_s=2,
        metrics_interval_s=0.5,
    )
    # One request runs at a time per replica: 4 clients = 1 running + 1 waiting on each of
    # 2 replicas (below the target 1.5, and 1 replica would have 3 waiting); 12 clients need
    # ceil(12 / 2.5) = 5 replicas but max is 3.
    handle = serve.run(autoscale_standin.build(args, max_ongoing=1), name=APP, route_prefix=None)
    timeline = Timeline()
    sampler = threading.Thread(target=timeline.sample, daemon=True)
    sampler.start()
    try:
        timeline.wait(lambda live, running: running == 1, "the initial replica")
        # Idle and min_replicas 0: down to zero.
        timeline.wait(lambda live, running: live == 0, "scale to zero when idle")
        assert timeline.counts() == [1, 0]

        # From zero, the first requests wait for a replica instead of failing (StepLoad
        # fails the test on any error); 4 clients then need 2 replicas.
        from_zero = time.monotonic()
        load = StepLoad(handle, 4)
        timeline.wait(lambda live, running: running == 2, "scale-up to 2 under 4 clients")
        rising = timeline.counts(since=from_zero)
        steady_from = time.monotonic()
        # Steady load: each replica serves many requests while we watch the count.
        target_served = load.served + 40
        while load.served < target_served:
            time.sleep(0.2)
        steady = timeline.counts(since=steady_from)
        load.end()
        assert rising == sorted(rising) and rising[-1] == 2, f"not a rise to 2: {rising}"
        assert steady == [2], f"replicas changed under a steady load: {steady}"

        step_at = time.monotonic()
        load = StepLoad(handle, 12)
        timeline.wait(lambda live, running: running == 3, "scale-up to max_replicas=3")
        target_served = load.served + 40
        while load.served < target_served:
            time.sleep(0.2)
        load.end()
        loaded = timeline.counts(since=step_at)
        idle_from = time.monotonic()
        timeline.wait(lambda live, running: live == 0, "scale to zero after the load")
        falling = timeline.counts(since=idle_from)
        assert loaded == sorted(loaded) and max(loaded) == 3, f"not a rise to 3: {loaded}"
        assert falling == sorted(falling, reverse=True), f"not a fall to 0: {falling}"
    finally:
        timeline.stop.set()
        sampler.join(timeout=10)
        serve.delete(APP)

    # Bounds over the whole run: never above max_replicas, never below min_replicas.
    assert max(timeline.counts()) == 3 and min(timeline.counts()) == 0

"""Autoscaling reaction of our deployment: a load step, the scale-up decision, the new replica.

Procedure (on a running `moectl up` with autoscaling 1..2 replicas):
1. idle: a light load (1 client) for `idle_s`; the replica count must stay put;
2. step: `step_concurrency` clients from t=0 on, until the new replica has served for
   `steady_s` (or `max_step_s` passes);
3. from serve_observer.py's timeline: time from the step to the first scale-up decision
   (a replica appears in any state, or Serve says "Upscaling"), to the new replica RUNNING,
   and the number of direction changes (up -> down or down -> up) while the load was steady.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .loadgen import OpenAIClient, Workload, run_load

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Point:
    t: float  # unix time
    total: int  # replicas in any state
    running: int
    message: str = ""


def timeline(lines: list[dict[str, Any]], deployment: str | None = None) -> list[Point]:
    """The replica timeline of the deployment that scaled (or of `deployment`)."""
    per: dict[str, list[Point]] = {}
    for line in lines:
        for name, dep in (line.get("deployments") or {}).items():
            states = dep.get("replicas") or {}
            per.setdefault(name, []).append(
                Point(
                    t=float(line["t"]),
                    total=sum(int(v) for v in states.values()),
                    running=int(states.get("RUNNING", 0)),
                    message=str(dep.get("message") or ""),
                )
            )
    if not per:
        return []
    if deployment is not None:
        return per.get(deployment, [])

    def spread(points: list[Point]) -> int:
        return max(p.total for p in points) - min(p.total for p in points)

    return max(per.values(), key=lambda pts: (spread(pts), max(p.total for p in pts)))


def direction_changes(points: list[Point]) -> int:
    """How often the replica count turned around (up then down, or down then up)."""
    signs = []
    for before, after in itertools.pairwise(points):
        if after.total != before.total:
            signs.append(1 if after.total > before.total else -1)
    return sum(1 for a, b in itertools.pairwise(signs) if a != b)


@dataclass
class Reaction:
    step_at: float
    initial_replicas: int | None = None
    decision_s: float | None = None
    serving_s: float | None = None
    max_replicas_seen: int | None = None
    idle_direction_changes: int | None = None
    steady_direction_changes: int | None = None
    steady_window_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyze(points: list[Point], step_at: float, steady_from: float | None, end: float) -> Reaction:
    """Reaction times and direction changes from a replica timeline."""
    out = Reaction(step_at=step_at)
    before = [p for p in points if p.t < step_at]
    after = [p for p in points if p.t >= step_at]
    if not before or not after:
        out.notes.append("no replica timeline around the load step")
        return out
    base = before[-1]
    out.initial_replicas = base.total
    out.idle_direction_changes = direction_changes(before)
    out.max_replicas_seen = max(p.total for p in points)
    for p in after:
        if out.decision_s is None and (p.total > base.total or "Upscaling" in p.message):
            out.decision_s = p.t - step_at
        if out.serving_s is None and p.running > base.running:
            out.serving_s = p.t - step_at
            break
    if out.serving_s is not None:
        start = steady_from if steady_from is not None else step_at + out.serving_s
        steady = [p for p in after if start <= p.t <= end]
        out.steady_direction_changes = direction_changes(steady)
        out.steady_window_s = end - start
    else:
        out.notes.append("no new replica served within the step")
    return out


async def _observe(app: str, namespace: str, lines: list[dict[str, Any]], log: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / "serve_observer.py"),
        "--app",
        app,
        "--namespace",
        namespace,
        stdout=asyncio.subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


async def measure(
    base_url: str,
    model: str,
    *,
    app: str,
    namespace: str = "moe-local",
    workdir: Path,
    idle_s: float = 15.0,
    step_concurrency: int = 16,
    steady_s: float = 30.0,
    max_step_s: float = 240.0,
    max_tokens: int = 64,
) -> Reaction:
    lines: list[dict[str, Any]] = []
    observer = asyncio.create_task(_observe(app, namespace, lines, workdir / "observer.log"))
    try:
        # Wait for the observer's first answer (it connects to the running cluster).
        for _ in range(600):
            if any("deployments" in line for line in lines) or observer.done():
                break
            await asyncio.sleep(0.1)
        async with OpenAIClient(base_url, model) as client:
            idle = Workload(1, 10_000, idle_s, max_tokens=max_tokens)
            await run_load(client.sender(idle), idle)
            step_at = time.time()
            step = Workload(step_concurrency, 100_000, max_step_s, max_tokens=max_tokens)
            load = asyncio.create_task(run_load(client.sender(step), step))
            steady_from: float | None = None
            while not load.done():
                points = timeline(lines)
                base = [p for p in points if p.t < step_at]
                if (
                    base
                    and steady_from is None
                    and any(p.t >= step_at and p.running > base[-1].running for p in points)
                ):
                    steady_from = time.time()
                if steady_from is not None and time.time() - steady_from >= steady_s:
                    load.cancel()
                    break
                await asyncio.sleep(0.25)
            with contextlib.suppress(asyncio.CancelledError):
                await load
            end = time.time()
    finally:
        observer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await observer
    reaction = analyze(timeline(lines), step_at, steady_from, end)
    errors = sorted({str(line["error"]) for line in lines if "error" in line})
    reaction.notes += [f"observer: {e}" for e in errors[:3]]
    return reaction

"""Autoscaling analysis on recorded replica timelines (pure; the live part needs Ray)."""

from __future__ import annotations

from typing import Any

from bench.autoscale import Point, analyze, direction_changes, timeline


def line(t: float, **deps: dict[str, Any]) -> dict[str, Any]:
    return {"t": t, "deployments": deps}


def dep(running: int, starting: int = 0, message: str = "") -> dict[str, Any]:
    states = {"RUNNING": running}
    if starting:
        states["STARTING"] = starting
    return {"replicas": states, "status": "HEALTHY", "message": message}


LINES = [
    line(0.0, Ingress=dep(1), Engine=dep(1)),
    line(5.0, Ingress=dep(1), Engine=dep(1)),
    line(10.0, Ingress=dep(1), Engine=dep(1)),  # the step is at t=10
    line(12.0, Ingress=dep(1), Engine=dep(1, message="Upscaling from 1 to 2 replicas.")),
    line(13.0, Ingress=dep(1), Engine=dep(1, starting=1)),
    line(40.0, Ingress=dep(1), Engine=dep(2)),
    line(50.0, Ingress=dep(1), Engine=dep(1)),  # flap down...
    line(60.0, Ingress=dep(1), Engine=dep(2)),  # ...and up again
    line(70.0, Ingress=dep(1), Engine=dep(2)),
]


def test_timeline_picks_the_deployment_that_scaled() -> None:
    points = timeline(LINES)
    assert [p.total for p in points] == [1, 1, 1, 1, 2, 2, 1, 2, 2]
    assert [p.total for p in timeline(LINES, "Ingress")] == [1] * 9
    assert timeline([{"t": 1.0, "error": "gone"}]) == []


def test_direction_changes_count_turnarounds_only() -> None:
    pts = [Point(float(i), n, n) for i, n in enumerate([1, 2, 2, 3, 2, 1, 2, 2])]
    assert direction_changes(pts) == 2  # up, up, down, down, up: two turnarounds
    assert direction_changes([Point(0, 1, 1), Point(1, 2, 2)]) == 0
    assert direction_changes([]) == 0


def test_reaction_times_and_steady_flapping() -> None:
    r = analyze(timeline(LINES), step_at=10.0, steady_from=None, end=70.0)
    assert r.initial_replicas == 1
    assert r.decision_s == 2.0  # the "Upscaling" message at t=12
    assert r.serving_s == 30.0  # RUNNING 2 at t=40
    assert r.max_replicas_seen == 2
    assert r.idle_direction_changes == 0
    assert r.steady_direction_changes == 1  # 2 -> 1 -> 2 within [40, 70]
    assert r.steady_window_s == 30.0


def test_no_scale_up_is_reported_not_invented() -> None:
    flat = [line(float(t), Engine=dep(1)) for t in range(0, 30, 5)]
    r = analyze(timeline(flat), step_at=10.0, steady_from=None, end=30.0)
    assert r.decision_s is None and r.serving_s is None
    assert r.steady_direction_changes is None
    assert "no new replica served within the step" in r.notes
    empty = analyze([], step_at=10.0, steady_from=None, end=30.0)
    assert empty.initial_replicas is None and empty.notes

"""Operator scale against the API emulator: the real operator (kopf subprocess), no engine."""

from __future__ import annotations

from pathlib import Path

from bench.operator_scale import measure


async def test_two_deployments_converge_and_a_restart_writes_nothing(tmp_path: Path) -> None:
    point = await measure(2, tmp_path, quiet_s=0.5, timeout_s=120)
    assert point.error is None, point.error
    assert point.converge_s is not None and point.ready_s is not None
    # Each MoEDeployment: 4 children applied (PATCH, server-side apply) and its status patched.
    assert point.converge_calls_by_verb.get("patch", 0) >= 2 * 5
    assert point.converge_calls == sum(point.converge_calls_by_verb.values())
    assert point.noop_reconciles >= 2
    assert point.noop_writes == 0, point.noop_writes_detail
    assert point.writes_per_noop_reconcile == 0.0
    assert point.operator_rss_bytes is not None and point.operator_rss_bytes > 0
    assert (tmp_path / "operator-2.log").read_text().count("reconciled bench/moe-0001") >= 2

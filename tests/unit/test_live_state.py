"""Live serving state: the serving side's aggregation, the operator's rates/cost, the status
fields they feed, and kopf's peering rule as the poller applies it (all pure)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from moe_operator import live
from moe_operator import status as st
from moe_operator.throughput import cost_per_million_tokens
from moe_serving import live_state

NOW = 1_800_000_000.0


def rep(replica: str, at: float, queued: int, in_engine: int, running: int, tokens: int) -> Any:
    item = live_state.report(
        replica,
        {"queued": queued, "in_engine": in_engine, "scheduler_running": running},
        tokens,
        requests=tokens // 10,
    )
    item["time"] = at
    return item


def body(at: float, tokens: int, replicas: int = 2, target: int | None = 3) -> dict[str, Any]:
    reports = {
        f"r{i}": rep(f"r{i}", at - 1, queued=1, in_engine=3, running=2, tokens=tokens // replicas)
        for i in range(replicas)
    }
    return live_state.state_body("app", "LLMEngine", reports, replicas, target, at)


def test_aggregate_sums_fresh_reports_and_drops_stale_ones() -> None:
    reports = {
        "a": rep("a", NOW - 1, queued=2, in_engine=5, running=4, tokens=100),
        "b": rep("b", NOW - 3, queued=0, in_engine=1, running=1, tokens=50),
        "dead": rep("dead", NOW - live_state.STALE_AFTER_S - 1, 9, 9, 9, 10_000),
    }
    got = live_state.aggregate(reports, NOW)
    # waiting = our queue + vLLM's unfinished that are not running: (2 + 1) + (0 + 0)
    assert got["waiting"] == 3
    assert got["running"] == 5
    assert got["generated_tokens_total"] == 150
    assert got["reporting_replicas"] == 2
    assert got["replica_ids"] == ["a", "b"]


def test_replica_counts_from_serve_instance_details() -> None:
    details = {
        "applications": {
            "app": {
                "deployments": {
                    "LLMEngine": {
                        "target_num_replicas": 3,
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                    }
                }
            }
        }
    }
    assert live_state.replica_counts(details, "app", "LLMEngine") == (1, 3)
    assert live_state.replica_counts(details, "other", "LLMEngine") == (None, None)


def test_parse_round_trips_the_serving_body_and_rejects_others() -> None:
    sample = live.parse(body(NOW, tokens=400))
    assert sample.running_replicas == 2 and sample.target_replicas == 3
    assert sample.waiting == 4 and sample.running == 4
    assert sample.generated_tokens_total == 400
    with pytest.raises(live.BadState, match="version"):
        live.parse({**body(NOW, 1), "version": 2})
    with pytest.raises(live.BadState, match="malformed"):
        live.parse({"version": 1, "time": NOW})
    with pytest.raises(live.BadState, match="JSON object"):
        live.parse([1, 2])


def test_rate_and_cost_from_two_samples() -> None:
    first = live.parse(body(NOW, tokens=1_000))
    second = live.parse(body(NOW + 10, tokens=3_000))  # 200 tokens/s over 10 s
    value = live.summarize(first, second, hourly_cost_per_replica=4.0)
    assert value.output_tokens_per_second == 200.0
    expected = cost_per_million_tokens(4.0 * 2, 200.0)
    assert expected is not None
    assert value.cost_per_million_tokens == pytest.approx(expected, rel=1e-2)
    assert value.queue_depth == 2.0  # 4 waiting over 2 serving replicas
    assert value.desired_replicas == 3 and value.serving_replicas == 2


def test_no_rate_without_a_comparable_previous_sample() -> None:
    current = live.parse(body(NOW, tokens=500))
    assert live.summarize(None, current, 4.0).output_tokens_per_second is None
    # A replica restarted: its counter went back, so no rate (never a negative one).
    restarted = live.parse(body(NOW + 10, tokens=100))
    assert live.summarize(current, restarted, 4.0).cost_per_million_tokens is None
    # Another set of replicas (scale-up): counters are not comparable either.
    more = live.parse(body(NOW + 10, tokens=900, replicas=3))
    assert live.token_rate(current, more) is None


def test_idle_deployment_has_zero_rate_and_no_cost() -> None:
    a, b = live.parse(body(NOW, 500)), live.parse(body(NOW + 15, 500))
    value = live.summarize(a, b, 4.0)
    assert value.output_tokens_per_second == 0.0
    assert value.cost_per_million_tokens is None


def test_rounding_keeps_noise_out_of_status() -> None:
    a = live.parse(body(NOW, 1_000))
    b1 = live.parse(body(NOW + 10, 3_001))
    b2 = live.parse(body(NOW + 10, 3_002))
    assert live.summarize(a, b1, 4.0) == live.summarize(a, b2, 4.0)


def ready_ray_service() -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "status": {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True"}],
            "activeServiceStatus": {"rayClusterStatus": {"readyWorkerReplicas": 2}},
        },
    }


def test_status_shows_live_values_and_drops_them_when_gone() -> None:
    value = live.LiveStatus(
        queue_depth=1.5,
        desired_replicas=3,
        serving_replicas=2,
        output_tokens_per_second=210.0,
        cost_per_million_tokens=5.29,
    )
    inputs = st.Inputs(
        name="m",
        generation=1,
        now="2026-12-03T00:00:00Z",
        desired_replicas=1,
        ray_service=ready_ray_service(),
        live=value,
    )
    status = st.compute(inputs)
    assert status["queueDepth"] == 1.5
    assert status["desiredReplicas"] == 3  # the autoscaler's target wins over the plan's 1
    assert status["servingReplicas"] == 2
    assert status["outputTokensPerSecond"] == 210.0
    assert status["costPerMillionTokens"] == 5.29
    # The live read stops (unreachable): the values go, the planned desired count comes back.
    without = st.compute(st.Inputs(**{**inputs.__dict__, "live": None}), status)
    patch = st.status_patch(status, without)
    assert patch is not None
    assert patch["queueDepth"] is None and patch["costPerMillionTokens"] is None
    assert patch["desiredReplicas"] == 1


def iso(at: datetime.datetime) -> str:
    return at.isoformat()


def test_peering_rule_matches_kopfs() -> None:
    now = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)
    fresh, old = iso(now - datetime.timedelta(seconds=5)), iso(now - datetime.timedelta(hours=1))
    me = {"priority": 0, "lifetime": 60, "lastseen": fresh}
    assert not live.peering_paused({"me": me}, 0, now)
    assert not live.peering_paused(None, 0, now)
    # A live peer with a higher priority is in charge.
    assert live.peering_paused({"me": me, "b": {**me, "priority": 10}}, 0, now)
    # Two of the same priority: kopf pauses both.
    assert live.peering_paused({"me": me, "b": me}, 0, now)
    # Dead peers and lower priorities do not count.
    assert not live.peering_paused({"me": me, "b": {**me, "priority": 10, "lastseen": old}}, 0, now)
    assert not live.peering_paused({"me": me, "b": {**me, "priority": -5}}, 0, now)


def test_rate_window_between_scrapes() -> None:
    window = live_state.RateWindow()
    load = {"generated_tokens_total": 100, "replica_ids": ["a"]}
    assert window.update(load, NOW) is None  # one read: no window yet
    assert window.update({**load, "generated_tokens_total": 400}, NOW + 10) == 30.0
    # A scrape right after another keeps the last rate instead of dividing by ~0.
    assert window.update({**load, "generated_tokens_total": 401}, NOW + 10.1) == 30.0
    # A replica restarted (counter back): no rate, never a negative one.
    assert window.update({**load, "generated_tokens_total": 5}, NOW + 20) is None


def test_app_metrics_expose_the_live_cost() -> None:
    from moe_serving.metrics import app_metrics_text

    load = {"generated_tokens_total": 900, "waiting": 3, "running": 2, "reporting_replicas": 2}
    text = app_metrics_text(load, running_replicas=2, hourly_cost_per_replica=1.5, tokens_per_s=50)
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["moe_app_generated_tokens_total"]) == 900
    assert float(lines["moe_app_hourly_cost_usd"]) == 3.0
    assert float(lines["moe_cost_per_million_output_tokens"]) == pytest.approx(
        3.0 / (50 * 3600) * 1e6
    )
    # Idle, or no price: no cost series at all (never a division by zero or a made-up 0).
    idle = app_metrics_text(load, 2, 1.5, 0.0)
    assert "moe_cost_per_million_output_tokens " not in idle
    assert "moe_app_hourly_cost_usd" not in app_metrics_text(load, 2, None, 50)


def test_board_keeps_the_metrics_of_replicas_that_report(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [NOW]
    monkeypatch.setattr(live_state.time, "time", lambda: clock[0])
    board = live_state.Board()
    board.put_metrics("a", "text a")
    clock[0] += live_state.STALE_AFTER_S / 2
    board.put_metrics("b", "text b")
    assert board.get_metrics() == {"a": "text a", "b": "text b"}
    clock[0] += live_state.STALE_AFTER_S / 2 + 1  # a stopped reporting: its series go
    assert board.get_metrics() == {"b": "text b"}
    board.put_metrics("b", "text b2")
    assert "a" not in board.metrics and board.get_metrics() == {"b": "text b2"}
    board.drop("b")
    assert board.get_metrics() == {}


def test_unavailable_tool_calling_becomes_a_false_condition() -> None:
    """A replica serving without its tool parser (moe_serving.parser_support) reports why in
    `/v1/moe/state`; the operator sets ToolCallingAvailable False with those words. Replicas
    that report nothing (older images) leave it Unknown; the others' report counts."""
    reason = "tool calling is off: vLLM's 'mistral' parser cannot be used with ..."
    reports = {
        "a": {**rep("a", NOW - 1, 0, 0, 0, 10), "unavailable": {"tool_calling": reason}},
        "b": rep("b", NOW - 1, 0, 0, 0, 10),
        "old": {**rep("old", NOW - 60, 0, 0, 0, 10), "unavailable": {"reasoning": "stale"}},
    }
    served = live_state.state_body("app", "LLMEngine", reports, 2, 2, NOW)
    assert served["unavailable"] == {"tool_calling": reason}
    sample = live.parse(served)
    value = live.summarize(None, sample, 1.0)

    def conditions(value: live.LiveStatus | None) -> dict[str, tuple[str, str, str]]:
        inputs = st.Inputs(
            name="m",
            generation=1,
            now="2026-12-03T00:00:00Z",
            ray_service=ready_ray_service(),
            live=value,
            tool_calling=True,
            reasoning=True,
        )
        return {
            c["type"]: (c["status"], c["reason"], c["message"])
            for c in st.compute(inputs)["conditions"]
        }

    got = conditions(value)
    assert got["ToolCallingAvailable"] == ("False", "ParserUnsupported", reason)
    assert got["ReasoningAvailable"][:2] == ("True", "Serving")
    assert got["Ready"][0] == "True"  # served without the parser, not failed
    assert conditions(None)["ToolCallingAvailable"][:2] == ("Unknown", "NotReported")
    older = {k: v for k, v in served.items() if k != "unavailable"}
    assert (
        conditions(live.summarize(None, live.parse(older), 1.0))["ToolCallingAvailable"][0]
        == "Unknown"
    )
    # A plan without parsers has no such conditions.
    plain = st.compute(st.Inputs(name="m", generation=1, now="x", live=value))
    assert {c["type"] for c in plain["conditions"]} == {"Ready", "Progressing", "Degraded"}

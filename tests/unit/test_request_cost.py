"""Per-request cost (moe_serving.request_cost): the replica's price shared by token-seconds,
prompt and output parts, idle time unattributed; and how it is put into responses (pure)."""

from __future__ import annotations

import json

import pytest

from moe_serving.request_cost import CostMeter, RequestCost

HOURLY = 3600.0  # $1 per second: costs read as seconds


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def meter() -> tuple[CostMeter, Clock]:
    clock = Clock()
    return CostMeter(HOURLY, clock), clock


def test_alone_a_request_pays_the_replica_while_it_runs_prefill_then_decode() -> None:
    m, clock = meter()
    m.start("a", prompt_tokens=10)
    clock.now = 2.0
    m.progress("a", 11)  # first token after 2 s: that was its prompt's part
    clock.now = 5.0
    m.progress("a", 14)
    cost = m.finish("a")
    assert cost == RequestCost(prompt_usd=2.0, output_usd=3.0)
    assert cost.total_usd == 5.0
    assert m.finish("a") is None  # once


def test_concurrent_requests_split_by_the_tokens_they_hold() -> None:
    m, clock = meter()
    m.start("small", 10)
    m.start("big", 30)
    clock.now = 4.0  # 4 s shared 10:30
    small, big = m.finish("small"), m.finish("big")
    assert small is not None and big is not None
    assert small.total_usd == pytest.approx(1.0)
    assert big.total_usd == pytest.approx(3.0)


def test_idle_time_is_nobodys_and_busy_time_adds_up_exactly() -> None:
    m, clock = meter()
    m.start("a", 5)
    clock.now = 1.0
    a = m.finish("a")
    clock.now = 10.0  # 9 s idle
    m.start("b", 5)
    clock.now = 12.0
    m.start("c", 15)
    clock.now = 13.0
    b = m.finish("b")
    clock.now = 14.0
    c = m.finish("c")
    assert a and b and c
    total = a.total_usd + b.total_usd + c.total_usd
    assert total == pytest.approx(1.0 + 4.0)  # busy 0-1 and 10-14: the idle 9 s is not billed
    assert m.attributed_usd == pytest.approx(total)


def test_usage_fields_and_response_injection() -> None:
    from moe_serving.engine import sse_with_costs, with_costs

    cost = RequestCost(0.25, 0.5)
    assert cost.usage_fields() == {
        "cost_usd": 0.75,
        "prompt_cost_usd": 0.25,
        "output_cost_usd": 0.5,
    }
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    assert with_costs(body, cost)["usage"]["cost_usd"] == 0.75
    assert with_costs({"usage": None}, cost) == {"usage": None}
    chunk = 'data: {"choices": [], "usage": {"prompt_tokens": 3}}\n\n'
    out = json.loads(sse_with_costs(chunk, cost)[len("data: ") :])
    assert out["usage"]["output_cost_usd"] == 0.5
    plain = 'data: {"choices": [{"text": "x"}], "usage": null}\n\n'
    assert sse_with_costs(plain, cost) == plain
    assert sse_with_costs(chunk, None) == chunk

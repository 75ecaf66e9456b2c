"""Prefix-cache-aware routing over two engine replicas (moe_serving.routing), in Ray Serve.

Two engine replicas of the tiny Gemma-4-style MoE (one CPU rank each) behind the real ingress,
the engine deployment on `PrefixAffinityRouter` (Serve's request-router API,
ray/serve/_private/request_router). Agent-like sessions, each with its own long system prompt
and a growing history, must stay on one replica (its KV cache holds their prefix); requests
without a shared prefix are spread as Serve's default router spreads them. Where each request
ran is read from the engine series the ingress labels by replica
(`moe_engine_requests_total{replica}`); the router's reasons from `moe_routing_decisions_total`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moe_serving import live_state
from tests.support.appconfig import tiny_app_config
from tests.support.served import Served, running_app
from tests.support.waiting import wait_until

pytestmark = pytest.mark.engine

MODEL = "tiny-moe"
_OK = re.compile(r"^moe_engine_requests_total\{([^}]*)\} (\S+)$", re.M)
_DECISION = re.compile(r'^moe_routing_decisions_total\{reason="(\w+)"\} (\S+)$', re.M)
_HITS = re.compile(r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\} (\S+)$", re.M)


@pytest.fixture(scope="module")
def served(tiny_gemma4: Path) -> Iterator[Served]:
    config = tiny_app_config(
        tiny_gemma4,
        "moe-routing",
        served_model_name=MODEL,
        tensor_parallel_size=1,
        autoscaling={"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2},
        prefix_affinity=True,
        max_ongoing_requests=4,
    )
    with running_app(config, "moe-routing-tests") as app:
        # Both replicas report their series (the ingress shows every replica's).
        wait_until(lambda: len(per_replica(app.metrics())) == 2 or None, 120, 1.0, "2 replicas")
        yield app


def per_replica(text: str) -> dict[str, float]:
    """Requests each engine replica finished (any outcome), from the ingress's /metrics."""
    out: dict[str, float] = {}
    for labels, value in _OK.findall(text):
        replica = re.search(r'replica="([^"]+)"', labels)
        if replica:
            out[replica.group(1)] = out.get(replica.group(1), 0.0) + float(value)
    # A replica that has answered nothing yet has no sample: find it by another series.
    for replica in re.findall(r'^moe_replica_queue_depth\{replica="([^"]+)"\}', text, re.M):
        out.setdefault(replica, 0.0)
    return out


def decisions(text: str) -> dict[str, float]:
    return {reason: float(v) for reason, v in _DECISION.findall(text)}


def chat(served: Served, messages: list[dict[str, str]]) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    reply = httpx.post(f"{served.http}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def settled(served: Served, total: float) -> dict[str, float]:
    """Per-replica counts once they add up to `total`. The ingress shows the replica that answers
    the scrape fresh and the other as it last reported (up to a few seconds old): only when the
    sum is complete is every replica's count current (counts only grow)."""
    return wait_until(
        lambda: m if sum((m := per_replica(served.metrics())).values()) == total else None,
        60,
        0.5,
        f"the replicas' request counts never added up to {total}",
    )


def stable_total(served: Served) -> float:
    """The requests counted so far, once two reads a report interval apart agree."""
    previous = -1.0
    while True:
        now = sum(per_replica(served.metrics()).values())
        if now == previous:
            return now
        previous = now
        time.sleep(live_state.REPORT_INTERVAL_S * 1.5)


def test_each_agent_session_stays_on_one_replica(served: Served) -> None:
    turns = 4
    total = stable_total(served)
    before_all = decisions(served.metrics())
    for session in range(3):
        system = f"session {session} {secrets.token_hex(4)}: " + "you are a careful agent. " * 30
        messages = [{"role": "system", "content": system}]
        before = settled(served, total)
        for turn in range(turns):
            messages.append({"role": "user", "content": f"step {turn}: go on"})
            messages.append({"role": "assistant", "content": chat(served, messages)})
        total += turns
        after = settled(served, total)
        delta = {r: after[r] - before.get(r, 0.0) for r in after}
        print(f"\nsession {session}: requests per replica {delta}")
        assert sorted(delta.values())[-1] == turns, delta  # all on one replica
    after_all = decisions(served.metrics())
    print(f"routing decisions: {after_all} (before: {before_all})")
    gained = {k: v - before_all.get(k, 0.0) for k, v in after_all.items()}
    # Each session's first call knows no prefix (fallback); every later call finds its own.
    assert gained.get("affinity", 0.0) >= 3 * (turns - 1), gained
    assert gained.get("fallback", 0.0) >= 3, gained


def test_requests_without_a_shared_prefix_are_spread(served: Served) -> None:
    total = stable_total(served)
    before = settled(served, total)
    for i in range(16):
        chat(served, [{"role": "user", "content": f"{secrets.token_hex(8)} {i}"}])
    after = settled(served, total + 16)
    delta = {r: after[r] - before.get(r, 0.0) for r in after}
    print(f"\nno shared prefix: requests per replica {delta}")
    assert all(v > 0 for v in delta.values()) and len(delta) == 2, delta
    text = served.metrics()
    hits: dict[str, float] = {}
    for kind, value in _HITS.findall(text):
        hits[kind] = hits.get(kind, 0.0) + float(value)
    print(f"vLLM prefix cache, both replicas: {hits}")

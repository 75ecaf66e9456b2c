"""The `agents` section's driver (bench/agents.py) against the fake OpenAI server.

No engine runs here: fake_openai.py stands in for the served app, so the conversation the driver
builds (what a replica's prefix cache could share) and the numbers it reports are checked
exactly. No timing thresholds.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from fake_openai import FakeState, fake_openai

from bench import agents, report

SHAPE = agents.AgentWorkload(
    sessions=3, turns=4, instruction_tokens=20, user_tokens=3, max_tokens=5
)


def _metrics(hits: float, queries: float, affinity: float = 0.0) -> str:
    return "\n".join(
        [
            f'moe_routing_decisions_total{{reason="affinity"}} {affinity}',
            'moe_routing_decisions_total{reason="fallback"} 3.0',
            f'vllm:prefix_cache_hits_total{{replica="a"}} {hits / 2}',
            f'vllm:prefix_cache_hits_total{{replica="b"}} {hits / 2}',
            f'vllm:prefix_cache_queries_total{{replica="a"}} {queries}',
            'moe_replica_queue_depth{replica="a"} 0',
        ]
    )


def _run(control: bool) -> tuple[agents.AgentRun, list[dict[str, Any]]]:
    async def go() -> tuple[agents.AgentRun, list[dict[str, Any]]]:
        state = FakeState(metrics=[_metrics(10, 100, 2), _metrics(70, 200, 11)])
        async with fake_openai(state) as (url, st):
            run = await agents.run(url, "tiny-moe", SHAPE, None, label="r0-x", control=control)
        return run, st.bodies

    return asyncio.run(go())


def test_an_agent_session_resends_its_own_prefix_and_its_history() -> None:
    run, bodies = _run(control=False)
    assert len(bodies) == SHAPE.calls and run.result.summary().ok == SHAPE.calls
    by_system: dict[str, list[list[dict[str, str]]]] = {}
    for body in bodies:
        assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == SHAPE.max_tokens
        by_system.setdefault(body["messages"][0]["content"], []).append(body["messages"])
    assert len(by_system) == SHAPE.sessions  # one system prompt per session, none shared
    for calls in by_system.values():
        calls.sort(key=len)
        assert [len(m) for m in calls] == [2 + 2 * t for t in range(SHAPE.turns)]
        for earlier, later in itertools.pairwise(calls):
            assert later[: len(earlier)] == earlier  # the whole history is re-sent
            assert later[len(earlier)] == {"role": "assistant", "content": "t0 t1 t2 t3 t4 "}
    # vLLM's counters: their change over the run, summed over replicas.
    assert (run.hits, run.queries) == (60.0, 100.0)
    assert run.as_dict()["prefix_cache_hit_rate"] == 0.6
    # The router's decisions: their change over the run, by reason.
    assert run.as_dict()["routing_decisions"] == {"affinity": 9.0, "fallback": 0.0}


def test_the_control_shares_no_prefix_and_grows_like_an_agent() -> None:
    _, bodies = _run(control=True)
    assert len(bodies) == SHAPE.calls
    systems = [b["messages"][0]["content"] for b in bodies]
    assert len(set(systems)) == SHAPE.calls
    assert all(len(b["messages"]) == 2 for b in bodies)
    first_words = {s.split("\n")[0] for s in systems}
    assert len(first_words) == SHAPE.calls  # the first line already differs
    # A call at turn t carries about as many words as an agent's call at turn t.
    sizes = sorted(len(str(b["messages"]).split()) for b in bodies)
    assert sizes[-1] > sizes[0]


def test_the_report_pairs_rounds_and_shows_each_workload() -> None:
    def row(ttft: float, rate: float) -> dict[str, Any]:
        return {
            "ttft_p50_s": ttft,
            "ttft_p99_s": ttft * 2,
            "output_tokens_per_s": 100.0,
            "prefix_cache_hit_rate": rate,
            "failed": 0,
        }

    results = {
        "agents": {
            "setup": "s",
            "rounds": {
                str(r): {
                    "affinity": {
                        "agent": {**row(0.1, 0.8), "routing_decisions": {"affinity": 5.0}},
                        "control": {**row(0.2, 0.0), "routing_decisions": {"fallback": 6.0}},
                    },
                    "default": {"agent": row(0.2, 0.4), "control": row(0.2, 0.0)},
                }
                for r in range(3)
            },
            "launches": [{"system": "affinity", "rounds": [0], "cold_start_s": 50.0}],
        }
    }
    text = "\n".join(report.agents_lines(results))
    assert "| agent | TTFT p50 | 100 ms | 200 ms | 0.50x [0.50, 0.50] |" in text
    assert "| agent | prefix-cache hit rate | 0.80 | 0.40 | 2.00x [2.00, 2.00] |" in text
    assert "| control | TTFT p50 | 200 ms | 200 ms | 1.00x [1.00, 1.00] |" in text
    assert "- router decisions, agent workload (all rounds): affinity 15" in text
    assert "- router decisions, control workload (all rounds): fallback 18" in text
    assert report.agents_lines({}) == ["Not run."]

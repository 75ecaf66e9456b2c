"""The `agents` section's workload: agent sessions that re-send a long prefix, and a control.

Agent session: its own system prompt (a session header, then instructions and tool definitions
written into the prompt: the tiny model has no tool-call parser, and the routing key and the KV
cache see the same text either way), then `turns` calls in sequence, each one the whole history
plus a new user message, the reply appended before the next call. `sessions` such sessions run
at once. Control: the same number of calls, the same prompt length and concurrency, but every
call a fresh prompt (no shared prefix anywhere), so a router can only win there by balancing.

Each call streams (`/v1/chat/completions`, greedy, `ignore_eos`), so TTFT is measured; the
prefix-cache hit rate of a workload is the change of vLLM's own `vllm:prefix_cache_hits_total`
over `vllm:prefix_cache_queries_total`, summed over the engine replicas, read from the ingress's
`/metrics` before and after.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .loadgen import (
    LoadResult,
    RequestResult,
    Tokenizer,
    Workload,
    client_connector,
    iter_sse,
    make_prompt,
)

_REPLICA = re.compile(r'^moe_replica_queue_depth\{replica="([^"]+)"\}', re.M)
_HITS = re.compile(r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\} (\S+)$", re.M)
_DECISIONS = re.compile(r'^moe_routing_decisions_total\{reason="(\w+)"\} (\S+)$', re.M)

#: Tool definitions of an agent, as agent frameworks write them into a prompt.
TOOLS = [
    {
        "name": name,
        "description": f"{name.replace('_', ' ')} for the current task",
        "parameters": {
            "type": "object",
            "properties": {p: {"type": "string", "description": f"the {p}"} for p in params},
            "required": list(params[:1]),
        },
    }
    for name, params in (
        ("search_documents", ("query", "collection", "limit")),
        ("read_file", ("path", "encoding")),
        ("run_sql", ("statement", "database")),
        ("send_message", ("recipient", "subject", "body")),
    )
]


@dataclass(frozen=True)
class AgentWorkload:
    """Shape of one agent run and of its control."""

    sessions: int = 4
    turns: int = 6
    instruction_tokens: int = 320
    user_tokens: int = 12
    max_tokens: int = 16

    @property
    def calls(self) -> int:
        return self.sessions * self.turns


def system_prompt(session: str, tokens: int, tokenizer: Tokenizer | None) -> str:
    """A session's own prompt: its header first (so no two sessions share a prefix), then
    `tokens` tokens of instructions and the tool definitions."""
    seed = int.from_bytes(session.encode()[-4:], "big")
    instructions = make_prompt(seed, tokens, tokenizer)
    return f"Agent session {session}.\n{instructions}\nTools:\n{tool_lines()}"


def tool_lines() -> str:
    """The tool definitions, one compact signature a line (the tiny model's tokenizer spends
    about a token per character of JSON, so the JSON schema would not fit its context)."""
    lines = []
    for tool in TOOLS:
        params = ", ".join(tool["parameters"]["properties"])
        lines.append(f"- {tool['name']}({params}): {tool['description']}")
    return "\n".join(lines)


def prefix_cache(metrics_text: str) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, summed over every replica in the text."""
    totals = {"hits": 0.0, "queries": 0.0}
    for kind, value in _HITS.findall(metrics_text):
        totals[kind] += float(value)
    return totals["hits"], totals["queries"]


def routing_decisions(metrics_text: str) -> dict[str, float]:
    """The ingress's prefix-affinity router decisions so far, by reason (none: router off)."""
    return {reason: float(value) for reason, value in _DECISIONS.findall(metrics_text)}


async def _metrics(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(base_url.rstrip("/") + "/metrics") as rsp:
        return await rsp.text()


async def _call(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float, index: int
) -> tuple[RequestResult, str]:
    """One streamed call: its result (TTFT at the first content chunk) and the reply text."""
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    error: str | None = None
    try:
        async with session.post(url, json=body) as rsp:
            if rsp.status != 200:
                error = f"HTTP {rsp.status}: {(await rsp.text())[:200]}"
            else:
                async for payload in iter_sse(rsp.content):
                    chunk = json.loads(payload)
                    if "error" in chunk and not chunk.get("choices"):
                        error = f"stream error: {str(chunk['error'])[:200]}"
                        break
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text and first is None:
                            first = time.perf_counter()
                        parts.append(text)
    except (aiohttp.ClientError, TimeoutError) as err:
        error = f"{type(err).__name__}: {err}"
    end = time.perf_counter()
    tokens = usage.get("completion_tokens")
    if error is None and tokens is None:
        error = "no usage in the stream"
    ok = error is None
    result = RequestResult(
        index=index,
        ok=ok,
        start_s=start - t0,
        e2e_s=end - start,
        ttft_s=first - start if first is not None else None,
        output_tokens=int(tokens or 0),
        prompt_tokens=usage.get("prompt_tokens"),
        token_source="usage" if tokens is not None else "none",
        error=error,
    )
    return result, "".join(parts)


def _body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class AgentRun:
    """One workload's requests, wall time, prefix-cache counts and routing decisions."""

    result: LoadResult
    hits: float
    queries: float
    decisions: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        out = self.result.summary().as_dict()
        out["prefix_cache_hits"] = self.hits
        out["prefix_cache_queries"] = self.queries
        out["prefix_cache_hit_rate"] = self.hits / self.queries if self.queries else None
        out["routing_decisions"] = self.decisions
        out["failures"] = self.result.failures()
        return out


async def run(
    base_url: str,
    model: str,
    shape: AgentWorkload,
    tokenizer: Tokenizer | None,
    *,
    label: str,
    control: bool,
    timeout_s: float = 300.0,
) -> AgentRun:
    """Agent sessions (or, with `control`, as many unrelated calls) against `base_url`.

    `label` makes every prompt of this run its own (e.g. "r2-affinity"): nothing a replica
    cached in an earlier run can be a prefix of this one's prompts."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    workload = Workload(
        concurrency=shape.sessions,
        max_requests=shape.calls,
        max_seconds=timeout_s,
        max_tokens=shape.max_tokens,
        api="chat",
    )
    out = LoadResult(workload)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(
        connector=client_connector(), timeout=timeout, trust_env=False
    ) as http:
        before = await _metrics(http, base_url)
        hits0, queries0 = prefix_cache(before)
        t0 = time.perf_counter()

        async def agent(s: int) -> None:
            messages = [{"role": "system", "content": ""}]
            for turn in range(shape.turns):
                index = turn * shape.sessions + s
                user = make_prompt(index + 7919, shape.user_tokens, tokenizer)
                if control or turn == 0:
                    # Control: every call a fresh session of one turn with the same prompt size
                    # an agent call at this turn has (system prompt + a history of `turn` turns).
                    session = f"{label}-{s}-{turn if control else 0}"
                    system = system_prompt(session, shape.instruction_tokens, tokenizer)
                    if control:
                        history = turn * (shape.user_tokens + shape.max_tokens)
                        filler = make_prompt(index + 104729, history, tokenizer) if turn else ""
                        messages = [{"role": "system", "content": f"{system}\n{filler}"}]
                    else:
                        messages = [{"role": "system", "content": system}]
                messages.append({"role": "user", "content": f"step {turn}: {user}"})
                result, reply = await _call(
                    http, url, _body(model, messages, shape.max_tokens), t0, index
                )
                out.results.append(result)
                if control:
                    messages = messages[:1]
                else:
                    messages.append({"role": "assistant", "content": reply})

        await asyncio.gather(*(agent(s) for s in range(shape.sessions)))
        out.wall_s = time.perf_counter() - t0
        after = await _metrics(http, base_url)
        hits1, queries1 = prefix_cache(after)
    out.results.sort(key=lambda r: r.index)
    decided0 = routing_decisions(before)
    decisions = {k: v - decided0.get(k, 0.0) for k, v in routing_decisions(after).items()}
    return AgentRun(out, hits1 - hits0, queries1 - queries0, decisions)


def wait_replicas(base_url: str, count: int, timeout_s: float) -> None:
    """Until the ingress's /metrics lists `count` engine replicas (each reports its queue)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
            seen = set(_REPLICA.findall(text))
            if len(seen) >= count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    raise TimeoutError(f"{count} engine replicas not serving after {timeout_s:.0f}s (saw {seen})")

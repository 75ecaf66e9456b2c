"""A tiny fake OpenAI-compatible server (aiohttp, 127.0.0.1) for the load generator's tests.

It is a stand-in for vLLM's server (no engine may run in these tests). It answers
`/v1/completions` and `/v1/chat/completions`, streaming (SSE, one chunk per token, the usage
chunk when `stream_options.include_usage` is set) or not, and produces exactly `max_tokens`
tokens when `ignore_eos` is set (else `natural_tokens`). It records every request body and the
largest number of requests it held at once; knobs make it fail, hang, or hold requests until a
number of them are in flight.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeState:
    """Knobs and records of one fake server."""

    natural_tokens: int = 5
    send_usage: bool = True
    fail_every: int = 0  # answer HTTP 500 to every n-th request (by arrival), 0: never
    hang: bool = False  # never answer
    gate: int = 0  # hold each request until this many are in flight (or 5 s pass)
    metrics: list[str] = field(default_factory=list)  # /metrics answers, one per GET, in order
    peers: list[tuple[str, int]] = field(default_factory=list)  # client address per request
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("state", FakeState)


def _tokens(body: dict[str, Any], state: FakeState) -> int:
    return int(body.get("max_tokens") or 16) if body.get("ignore_eos") else state.natural_tokens


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"]) + 3
    return len(str(body["prompt"]).split())


async def _handle(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    state.bodies.append(body)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    state.peers.append(tuple(peer[:2]) if peer else ("", 0))
    arrival = len(state.bodies)
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    state._changed.set()
    state._changed = asyncio.Event()
    try:
        if state.hang:
            await asyncio.Event().wait()
        if state.gate:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while state.max_in_flight < state.gate and loop.time() < deadline:
                waiter = state._changed
                try:
                    await asyncio.wait_for(waiter.wait(), deadline - loop.time())
                except TimeoutError:
                    break
        if state.fail_every and arrival % state.fail_every == 0:
            return web.json_response({"error": {"message": "injected"}}, status=500)
        n = _tokens(body, state)
        usage = {
            "prompt_tokens": _prompt_tokens(body),
            "completion_tokens": n,
            "total_tokens": _prompt_tokens(body) + n,
        }
        if not body.get("stream"):
            text = "".join(f"t{i} " for i in range(n))
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            payload: dict[str, Any] = {"id": "x", "choices": [choice]}
            if state.send_usage:
                payload["usage"] = usage
            return web.json_response(payload)
        rsp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await rsp.prepare(request)

        async def event(obj: dict[str, Any]) -> None:
            await rsp.write(f"data: {json.dumps(obj)}\n\n".encode())

        await rsp.write(b": keep-alive comment\n\n")
        if chat:  # vLLM's first chat chunk carries the role and an empty content
            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(n):
            delta = {"content": f"t{i} "} if chat else None
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": f"t{i} "}
            await event({"choices": [choice]})
            await asyncio.sleep(0)
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and state.send_usage:
            await event({"choices": [], "usage": usage})
        await rsp.write(b"data: [DONE]\n\n")
        await rsp.write_eof()
        return rsp
    finally:
        state.in_flight -= 1


@asynccontextmanager
async def fake_openai(
    state: FakeState | None = None, keepalive_s: float = 75.0
) -> AsyncIterator[tuple[str, FakeState]]:
    """Serve on 127.0.0.1 (any free port), closing connections idle for `keepalive_s`; yields
    (base URL, state)."""
    st = state or FakeState()
    app = web.Application()
    app[STATE] = st

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _handle(request, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _handle(request, chat=True)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "tiny-moe"}]})

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)

    async def metrics(request: web.Request) -> web.Response:
        texts = request.app[STATE].metrics
        return web.Response(text=texts.pop(0) if texts else "")

    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, shutdown_timeout=0.5, keepalive_timeout=keepalive_s)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", st
    finally:
        await runner.cleanup()

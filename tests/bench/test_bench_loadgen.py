"""The load generator against a fake OpenAI server and a fake gRPC service, both on 127.0.0.1.

No engine runs here: the fake servers (fake_openai.py, and a JSON gRPC service below) stand in
for vLLM so that counts, bounds and the statistics are checked exactly. No timing thresholds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from fake_openai import FakeState, fake_openai

from bench.loadgen import (
    Api,
    GrpcChunk,
    GrpcClient,
    LoadResult,
    NotLoopback,
    OpenAIClient,
    RequestResult,
    Sample,
    Workload,
    check_loopback,
    iter_sse,
    make_prompt,
    percentile,
    run_load,
)

# ------------------------------------------------------------------------------ pure parts


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    assert percentile([10.0, 20.0], 25) == pytest.approx(12.5)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:8000",
        "http://localhost:1/v1",
        "http://[::1]:8000",
        "127.0.0.2:9000",
        "localhost:9000",
    ],
)
def test_loopback_targets_are_accepted(target: str) -> None:
    check_loopback(target)


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1:8000",
        "https://api.openai.com/v1",
        "example.com:9000",
        "http://0.0.0.0:8000",
        "http://:80",
    ],
)
def test_other_targets_are_refused(target: str) -> None:
    with pytest.raises(NotLoopback, match=r"only 127\.0\.0\.1"):
        check_loopback(target)


def test_clients_refuse_remote_targets() -> None:
    with pytest.raises(NotLoopback):
        OpenAIClient("http://192.168.1.10:8000", "m")
    with pytest.raises(NotLoopback):
        GrpcClient("10.1.2.3:9000", lambda ch: ch, JsonAdapter())


class SplitTokenizer:
    """Whitespace words, where words longer than 5 letters count as two tokens."""

    def encode(self, text: str) -> Sequence[int]:
        return [0 for w in text.split() for _ in range(2 if len(w) > 5 else 1)]


def test_prompts_have_a_fixed_length_and_differ_per_request() -> None:
    prompts = [make_prompt(i, 24) for i in range(5)]
    assert all(len(p.split()) == 24 for p in prompts)
    assert len({p.split()[0] for p in prompts}) == 5
    assert make_prompt(3, 24) == make_prompt(3, 24)  # deterministic
    tok = SplitTokenizer()
    for i in range(10):
        assert len(tok.encode(make_prompt(i, 17, tok))) == 17
    with pytest.raises(ValueError):
        make_prompt(0, 0)


def test_workload_rejects_unbounded_or_empty_runs() -> None:
    with pytest.raises(ValueError):
        Workload(concurrency=0, max_requests=1, max_seconds=1)
    with pytest.raises(ValueError):
        Workload(concurrency=1, max_requests=1, max_seconds=0)
    with pytest.raises(ValueError):
        Workload(concurrency=1, max_requests=1, max_seconds=1, max_tokens=0)


def test_summary_aggregates_exactly() -> None:
    w = Workload(concurrency=2, max_requests=10, max_seconds=10)
    res = LoadResult(w, wall_s=2.0, cancelled=1)
    for i in range(4):
        res.results.append(
            RequestResult(
                i,
                True,
                0.0,
                e2e_s=float(i + 1),
                ttft_s=0.1 * (i + 1),
                output_tokens=8,
                prompt_tokens=32,
                token_source="usage",
                error=None,
            )
        )
    res.results.append(RequestResult(4, False, 0.0, 9.0, None, 0, None, "none", "HTTP 500: x"))
    s = res.summary()
    assert (s.sent, s.ok, s.failed, s.cancelled) == (6, 4, 1, 1)
    assert s.requests_per_s == pytest.approx(2.0)
    assert s.output_tokens_per_s == pytest.approx(16.0)
    assert s.e2e_p50_s == pytest.approx(2.5)
    assert s.e2e_p99_s == pytest.approx(3.97)
    assert s.ttft_p50_s == pytest.approx(0.25)
    assert (s.output_tokens_min, s.output_tokens_max) == (8, 8)
    assert s.prompt_tokens == [32] and s.token_sources == ["usage"]
    assert s.errors == ["HTTP 500: x"]


async def test_driver_issues_exactly_max_requests_with_bounded_concurrency() -> None:
    in_flight = 0
    peak = 0
    seen: list[int] = []

    async def send(index: int) -> Sample:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        seen.append(index)
        await asyncio.sleep(0)
        in_flight -= 1
        return Sample(ok=True, output_tokens=index)

    res = await run_load(send, Workload(concurrency=3, max_requests=11, max_seconds=60))
    assert sorted(seen) == list(range(11))
    assert [r.index for r in res.results] == list(range(11))
    assert 1 <= peak <= 3
    assert res.cancelled == 0
    assert res.summary().output_tokens_max == 10


async def test_driver_counts_sender_exceptions_as_failures() -> None:
    async def send(index: int) -> Sample:
        if index % 2:
            raise ConnectionError("reset")
        return Sample(ok=True, output_tokens=4)

    s = (await run_load(send, Workload(concurrency=2, max_requests=6, max_seconds=60))).summary()
    assert (s.ok, s.failed) == (3, 3)
    assert s.errors == ["ConnectionError: reset"]


async def test_sse_parser_handles_comments_multiline_and_done() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b': ping\n\ndata: {"a":\ndata: 1}\n\ndata: [DONE]\n\ndata: {"late": 1}\n\n')
    reader.feed_eof()
    payloads = [p async for p in iter_sse(reader)]  # type: ignore[arg-type]
    assert [json.loads(p) for p in payloads] == [{"a": 1}]


# ------------------------------------------------------------------------- HTTP, for real


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_streaming_requests_measure_ttft_and_usage_tokens(api: Api) -> None:
    async with fake_openai(FakeState(gate=4)) as (url, state):
        w = Workload(
            concurrency=4,
            max_requests=10,
            max_seconds=60,
            max_tokens=12,
            prompt_words=20,
            stream=True,
            api=api,
        )
        async with OpenAIClient(url, "tiny-moe") as client:
            res = await run_load(client.sender(w), w)
    s = res.summary()
    assert (s.sent, s.ok, s.failed, s.cancelled) == (10, 10, 0, 0)
    assert (s.output_tokens_min, s.output_tokens_max) == (12, 12)
    assert s.token_sources == ["usage"]
    assert s.output_tokens_per_s == pytest.approx(s.requests_per_s * 12)
    assert all(r.ttft_s is not None and 0 <= r.ttft_s <= r.e2e_s for r in res.results)
    assert s.ttft_p50_s is not None and s.ttft_p99_s is not None
    assert s.ttft_p50_s <= s.ttft_p99_s
    # What the servers were asked: equal lengths, greedy, usage requested, our model name.
    assert len(state.bodies) == 10
    assert all(
        b["ignore_eos"] is True and b["max_tokens"] == 12 and b["temperature"] == 0.0
        for b in state.bodies
    )
    assert all(b["stream_options"] == {"include_usage": True} for b in state.bodies)
    assert all(b["model"] == "tiny-moe" for b in state.bodies)
    assert state.max_in_flight == 4  # the gate holds requests until 4 are in flight
    if api == "completions":
        assert s.prompt_tokens == [20]


async def test_streaming_without_usage_counts_chunks() -> None:
    async with fake_openai(FakeState(send_usage=False)) as (url, _):
        w = Workload(concurrency=2, max_requests=4, max_seconds=60, max_tokens=7, api="chat")
        async with OpenAIClient(url, "tiny-moe") as client:
            s = (await run_load(client.sender(w), w)).summary()
    assert s.ok == 4 and s.token_sources == ["chunks"]
    assert (s.output_tokens_min, s.output_tokens_max) == (7, 7)  # the empty role chunk not counted


async def test_non_streaming_requests_have_no_ttft() -> None:
    async with fake_openai() as (url, state):
        w = Workload(concurrency=3, max_requests=7, max_seconds=60, max_tokens=9, stream=False)
        async with OpenAIClient(url, "tiny-moe") as client:
            res = await run_load(client.sender(w), w)
    s = res.summary()
    assert (s.sent, s.ok) == (7, 7) and len(state.bodies) == 7
    assert s.ttft_p50_s is None and s.ttft_p99_s is None
    assert s.e2e_p50_s is not None
    assert (s.output_tokens_min, s.output_tokens_max) == (9, 9)
    assert all("stream_options" not in b for b in state.bodies)
    assert 1 <= state.max_in_flight <= 3


async def test_without_ignore_eos_lengths_follow_the_server() -> None:
    async with fake_openai(FakeState(natural_tokens=3)) as (url, state):
        w = Workload(concurrency=1, max_requests=2, max_seconds=60, max_tokens=9, ignore_eos=False)
        async with OpenAIClient(url, "m") as client:
            s = (await run_load(client.sender(w), w)).summary()
    assert s.output_tokens_max == 3
    assert all("ignore_eos" not in b for b in state.bodies)


async def test_http_errors_are_failures_not_samples() -> None:
    async with fake_openai(FakeState(fail_every=3)) as (url, _):
        w = Workload(concurrency=1, max_requests=9, max_seconds=60, stream=True)
        async with OpenAIClient(url, "m") as client:
            s = (await run_load(client.sender(w), w)).summary()
    assert (s.ok, s.failed) == (6, 3)
    assert len(s.errors) == 1 and s.errors[0].startswith("HTTP 500")


async def test_wall_time_bound_cancels_requests_in_flight() -> None:
    async with fake_openai(FakeState(hang=True)) as (url, state):
        w = Workload(concurrency=3, max_requests=100, max_seconds=0.5)
        async with OpenAIClient(url, "m") as client:
            res = await run_load(client.sender(w), w)
    assert res.results == []
    assert res.cancelled == 3  # one per worker; nothing more was issued after the deadline
    assert len(state.bodies) == 3
    assert res.summary().requests_per_s == 0.0


# ------------------------------------------------------------------------- gRPC, for real


def _ser(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _de(data: bytes) -> Any:
    return json.loads(data)


class JsonStub:
    """What generated stubs look like: callables bound to a channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Complete = channel.unary_unary("/fake.Gen/Complete", _ser, _de)
        self.Stream = channel.unary_stream("/fake.Gen/Stream", _ser, _de)


class JsonAdapter:
    async def unary(self, stub: Any, prompt: str, max_tokens: int) -> GrpcChunk:
        reply = await stub.Complete({"prompt": prompt, "max_tokens": max_tokens})
        return GrpcChunk(
            tokens=len(reply["tokens"]),
            completion_tokens=reply["usage"],
            prompt_tokens=len(prompt.split()),
        )

    async def streaming(self, stub: Any, prompt: str, max_tokens: int) -> AsyncIterator[GrpcChunk]:
        async for msg in stub.Stream({"prompt": prompt, "max_tokens": max_tokens}):
            yield GrpcChunk(tokens=len(msg.get("tokens", [])), completion_tokens=msg.get("usage"))


async def _fake_grpc(fail: bool = False) -> tuple[grpc.aio.Server, str, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def complete(req: dict[str, Any], ctx: grpc.aio.ServicerContext) -> dict[str, Any]:
        seen.append(req)
        if fail:
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
        return {"tokens": list(range(req["max_tokens"])), "usage": req["max_tokens"]}

    async def stream(req: dict[str, Any], ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        seen.append(req)
        for i in range(req["max_tokens"]):
            yield {"tokens": [i]}
        yield {"tokens": [], "usage": req["max_tokens"]}

    handler = grpc.method_handlers_generic_handler(
        "fake.Gen",
        {
            "Complete": grpc.unary_unary_rpc_method_handler(complete, _de, _ser),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, _de, _ser),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", seen


@pytest.mark.parametrize("stream", [True, False])
async def test_grpc_variant_through_a_stub_factory(stream: bool) -> None:
    server, address, seen = await _fake_grpc()
    try:
        w = Workload(concurrency=2, max_requests=5, max_seconds=60, max_tokens=6, stream=stream)
        async with GrpcClient(address, JsonStub, JsonAdapter()) as client:
            res = await run_load(client.sender(w), w)
    finally:
        await server.stop(None)
    s = res.summary()
    assert (s.sent, s.ok, s.failed) == (5, 5, 0)
    assert (s.output_tokens_min, s.output_tokens_max) == (6, 6)
    assert s.token_sources == ["usage"]
    assert len(seen) == 5 and all(r["max_tokens"] == 6 for r in seen)
    if stream:
        assert all(r.ttft_s is not None for r in res.results)
    else:
        assert s.ttft_p50_s is None


async def test_grpc_errors_carry_the_status_code() -> None:
    server, address, _ = await _fake_grpc(fail=True)
    try:
        w = Workload(concurrency=1, max_requests=2, max_seconds=60, stream=False)
        async with GrpcClient(address, JsonStub, JsonAdapter()) as client:
            s = (await run_load(client.sender(w), w)).summary()
    finally:
        await server.stop(None)
    assert (s.ok, s.failed) == (0, 2)
    assert s.errors[0].startswith("gRPC UNAVAILABLE")


def test_an_idle_pooled_connection_is_dropped_before_the_server_drops_it() -> None:
    """vLLM's server closes connections idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE in
    vllm/envs.py); aiohttp's pool keeps them 15 s by default, so a request on one that the server
    is closing fails ("Server disconnected", 25 of bare vLLM's requests in the bench run of
    2026-12-05). Here the server keeps connections 3 s: a request 2.5 s after the last one must
    come on a new connection (the client dropped the idle one), not on the server's doomed one."""
    from bench.loadgen import CLIENT_KEEPALIVE_S

    workload = Workload(concurrency=1, max_requests=1, max_seconds=30, prompt_words=4, max_tokens=2)

    async def go() -> list[tuple[str, int]]:
        async with fake_openai(keepalive_s=3.0) as (url, state):
            async with OpenAIClient(url, "tiny-moe") as client:
                send = client.sender(workload)
                assert (await send(0)).ok
                assert (await send(1)).ok  # at once: the pooled connection is reused
                await asyncio.sleep(CLIENT_KEEPALIVE_S + 0.5)
                assert (await send(2)).ok
            return state.peers

    peers = asyncio.run(go())
    assert CLIENT_KEEPALIVE_S + 0.5 < 3.0
    assert peers[0] == peers[1], "back-to-back requests should share a connection"
    assert peers[2] != peers[1], "an idle connection was kept past the client's keep-alive"

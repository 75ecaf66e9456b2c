"""A small asyncio load generator for OpenAI-compatible HTTP servers and gRPC services.

Closed loop: `concurrency` workers each send one request at a time until `max_requests` have
been issued or `max_seconds` have passed, whichever comes first; a request still running at the
deadline is cancelled (counted, not timed), so a run never exceeds its wall-time bound. Targets
must be on the loopback interface: this tool measures servers on this machine only.

Every request has the same prompt length (a fixed number of words, or of tokens when a tokenizer
is given) and the same `max_tokens`, with `ignore_eos` so that every system produces the same
number of output tokens. Output tokens come from the server's `usage` when it reports one, else
from the number of non-empty streamed chunks (which the summary says).

Measured per request: time to first token (streaming only), end-to-end latency, output tokens.
Summarised: p50/p99 of both (linear interpolation between ranks, as numpy's default), requests/s
and output tokens/s over the run's wall time (first send to last completion).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp

Api = Literal["completions", "chat"]

#: Words the tiny checkpoints' tokenizers were trained on, so a word is about one token.
_WORDS = [
    "the",
    "expert",
    "router",
    "token",
    "layer",
    "model",
    "serve",
    "request",
    "queue",
    "replica",
    "engine",
    "rank",
    "gate",
    "weight",
    "tensor",
    "parallel",
    "mixture",
    "sparse",
    "dense",
    "cluster",
    "node",
    "pod",
    "service",
    "operator",
    "deploy",
    "scale",
    "batch",
    "stream",
    "prompt",
    "answer",
    "question",
    "hello",
    "world",
]


class NotLoopback(ValueError):
    """A target outside this machine's loopback interface."""


def check_loopback(target: str) -> str:
    """Return the host of `target` (URL or host:port) if it is loopback, else raise."""
    text = target if "://" in target else f"//{target}"
    host = urlsplit(text).hostname or ""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise NotLoopback(
        f"refusing to load {target!r}: only 127.0.0.1, ::1 or localhost targets are allowed "
        "(the benchmark measures servers on this machine)"
    )


# ----------------------------------------------------------------------------------- prompts


class Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...


def make_prompt(index: int, words: int, tokenizer: Tokenizer | None = None) -> str:
    """A deterministic prompt; with a tokenizer, exactly `words` tokens when reachable.

    The first word varies with `index`, so consecutive requests do not share a whole prompt
    (prefix caching would otherwise turn every prefill after the first into a cache hit).
    """
    if words < 1:
        raise ValueError("prompt length must be at least 1")
    if tokenizer is None:
        return " ".join(_WORDS[(index + i * 7) % len(_WORDS)] for i in range(words))
    # Add words while they fit: the first word that does not overshoot the count is taken.
    chosen: list[str] = []
    count = 0
    step = 0
    while count < words:
        for j in range(len(_WORDS)):
            trial = [*chosen, _WORDS[(index + step * 7 + j) % len(_WORDS)]]
            n = len(tokenizer.encode(" ".join(trial)))
            if n <= words:
                chosen, count = trial, n
                break
        else:
            break  # no word fits any more: the closest reachable length
        step += 1
    return " ".join(chosen)


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Workload:
    """One cell of a sweep: how much load, of what shape, for how long at most."""

    concurrency: int
    max_requests: int
    max_seconds: float
    prompt_words: int = 32
    max_tokens: int = 32
    stream: bool = True
    api: Api = "completions"
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_requests < 1 or self.max_seconds <= 0:
            raise ValueError("concurrency, max_requests and max_seconds must be positive")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")


@dataclass(frozen=True)
class Sample:
    """What a sender observed for one request (times are `time.perf_counter()` values)."""

    ok: bool
    output_tokens: int = 0
    first_token_at: float | None = None
    prompt_tokens: int | None = None
    token_source: Literal["usage", "chunks", "none"] = "none"
    error: str | None = None


@dataclass(frozen=True)
class RequestResult:
    index: int
    ok: bool
    start_s: float  # from the start of the run
    e2e_s: float
    ttft_s: float | None
    output_tokens: int
    prompt_tokens: int | None
    token_source: str
    error: str | None


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Aggregates of one run (latencies in seconds)."""

    concurrency: int
    stream: bool
    api: str
    sent: int
    ok: int
    failed: int
    cancelled: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    output_tokens_min: int | None
    output_tokens_max: int | None
    prompt_tokens: list[int]
    token_sources: list[str]
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadResult:
    workload: Workload
    results: list[RequestResult] = field(default_factory=list)
    cancelled: int = 0
    wall_s: float = 0.0

    def failures(self) -> list[dict[str, Any]]:
        """Every failed request with its error (cancelled ones are counted in `cancelled`)."""
        return [
            {"index": r.index, "start_s": round(r.start_s, 3), "error": r.error or "unknown"}
            for r in self.results
            if not r.ok
        ]

    def output_tokens(self) -> int:
        """Output tokens of the successful requests."""
        return sum(r.output_tokens for r in self.results if r.ok)

    def summary(self) -> Summary:
        good = [r for r in self.results if r.ok]
        bad = [r for r in self.results if not r.ok]
        wall = self.wall_s if self.wall_s > 0 else float("nan")
        tokens = [r.output_tokens for r in good]
        ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
        e2es = [r.e2e_s for r in good]
        return Summary(
            concurrency=self.workload.concurrency,
            stream=self.workload.stream,
            api=self.workload.api,
            sent=len(self.results) + self.cancelled,
            ok=len(good),
            failed=len(bad),
            cancelled=self.cancelled,
            wall_s=self.wall_s,
            requests_per_s=len(good) / wall if good else 0.0,
            output_tokens_per_s=sum(tokens) / wall if good else 0.0,
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            e2e_p50_s=percentile(e2es, 50),
            e2e_p99_s=percentile(e2es, 99),
            output_tokens_min=min(tokens) if tokens else None,
            output_tokens_max=max(tokens) if tokens else None,
            prompt_tokens=sorted({r.prompt_tokens for r in good if r.prompt_tokens is not None}),
            token_sources=sorted({r.token_source for r in good}),
            errors=sorted({r.error for r in bad if r.error})[:5],
        )


# ------------------------------------------------------------------------------- the driver

#: Sends request number `index` and reports what it saw.
Sender = Callable[[int], Awaitable[Sample]]


async def run_load(send: Sender, workload: Workload) -> LoadResult:
    """Drive `send` with `workload.concurrency` workers within both bounds."""
    out = LoadResult(workload)
    issued = 0
    t0 = time.perf_counter()
    deadline = t0 + workload.max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < workload.max_requests:
            start = time.perf_counter()
            remaining = deadline - start
            if remaining <= 0:
                return
            index = issued
            issued += 1
            try:
                sample = await asyncio.wait_for(send(index), timeout=remaining)
            except TimeoutError:
                out.cancelled += 1  # still running at the wall-time bound
                return
            except Exception as err:  # a sender bug or a transport error: a failed request
                sample = Sample(ok=False, error=f"{type(err).__name__}: {err}")
            end = time.perf_counter()
            ttft = sample.first_token_at - start if sample.first_token_at is not None else None
            out.results.append(
                RequestResult(
                    index=index,
                    ok=sample.ok,
                    start_s=start - t0,
                    e2e_s=end - start,
                    ttft_s=ttft,
                    output_tokens=sample.output_tokens,
                    prompt_tokens=sample.prompt_tokens,
                    token_source=sample.token_source,
                    error=sample.error,
                )
            )

    workers = min(workload.concurrency, workload.max_requests)
    await asyncio.gather(*(worker() for _ in range(workers)))
    out.wall_s = time.perf_counter() - t0
    out.results.sort(key=lambda r: r.index)
    return out


# ---------------------------------------------------------------------------- OpenAI / HTTP


def _request_body(
    workload: Workload, model: str, prompt: str, extra: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": workload.max_tokens,
        "temperature": 0.0,
        "stream": workload.stream,
    }
    if workload.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; equal output lengths across systems
    if workload.stream:
        body["stream_options"] = {"include_usage": True}
    if workload.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(extra or {})
    return body


def _chunk_text(choice: dict[str, Any], api: Api) -> str:
    if api == "chat":
        delta = choice.get("delta") or choice.get("message") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


async def iter_sse(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-events body, up to `[DONE]`."""
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                payload = "\n".join(data)
                data = []
                if payload == "[DONE]":
                    return
                yield payload
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data and "\n".join(data) != "[DONE]":
        yield "\n".join(data)


#: How long the client keeps an idle pooled connection. Below every server's own keep-alive:
#: vLLM's uvicorn closes idle connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, vllm/envs.py),
#: Serve's proxy after 90 s (DEFAULT_UVICORN_KEEP_ALIVE_TIMEOUT_S, ray/serve/_private/
#: constants.py), while aiohttp keeps one 15 s by default (aiohttp/connector.py). With the
#: default, a cell that reuses a connection idle since an earlier cell races the server's close
#: and fails with "ServerDisconnectedError" before the server ever sees the request: bare vLLM
#: lost 25 of its 980 requests that way in the run of 2026-12-05 12:36, nobody else any.
CLIENT_KEEPALIVE_S = 2.0


def client_connector() -> aiohttp.TCPConnector:
    """A connection pool with no cap beyond the workload's concurrency and idle connections
    dropped before any server drops them (CLIENT_KEEPALIVE_S)."""
    return aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE_S)


class OpenAIClient:
    """Sends workload requests to `/v1/completions` or `/v1/chat/completions` with aiohttp."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer: Tokenizer | None = None,
        api_key: str | None = None,
        extra_body: dict[str, Any] | None = None,
        request_timeout_s: float = 600.0,
    ) -> None:
        check_loopback(base_url)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.tokenizer = tokenizer
        self.extra_body = extra_body
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        # No connection cap beyond the workload's own concurrency; no proxies from the env.
        connector = client_connector()
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, trust_env=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def sender(self, workload: Workload) -> Sender:
        path = "/v1/chat/completions" if workload.api == "chat" else "/v1/completions"
        url = self.base_url + path

        async def send(index: int) -> Sample:
            assert self._session is not None, "use `async with OpenAIClient(...)`"
            prompt = make_prompt(index, workload.prompt_words, self.tokenizer)
            body = _request_body(workload, self.model, prompt, self.extra_body)
            async with self._session.post(url, json=body, headers=self.headers) as rsp:
                if rsp.status != 200:
                    text = (await rsp.text())[:200]
                    return Sample(ok=False, error=f"HTTP {rsp.status}: {text}")
                if workload.stream:
                    return await self._read_stream(rsp, workload.api)
                payload = await rsp.json()
                return _sample_from_usage(payload, None)

        return send

    @staticmethod
    async def _read_stream(rsp: aiohttp.ClientResponse, api: Api) -> Sample:
        first_text_at: float | None = None
        first_choice_at: float | None = None
        chunks_with_text = 0
        usage: dict[str, Any] | None = None
        async for payload in iter_sse(rsp.content):
            now = time.perf_counter()
            chunk = json.loads(payload)
            if "error" in chunk and not chunk.get("choices"):
                return Sample(ok=False, error=f"stream error: {str(chunk['error'])[:200]}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if first_choice_at is None:
                    first_choice_at = now
                if _chunk_text(choice, api):
                    chunks_with_text += 1
                    if first_text_at is None:
                        first_text_at = now
        first = first_text_at if first_text_at is not None else first_choice_at
        if usage and usage.get("completion_tokens") is not None:
            return _sample_from_usage({"usage": usage}, first)
        return Sample(
            ok=chunks_with_text > 0,
            output_tokens=chunks_with_text,
            first_token_at=first,
            token_source="chunks",
            error=None if chunks_with_text else "empty stream",
        )


def _sample_from_usage(payload: dict[str, Any], first_token_at: float | None) -> Sample:
    usage = payload.get("usage") or {}
    completion = usage.get("completion_tokens")
    if completion is None:
        return Sample(ok=False, first_token_at=first_token_at, error="no usage in the response")
    return Sample(
        ok=True,
        output_tokens=int(completion),
        first_token_at=first_token_at,
        prompt_tokens=usage.get("prompt_tokens"),
        token_source="usage",
    )


# ------------------------------------------------------------------------------------- gRPC


@dataclass(frozen=True)
class GrpcChunk:
    """One message of a gRPC reply: tokens it carries, and the final count if it says one."""

    tokens: int
    completion_tokens: int | None = None
    prompt_tokens: int | None = None


class GrpcAdapter(Protocol):
    """Maps the workload onto a concrete gRPC API (see grpc_target.py for moe.inference.v1)."""

    def unary(self, stub: Any, prompt: str, max_tokens: int) -> Awaitable[GrpcChunk]: ...

    def streaming(self, stub: Any, prompt: str, max_tokens: int) -> AsyncIterator[GrpcChunk]: ...


class GrpcClient:
    """Sends workload requests over a `grpc.aio` channel through a stub factory + adapter."""

    def __init__(
        self,
        address: str,
        stub_factory: Callable[[Any], Any],
        adapter: GrpcAdapter,
        *,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        check_loopback(address)
        self.address = address
        self.stub_factory = stub_factory
        self.adapter = adapter
        self.tokenizer = tokenizer
        self._channel: Any = None
        self._stub: Any = None

    async def __aenter__(self) -> GrpcClient:
        import grpc

        # No proxy, whatever the environment says: loopback only.
        self._channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.enable_http_proxy", 0)]
        )
        self._stub = self.stub_factory(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def sender(self, workload: Workload) -> Sender:
        async def send(index: int) -> Sample:
            assert self._stub is not None, "use `async with GrpcClient(...)`"
            prompt = make_prompt(index, workload.prompt_words, self.tokenizer)
            try:
                if not workload.stream:
                    reply = await self.adapter.unary(self._stub, prompt, workload.max_tokens)
                    return _sample_from_grpc([reply], None)
                first: float | None = None
                replies: list[GrpcChunk] = []
                async for chunk in self.adapter.streaming(self._stub, prompt, workload.max_tokens):
                    if first is None and chunk.tokens > 0:
                        first = time.perf_counter()
                    replies.append(chunk)
                return _sample_from_grpc(replies, first)
            except Exception as err:
                code = getattr(err, "code", None)
                name = code().name if callable(code) else type(err).__name__
                return Sample(ok=False, error=f"gRPC {name}: {str(err)[:200]}")

        return send


def _sample_from_grpc(chunks: list[GrpcChunk], first: float | None) -> Sample:
    final = next((c for c in reversed(chunks) if c.completion_tokens is not None), None)
    prompt = next((c.prompt_tokens for c in reversed(chunks) if c.prompt_tokens is not None), None)
    source: Literal["usage", "chunks"] = "chunks"
    tokens = sum(c.tokens for c in chunks)
    if final is not None and final.completion_tokens is not None:
        tokens, source = final.completion_tokens, "usage"
    return Sample(
        ok=tokens > 0,
        output_tokens=tokens,
        first_token_at=first,
        prompt_tokens=prompt,
        token_source=source,
        error=None if tokens > 0 else "no tokens in the reply",
    )

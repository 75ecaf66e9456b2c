"""Reliability of the served app under load, overload, bad input, disconnects and replica death.

One local Ray cluster and one served app (the tiny Gemma-4 MoE, TP=2 + EP=2, a small admission
queue of 2 running + 2 waiting, API-key auth on) for the whole module; all traffic on loopback
through the real HTTP and gRPC proxies. Every loop is bounded in count and in time; every client
call has a timeout, and a call that hits it is counted as lost (a hang). Each test adds a row of
figures to the summary table printed at the end (see conftest.py). The replica-death and
engine-death tests, then the rolling change, run late: each replaces the engine replica; the
last test force-stops the Ray cluster.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest

from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as pb_grpc
from tests.support.appconfig import tiny_app_config
from tests.support.served import Served, full_queue, running_app
from tests.support.waiting import change_under_load, poll_until, wait_until

from .conftest import Report, Row

pytestmark = pytest.mark.engine

APP = "moe-rel"
MODEL = "tiny-moe"
KEY_ENV = "MOE_RELIABILITY_API_KEY"
KEY = "rel-test-key-0123456789"
MAX_ONGOING, MAX_QUEUED = 2, 2
MAX_MODEL_LEN = 2048
LONG = 1900  # tokens: many seconds of generation, far longer than a test needs to act
CALL_TIMEOUT_S = 120.0  # client bound of one call: beyond it the call counts as lost
PROMPT = "The expert router sends a token to"
GRPC_SERVICE = "/moe.inference.v1.InferenceService/"


# ---- outcomes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str  # ok | rejected (503/RESOURCE_EXHAUSTED) | client_error (4xx) | failed | lost
    detail: str


def _tally(row: Row, outcomes: list[Outcome], clean: tuple[str, ...] = ("rejected",)) -> None:
    for outcome in outcomes:
        row.sent += 1
        if outcome.kind == "ok":
            row.ok += 1
        elif outcome.kind in clean:
            row.rejected += 1
        elif outcome.kind == "lost":
            row.lost += 1
        else:
            row.failed += 1


def _auth(key: str | None = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key is not None else {}


def http_call(
    base: str,
    path: str,
    *,
    body: Any = None,
    content: bytes | None = None,
    key: str | None = KEY,
    timeout: float = CALL_TIMEOUT_S,
) -> Outcome:
    """One HTTP request; a streaming body is read to its end (`[DONE]`, no error event)."""
    headers = {"content-type": "application/json", **_auth(key)}
    raw = content if content is not None else json.dumps(body).encode()
    stream = isinstance(body, dict) and body.get("stream") is True
    try:
        with (
            httpx.Client(timeout=timeout) as client,
            client.stream("POST", f"{base}{path}", content=raw, headers=headers) as response,
        ):
            if response.status_code != 200 or not stream:
                response.read()
                return _http_outcome(response)
            done, error = False, ""
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line:
                    error = line[:200]
            if error or not done:
                return Outcome("failed", error or "stream ended without [DONE]")
            return Outcome("ok", "200 stream")
    except httpx.TimeoutException as exc:
        return Outcome("lost", f"timeout: {exc!r}")
    except httpx.HTTPError as exc:
        return Outcome("failed", f"transport: {exc!r}")


def _http_outcome(response: httpx.Response) -> Outcome:
    status = response.status_code
    text = f"{status} {response.text[:200]}"
    if status == 200:
        return Outcome("ok", text)
    if status == 503 and response.headers.get("retry-after"):
        return Outcome("rejected", text)
    if 400 <= status < 500:
        return Outcome("client_error", text)
    return Outcome("failed", text)


_GRPC_CLIENT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def _grpc_outcome(exc: grpc.RpcError) -> Outcome:
    code = exc.code()
    text = f"{code.name} {exc.details()}"[:250]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Outcome("rejected", text)
    if code in _GRPC_CLIENT_CODES or code == grpc.StatusCode.UNAUTHENTICATED:
        return Outcome("client_error", text)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Outcome("lost", text)
    return Outcome("failed", text)


def grpc_call(
    channel: grpc.Channel,
    method: str,
    request: Any,
    *,
    key: str | None = KEY,
    timeout: float = CALL_TIMEOUT_S,
) -> Outcome:
    """One gRPC call (a stream is read to its end); raw `bytes` go out unserialized."""
    metadata = tuple(_auth(key).items())
    try:
        if isinstance(request, bytes):
            call = channel.unary_unary(GRPC_SERVICE + method)
            call(request, metadata=metadata, timeout=timeout)
            return Outcome("ok", "OK")
        stub = pb_grpc.InferenceServiceStub(channel)
        if method == "Generate":
            chunks = list(stub.Generate(request, metadata=metadata, timeout=timeout))
            return Outcome("ok" if chunks else "failed", f"{len(chunks)} chunks")
        getattr(stub, method)(request, metadata=metadata, timeout=timeout)
        return Outcome("ok", "OK")
    except grpc.RpcError as exc:
        return _grpc_outcome(exc)


# ---- the served app -----------------------------------------------------------------------------


def _engine_outcomes(served: Served) -> dict[str, float]:
    """Requests the engine replica has finished since it started, by outcome (/metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    outcomes: dict[str, float] = {}
    for family in text_string_to_metric_families(served.metrics(headers=_auth())):
        for sample in family.samples if family.name == "moe_engine_requests" else ():
            if sample.name == "moe_engine_requests_total":  # summed over replicas
                outcome = sample.labels["outcome"]
                outcomes[outcome] = outcomes.get(outcome, 0) + sample.value
    return outcomes


@dataclass(frozen=True)
class Replica:
    """The engine replica's actor (Ray name) and its process tree (the vLLM ranks)."""

    name: str
    pid: int
    started: float  # process create_time: a restart changes it
    children: tuple[int, ...]

    def rss(self) -> int:
        procs = [psutil.Process(self.pid), *(psutil.Process(c) for c in self.children)]
        total = 0
        for proc in procs:
            with suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total


def ray_named_actors() -> list[dict[str, Any]]:
    import ray

    actors: list[dict[str, Any]] = ray.util.list_named_actors(all_namespaces=True)
    return actors


def engine_replica(timeout_s: float = 60) -> Replica:
    """The one live LLMEngine replica: its Ray actor name and its process (by Ray's proctitle)."""
    import ray

    marker = f"ServeReplica:{APP}:LLMEngine"

    def look() -> tuple[list[str], list[psutil.Process]]:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#LLMEngine#")
        ]
        procs = []
        for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
            cmdline = " ".join(proc.info["cmdline"] or ())
            if marker in cmdline and "ray::" in cmdline:
                procs.append(proc)
        # vLLM's forked children can inherit the title: the replica is the topmost of them.
        pids = {p.pid for p in procs}
        return names, [p for p in procs if p.ppid() not in pids]

    names, tops = wait_until(
        look,
        timeout_s,
        0.5,
        "no single engine replica (actors, processes)",
        ok=lambda found: len(found[0]) == 1 and len(found[1]) == 1,
    )
    top = tops[0]
    children = tuple(c.pid for c in top.children(recursive=True))
    return Replica(names[0], top.pid, top.info["create_time"], children)


@pytest.fixture(scope="module")
def served(tiny_gemma4: Path) -> Iterator[Served]:
    config = tiny_app_config(
        tiny_gemma4,
        APP,
        served_model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        max_ongoing_requests=MAX_ONGOING,
        max_queued_requests=MAX_QUEUED,
        api_key_env=KEY_ENV,
    )
    # The local raylet, hence every Serve actor, inherits this process's environment.
    os.environ[KEY_ENV] = KEY
    try:
        with running_app(config, "moe-reliability") as served:
            yield served
    finally:
        os.environ.pop(KEY_ENV, None)


def _completion(max_tokens: int = 6, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": stream}
    return {**body, **extra}


def _chat(max_tokens: int = 6, stream: bool = False, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Which expert handles this token?"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    return {**body, **extra}


def _grpc_complete(max_tokens: int = 6, **sampling: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling)
    )


def _grpc_chat(max_tokens: int = 6) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="hi")],
        sampling=pb.SamplingParams(max_tokens=max_tokens),
    )


# ---- 1. steady load -----------------------------------------------------------------------------


def test_steady_load_http_and_grpc_has_no_failures(served: Served, report: Report) -> None:
    served.wait_depth(lambda d: d["total"] == 0, timeout_s=600)  # first call: engine start-up
    channel = served.channel()
    kinds: list[Callable[[], Outcome]] = [
        lambda: http_call(served.http, "/v1/completions", body=_completion()),
        lambda: http_call(served.http, "/v1/chat/completions", body=_chat(stream=True)),
        lambda: grpc_call(channel, "Complete", _grpc_complete()),
        lambda: http_call(served.http, "/v1/completions", body=_completion(stream=True)),
        lambda: grpc_call(channel, "Generate", pb.GenerateRequest(completion=_grpc_complete())),
        lambda: http_call(served.http, "/v1/chat/completions", body=_chat()),
        lambda: grpc_call(channel, "Chat", _grpc_chat()),
    ]
    duration_s, per_worker, workers = 25.0, 60, 3  # below the 2 + 2 admission bound
    end = time.monotonic() + duration_s

    def worker(index: int) -> list[Outcome]:
        outcomes = []
        for i in range(per_worker):
            if time.monotonic() > end:
                break
            outcomes.append(kinds[(index + i * workers) % len(kinds)]())
        return outcomes

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        results = [o for part in pool.map(worker, range(workers)) for o in part]
    elapsed = time.monotonic() - started
    channel.close()
    row = report.row("1 steady load (HTTP+gRPC, 3 clients)")
    _tally(row, results)
    row.notes.append(f"{len(results) / elapsed:.1f} req/s over {elapsed:.0f}s, max_tokens 6")
    bad = [o for o in results if o.kind != "ok"]
    assert results and not bad, bad[:5]


# ---- 2. overload --------------------------------------------------------------------------------


def test_overload_answers_or_refuses_cleanly_and_memory_stays_bounded(
    served: Served, report: Report
) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    replica = engine_replica()
    rss_before = replica.rss()
    before = served.depth()
    channel = served.channel()
    n_http, n_grpc = 48, 16
    gate = threading.Barrier(n_http + n_grpc, timeout=60)

    def one(i: int) -> Outcome:
        gate.wait()
        if i < n_http:
            path, body = (
                ("/v1/completions", _completion(8, stream=i % 2 == 0, ignore_eos=True))
                if i % 3
                else ("/v1/chat/completions", _chat(8, stream=i % 2 == 0, ignore_eos=True))
            )
            return http_call(served.http, path, body=body)
        if i % 2:
            return grpc_call(channel, "Complete", _grpc_complete(8, ignore_eos=True))
        request = pb.GenerateRequest(completion=_grpc_complete(8, ignore_eos=True))
        return grpc_call(channel, "Generate", request)

    with ThreadPoolExecutor(n_http + n_grpc) as pool:
        results = list(pool.map(one, range(n_http + n_grpc)))
    served.wait_depth(lambda d: d["total"] == 0)
    after_normal = http_call(served.http, "/v1/completions", body=_completion(4))
    after_grpc = grpc_call(channel, "Complete", _grpc_complete(4))
    channel.close()
    rss_after = replica.rss()
    rejected_total = served.depth()["rejected_total"] - before["rejected_total"]

    row = report.row(f"2 overload ({n_http} HTTP + {n_grpc} gRPC at once, queue 2+2)")
    _tally(row, results)
    row.notes += [
        f"replica RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB",
        f"replica rejected_total +{rejected_total}",
        f"after: HTTP {after_normal.kind}, gRPC {after_grpc.kind}",
    ]
    unclean = [o for o in results if o.kind not in ("ok", "rejected")]
    assert not unclean, unclean[:5]
    assert row.ok >= 1 and row.rejected >= 1, "the overload never reached the queue bound"
    assert after_normal.kind == "ok" and after_grpc.kind == "ok", (after_normal, after_grpc)
    assert engine_replica() == replica  # the same replica process survived
    assert rss_after < 1.5 * rss_before + 500 * 2**20


# ---- 3. bad-input fuzz --------------------------------------------------------------------------
# Oracle: every case is built from a valid request by one mutation whose validity is stated
# next to it: "bad" must get a 4xx (HTTP) / INVALID_ARGUMENT or NOT_FOUND (gRPC), "ok" a success,
# "any" either of those (both are defensible readings of the API). Nothing may get a 5xx.

_HUGE_PROMPT = "hello world " * 3000  # > max_model_len tokens

_HTTP_FIELD_MUTATIONS: list[tuple[str, Any, str]] = [
    ("max_tokens", -1, "bad"),
    ("max_tokens", 0, "bad"),
    ("max_tokens", 10**9, "bad"),
    ("max_tokens", 2**70, "bad"),
    ("max_tokens", "many", "bad"),
    ("max_tokens", 1.5, "bad"),
    ("max_tokens", [4], "bad"),
    ("max_tokens", 3, "ok"),
    ("temperature", -1, "bad"),
    ("temperature", float("nan"), "bad"),
    ("temperature", float("inf"), "bad"),
    ("temperature", float("-inf"), "bad"),
    ("temperature", "hot", "bad"),
    ("temperature", 0.7, "ok"),
    ("temperature", 0, "ok"),
    ("top_p", 1.5, "bad"),
    ("top_p", -0.1, "bad"),
    ("top_p", float("nan"), "bad"),
    ("top_p", 0.5, "ok"),
    ("top_k", -5, "bad"),
    ("top_k", "k", "bad"),
    ("top_k", 5, "ok"),
    ("n", 10**6, "bad"),
    ("n", 0, "bad"),
    ("n", -3, "bad"),
    ("seed", "s", "bad"),
    ("seed", 12345, "ok"),
    ("stop", 5, "bad"),
    ("stop", ["x", "y"], "ok"),
    ("presence_penalty", 9.0, "bad"),
    ("repetition_penalty", float("inf"), "bad"),
    ("logprobs", 10**6, "bad"),
    ("stream", "maybe", "bad"),
    ("model", "nope", "bad"),
    ("model", 5, "bad"),
    ("model", None, "ok"),  # the one served model
    ("unknown_field_xyz", 1, "ok"),  # vLLM ignores unknown fields (as OpenAI's API does)
]
_HTTP_COMPLETION_MUTATIONS: list[tuple[str, Any, str]] = [
    ("prompt", "", "bad"),
    ("prompt", _HUGE_PROMPT, "bad"),
    ("prompt", [], "bad"),
    ("prompt", [[]], "bad"),
    ("prompt", None, "bad"),
    ("prompt", 123, "bad"),
    ("prompt", {"a": 1}, "bad"),
    ("prompt", [10**9], "bad"),  # a token id far beyond the vocabulary
    ("prompt", [-1, 2], "bad"),
    ("prompt", [5, 6, 7], "ok"),
    ("prompt", ["a b", "c"], "ok"),
    ("prompt", "émoji 🚀 \u200b ünïcode", "ok"),
    ("prompt", "nul \u0000 char", "ok"),
    ("echo", "yes please", "bad"),
]
_HTTP_CHAT_MUTATIONS: list[tuple[str, Any, str]] = [
    ("messages", [], "bad"),
    ("messages", "hi", "bad"),
    ("messages", None, "bad"),
    ("messages", [{"content": "no role"}], "bad"),
    ("messages", [{"role": "user", "content": 5}], "bad"),
    ("messages", [{"role": "user", "content": _HUGE_PROMPT}], "bad"),
    ("messages", [{"role": "alien", "content": "x"}], "any"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "ok"),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": 5}}, "bad"),
    ("tools", "not a list", "bad"),
    ("tool_choice", "bogus", "bad"),
]
_RAW_BODIES: list[tuple[str, bytes, str]] = [
    ("bad JSON", b"{oops", "bad"),
    ("empty body", b"", "bad"),
    ("single-quoted JSON", b"{'prompt': 'x'}", "bad"),
    ("truncated JSON", b'{"prompt": "x", "max_tokens": ', "bad"),
    ("JSON array", b"[1, 2]", "bad"),
    ("JSON string", b'"prompt"', "bad"),
    ("JSON null", b"null", "bad"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe\xc3\x28", "max_tokens": 2}', "bad"),
    ("lone surrogate escape", b'{"prompt": "\\ud800", "max_tokens": 2}', "any"),
    ("deep nesting", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "bad"),
    ("oversized 2 MB", json.dumps({"prompt": "ab " * 700_000, "max_tokens": 2}).encode(), "bad"),
]


def _http_fuzz_cases(count: int, seed: int) -> list[tuple[str, str, Any, bytes | None, str]]:
    """(label, path, body, raw bytes or None, expectation): seeded, bounded."""
    rng = random.Random(seed)
    cases: list[tuple[str, str, Any, bytes | None, str]] = []
    # Every mutation once, then random picks (sometimes two mutations: "bad" wins over "ok").
    for name, value, expect in _HTTP_FIELD_MUTATIONS + _HTTP_COMPLETION_MUTATIONS:
        cases.append(
            (f"completion {name}={value!r:.40}", "/v1/completions", {name: value}, None, expect)
        )
    for name, value, expect in _HTTP_CHAT_MUTATIONS:
        cases.append(
            (f"chat {name}={value!r:.40}", "/v1/chat/completions", {name: value}, None, expect)
        )
    for label, raw, expect in _RAW_BODIES:
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        cases.append((label, path, None, raw, expect))
    while len(cases) < count:
        chat = rng.random() < 0.4
        pool = _HTTP_FIELD_MUTATIONS + (
            _HTTP_CHAT_MUTATIONS if chat else _HTTP_COMPLETION_MUTATIONS
        )
        picks = rng.sample(pool, rng.choice([1, 2]))
        if len({p[0] for p in picks}) < len(picks):
            continue
        expects = {p[2] for p in picks}
        expect = "bad" if "bad" in expects else "any" if "any" in expects else "ok"
        label = ("chat " if chat else "completion ") + ", ".join(
            f"{n}={v!r:.30}" for n, v, _ in picks
        )
        path = "/v1/chat/completions" if chat else "/v1/completions"
        cases.append((label, path, {n: v for n, v, _ in picks}, None, expect))
    return cases[:count]


def _http_fuzz_body(path: str, mutation: dict[str, Any]) -> bytes:
    base = _chat(4) if path.endswith("chat/completions") else _completion(4)
    if mutation.get("stream") is True:
        mutation = {**mutation, "stream": False}
    body = {**base, **mutation}
    if "temperature" not in mutation and mutation.get("n") not in (None, 0):
        body["temperature"] = 0.7  # n > 1 needs sampling
    body = {k: v for k, v in body.items() if v is not None or k not in ("model",)}
    return json.dumps(body).encode()  # NaN/Infinity go out as Python's json does


_GRPC_SAMPLING_MUTATIONS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": 0}, "bad"),
    ({"max_tokens": 2**32 - 1}, "bad"),
    ({"max_tokens": 3}, "ok"),
    ({"temperature": float("nan")}, "bad"),
    ({"temperature": float("inf")}, "bad"),
    ({"temperature": -1.0}, "bad"),
    ({"temperature": 0.5}, "ok"),
    ({"top_p": 1.5}, "bad"),
    ({"top_p": 0.0}, "bad"),
    ({"top_p": float("nan")}, "bad"),
    ({"top_p": 0.9}, "ok"),
    ({"top_k": -7}, "bad"),
    ({"top_k": 3}, "ok"),
    ({"n": 0}, "bad"),
    ({"n": 10**6, "temperature": 0.5}, "bad"),
    ({"n": 2, "temperature": 0.5}, "ok"),
    ({"repetition_penalty": float("inf")}, "bad"),
    ({"presence_penalty": 50.0}, "bad"),
    ({"seed": -(2**63)}, "any"),
    ({"stop": ["\n", "ü🚀"]}, "ok"),
]
_GRPC_REQUEST_MUTATIONS: list[tuple[str, Callable[[], Any], str]] = [
    ("empty prompt", lambda: pb.CompleteRequest(prompt=""), "bad"),
    ("huge prompt", lambda: pb.CompleteRequest(prompt=_HUGE_PROMPT), "bad"),
    ("prompt and ids", lambda: pb.CompleteRequest(prompt="a", prompt_token_ids=[5]), "bad"),
    ("ids beyond vocab", lambda: pb.CompleteRequest(prompt_token_ids=[4_000_000_000]), "bad"),
    ("ids ok", lambda: pb.CompleteRequest(prompt_token_ids=[5, 6, 7]), "ok"),
    ("unknown model", lambda: pb.CompleteRequest(model="nope", prompt="x"), "bad"),
    ("extra_json bad", lambda: pb.CompleteRequest(prompt="x", extra_json="{"), "bad"),
    ("extra_json list", lambda: pb.CompleteRequest(prompt="x", extra_json="[1]"), "bad"),
    (
        "extra_json clash",
        lambda: pb.CompleteRequest(prompt="x", extra_json='{"prompt": "y"}'),
        "bad",
    ),
    (
        "extra_json bad value",
        lambda: pb.CompleteRequest(prompt="x", extra_json='{"logprobs": -5}'),
        "bad",
    ),
    ("extra_json NaN", lambda: pb.CompleteRequest(prompt="x", extra_json='{"min_p": NaN}'), "bad"),
    ("chat no messages", lambda: pb.ChatRequest(), "bad"),
    (
        "chat tools_json bad",
        lambda: pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], tools_json="{"),
        "bad",
    ),
    (
        "chat response_format bad",
        lambda: pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="x")],
            response_format_json='{"type": "json_schema", "json_schema": {"schema": 5}}',
        ),
        "bad",
    ),
    (
        "chat tool_calls_json bad",
        lambda: pb.ChatRequest(
            messages=[pb.ChatMessage(role="assistant", content="", tool_calls_json="{")]
        ),
        "bad",
    ),
    (
        "chat ok",
        lambda: pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="ünï 🚀")]),
        "ok",
    ),
    ("generate without input", lambda: pb.GenerateRequest(), "bad"),
    # Not protobuf at all: the proxy passes the bytes on and the ingress refuses them.
    ("garbage protobuf bytes", lambda: b"\xff\xff\xff\x0f garbage", "bad"),
    ("truncated protobuf bytes", lambda: b"\x12\x10abc", "bad"),
]


def _grpc_fuzz_cases(count: int, seed: int) -> list[tuple[str, str, Any, str]]:
    """(label, method, request, expectation): seeded, bounded."""
    rng = random.Random(seed)
    cases: list[tuple[str, str, Any, str]] = []

    def with_sampling(request: Any, sampling: dict[str, Any]) -> Any:
        params = pb.SamplingParams(**{"max_tokens": 4, **sampling})
        if isinstance(request, pb.CompleteRequest | pb.ChatRequest):
            request.sampling.CopyFrom(params)
        return request

    def method_for(request: Any, stream: bool) -> tuple[str, Any]:
        if isinstance(request, bytes):
            return "Complete", request
        if isinstance(request, pb.GenerateRequest):
            return "Generate", request
        if stream:
            field = "completion" if isinstance(request, pb.CompleteRequest) else "chat"
            return "Generate", pb.GenerateRequest(**{field: request})
        return ("Complete" if isinstance(request, pb.CompleteRequest) else "Chat"), request

    for label, make, expect in _GRPC_REQUEST_MUTATIONS:
        request = make()
        if not isinstance(request, bytes | pb.GenerateRequest):
            request = with_sampling(request, {})
        method, request = method_for(request, stream=False)
        cases.append((label, method, request, expect))
    for sampling, expect in _GRPC_SAMPLING_MUTATIONS:
        request = with_sampling(pb.CompleteRequest(prompt=PROMPT), sampling)
        cases.append((f"sampling {sampling}", "Complete", request, expect))
    while len(cases) < count:
        label, make, req_expect = rng.choice(_GRPC_REQUEST_MUTATIONS)
        sampling, s_expect = rng.choice(_GRPC_SAMPLING_MUTATIONS)
        request = make()
        if isinstance(request, bytes | pb.GenerateRequest):
            continue
        request = with_sampling(request, sampling)
        method, request = method_for(request, stream=rng.random() < 0.3)
        expects = {req_expect, s_expect}
        expect = "bad" if "bad" in expects else "any" if "any" in expects else "ok"
        cases.append((f"{method} {label} + {sampling}", method, request, expect))
    return cases[:count]


def _matches(outcome: Outcome, expect: str) -> bool:
    if expect == "ok":
        return outcome.kind == "ok"
    if expect == "bad":
        return outcome.kind == "client_error"
    return outcome.kind in ("ok", "client_error")


def test_bad_input_fuzz_gets_client_errors_never_5xx(served: Served, report: Report) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    replica = engine_replica()
    http_cases = _http_fuzz_cases(150, seed=7)
    grpc_cases = _grpc_fuzz_cases(150, seed=11)
    channel = served.channel()

    def run_http(case: tuple[str, str, Any, bytes | None, str]) -> tuple[str, str, Outcome]:
        label, path, mutation, raw, expect = case
        content = raw if raw is not None else _http_fuzz_body(path, mutation)
        return label, expect, http_call(served.http, path, content=content, timeout=60)

    def run_grpc(case: tuple[str, str, Any, str]) -> tuple[str, str, Outcome]:
        label, method, request, expect = case
        return label, expect, grpc_call(channel, method, request, timeout=60)

    # Three clients at a time: within the 2 + 2 admission bound, so no 503 muddles the oracle.
    with ThreadPoolExecutor(3) as pool:
        http_results = list(pool.map(run_http, http_cases))
        grpc_results = list(pool.map(run_grpc, grpc_cases))
    channel.close()
    after = engine_replica()

    for proto, results in (("HTTP", http_results), ("gRPC", grpc_results)):
        row = report.row(f"3 bad-input fuzz {proto} (seeded)")
        _tally(row, [o for _, _, o in results], clean=("client_error",))
        expected_bad = sum(1 for _, e, _ in results if e == "bad")
        row.notes.append(f"{expected_bad} meant to be refused, rest valid/either")
        wrong = [(label, e, o) for label, e, o in results if not _matches(o, e)]
        if wrong:
            row.notes.append(f"{len(wrong)} off the oracle")
    mismatches = [
        (label, expect, o)
        for label, expect, o in http_results + grpc_results
        if not _matches(o, expect)
    ]
    assert not mismatches, "\n".join(f"{lbl}: want {e}, got {o}" for lbl, e, o in mismatches[:20])
    assert after == replica, f"the replica was restarted: {replica} -> {after}"


# ---- 4. disconnects and deadlines ---------------------------------------------------------------


def test_disconnects_and_deadlines_free_engine_slots(served: Served, report: Report) -> None:
    # Every earlier request ended in the replica too (`in_replica`): vLLM can be empty while the
    # replica still books the last one's outcome, which would land in this phase's count.
    served.wait_depth(lambda d: d["total"] == 0 and d["in_replica"] == 0)
    before = served.depth()
    outcomes_before = _engine_outcomes(served)
    cut = 0
    long_body = _completion(LONG, stream=True, ignore_eos=True)
    long_chat = _chat(LONG, stream=True, ignore_eos=True)
    headers = _auth()
    # HTTP streams cut by the client after their first chunk (two at once: both run in vLLM).
    with ExitStack() as stack:
        for path, body in (("/v1/completions", long_body), ("/v1/chat/completions", long_chat)):
            client = stack.enter_context(httpx.Client(timeout=60))
            response = stack.enter_context(
                client.stream("POST", f"{served.http}{path}", json=body, headers=headers)
            )
            assert response.status_code == 200
            next(response.iter_lines())
            cut += 1
    # A non-streaming HTTP request whose client gives up (read timeout) mid-generation.
    timed_out = http_call(
        served.http, "/v1/completions", body=_completion(LONG, ignore_eos=True), timeout=2.0
    )
    assert timed_out.kind == "lost", timed_out  # the client's bound, as intended
    cut += 1
    channel = served.channel()
    stub = pb_grpc.InferenceServiceStub(channel)
    metadata = tuple(_auth().items())
    long_request = _grpc_complete(LONG, ignore_eos=True)
    # gRPC stream cancelled by the client after its first chunk.
    call = stub.Generate(pb.GenerateRequest(completion=long_request), metadata=metadata)
    next(call)
    call.cancel()
    cut += 1
    # gRPC unary and streaming calls past their deadline.
    deadlines = [
        grpc_call(channel, "Complete", long_request, timeout=1.5),
        grpc_call(channel, "Generate", pb.GenerateRequest(completion=long_request), timeout=2.5),
    ]
    assert all(d.detail.startswith("DEADLINE_EXCEEDED") for d in deadlines), deadlines
    cut += len(deadlines)

    served.wait_depth(lambda d: d["in_engine"] == 0 and d["queued"] == 0 and d["in_replica"] == 0)
    after = served.depth()
    cancelled = after["cancelled_total"] - before["cancelled_total"]
    outcomes_after = _engine_outcomes(served)
    # Requests that reached the engine replica in this phase, by how they ended there. A cut
    # request may never reach it (a deadline that expires at the proxy or ingress): fine.
    reached = {
        outcome: n - outcomes_before.get(outcome, 0)
        for outcome, n in outcomes_after.items()
        if n != outcomes_before.get(outcome, 0)
    }
    # No admission slot leaked: 2 + 2 long streams fill the engine and the queue again.
    with full_queue(served, long_body, MAX_ONGOING, MAX_QUEUED, headers) as statuses:
        pass  # filled: the replica reported them running and queued
    served.wait_depth(lambda d: d["total"] == 0)
    final = http_call(served.http, "/v1/completions", body=_completion(4))
    channel.close()

    row = report.row("4 disconnects + deadlines (HTTP cut/timeout, gRPC cancel/deadline)")
    row.sent, row.ok = cut, 0
    row.rejected = cancelled  # requests the replica cancelled: slots given back
    row.notes += [
        f"{cut} cut by client, replica cancelled {cancelled}"
        f" ({cut - int(sum(reached.values()))} never reached it)",
        f"engine back to 0; queue refilled to {MAX_ONGOING}+{MAX_QUEUED} (no leaked slot)",
        f"after: {final.kind}",
    ]
    # Every cut request that reached the replica was cancelled there (none ran on to its end),
    # and the three that had streamed a first chunk surely reached it. (A stream whose client
    # left while a chunk was being sent used to run on: its generator's `finally` waited for
    # the garbage collector; EngineCall.cancel_when_task_ends.)
    assert set(reached) == {"cancelled"}, reached
    assert reached["cancelled"] == cancelled, (reached, cancelled)
    assert 3 <= cancelled <= cut, f"{cut} requests cut, {cancelled} cancelled in the replica"
    assert statuses.count(200) == MAX_ONGOING + MAX_QUEUED, statuses
    assert final.kind == "ok", final


# ---- 6. API-key auth (the whole module runs with auth on) --------------------------------------


def test_api_key_is_required_on_every_openai_path_and_grpc_method(
    served: Served, report: Report
) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    outcomes: list[Outcome] = []
    wrong = 0
    http_requests: list[tuple[str, str, Any]] = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", _completion(3)),
        ("POST", "/v1/chat/completions", _chat(3)),
        ("POST", "/v1/completions", _completion(3, stream=True)),
        ("POST", "/v1/chat/completions", _chat(3, stream=True)),
    ]
    for method, path, body in http_requests:
        for key, want in ((None, 401), ("wrong-key", 401), (KEY, 200)):
            headers = _auth(key)
            with httpx.Client(timeout=60) as client:
                response = client.request(
                    method, f"{served.http}{path}", json=body, headers=headers
                )
            if response.status_code != want:
                wrong += 1
                outcomes.append(Outcome("failed", f"{path} key={key}: {response.status_code}"))
            else:
                outcomes.append(Outcome("ok" if want == 200 else "rejected", path))
            if want == 200 and body and body.get("stream"):
                assert response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
    health = httpx.get(f"{served.http}/health", timeout=30)
    outcomes.append(Outcome("ok" if health.status_code == 200 else "failed", "/health open"))
    channel = served.channel()
    grpc_requests: list[tuple[str, Any]] = [
        ("Complete", _grpc_complete(3)),
        ("Chat", _grpc_chat(3)),
        ("Generate", pb.GenerateRequest(completion=_grpc_complete(3))),
        ("ListModels", pb.ListModelsRequest()),
    ]
    for method, request in grpc_requests:
        for key, want_ok in ((None, False), ("wrong-key", False), (KEY, True)):
            outcome = grpc_call(channel, method, request, key=key, timeout=60)
            good = outcome.kind == "ok" if want_ok else outcome.detail.startswith("UNAUTHENTICATED")
            if not good:
                wrong += 1
                outcomes.append(Outcome("failed", f"{method} key={key}: {outcome.detail}"))
            else:
                outcomes.append(Outcome("ok" if want_ok else "rejected", method))
    grpc_health = grpc_call(channel, "Health", pb.HealthRequest(), key=None, timeout=30)
    outcomes.append(grpc_health if grpc_health.kind == "ok" else Outcome("failed", "Health"))
    channel.close()
    row = report.row("6 API-key auth (5 HTTP paths, 4 gRPC methods, x no/wrong/right key)")
    _tally(row, outcomes)
    row.notes.append("no/wrong key -> 401/UNAUTHENTICATED; /health and gRPC Health open")
    failures = [o for o in outcomes if o.kind == "failed"]
    assert not failures and wrong == 0, failures


# ---- 5. replica death (last: it restarts the engine) --------------------------------------------


def _death_under_load(
    served: Served, report: Report, label: str, kill: Callable[[Replica], list[int]]
) -> None:
    """Fill the engine and its queue with long requests (HTTP and gRPC, streaming and not),
    `kill` part of the replica (it returns the pids that must die with it), then probe until
    a new replica serves. In flight: clean retryable failures; after: clean refusals until
    the replacement serves; no process of the old replica left behind."""
    served.wait_depth(lambda d: d["total"] == 0)
    old = engine_replica()
    channel = served.channel()
    long_body = _completion(LONG, stream=True, ignore_eos=True)
    in_flight: list[Callable[[], Outcome]] = [
        lambda: http_call(served.http, "/v1/completions", body=long_body),
        lambda: http_call(served.http, "/v1/completions", body=_completion(LONG, ignore_eos=True)),
        lambda: grpc_call(
            channel,
            "Generate",
            pb.GenerateRequest(completion=_grpc_complete(LONG, ignore_eos=True)),
        ),
        lambda: grpc_call(channel, "Complete", _grpc_complete(LONG, ignore_eos=True)),
    ]
    pool = ThreadPoolExecutor(len(in_flight))
    futures = [pool.submit(f) for f in in_flight]
    served.wait_depth(lambda d: d["in_engine"] == MAX_ONGOING and d["queued"] == MAX_QUEUED)

    must_die = kill(old)
    killed_at = time.monotonic()
    flight = [f.result(timeout=CALL_TIMEOUT_S + 30) for f in futures]
    pool.shutdown()

    # New requests until one succeeds (bounded): before that, only clean refusals are allowed.
    probes: list[Outcome] = []
    recovered_s: float | None = None
    # A request sent while no replica is up waits in Serve's router for the new one: the
    # client's bound is what is left of the 240 s recovery budget.
    while len(probes) < 200 and (left := 240 - (time.monotonic() - killed_at)) > 5:
        probe = http_call(served.http, "/v1/completions", body=_completion(4), timeout=left)
        probes.append(probe)
        if probe.kind == "ok":
            recovered_s = time.monotonic() - killed_at
            break
        time.sleep(1.0)
    after_grpc = grpc_call(channel, "Complete", _grpc_complete(4))
    probes.append(after_grpc)
    channel.close()
    new = engine_replica() if recovered_s is not None else None
    # The old replica's processes must not outlive it (bounded wait).
    orphans = poll_until(
        lambda: [p for p in must_die if psutil.pid_exists(p)], 60, 1.0, ok=lambda left: not left
    )

    row = report.row(label)
    _tally(row, flight + probes)
    row.notes += [
        f"in flight at kill: {sum(o.kind != 'ok' for o in flight)} of {len(flight)} failed "
        f"({', '.join(o.detail[:24] for o in flight)})",
        f"probes after kill: {len(probes) - 1}, refused cleanly "
        f"{sum(o.kind == 'rejected' for o in probes)}",
        f"recovered in {recovered_s:.0f}s" if recovered_s is not None else "NOT recovered",
        f"processes of the old replica left: {len(orphans)}",
    ]
    assert not [o for o in flight if o.kind == "lost"], flight  # none hangs
    # In flight at the kill: a retryable 503 + Retry-After / UNAVAILABLE (or an SSE error
    # event saying so), never a bare 500 / INTERNAL.
    unclear = [o for o in flight if o.kind not in ("ok", "rejected") and not _retryable(o)]
    assert not unclear, unclear
    assert recovered_s is not None, probes[-3:]
    unclean = [o for o in probes if o.kind not in ("ok", "rejected")]
    assert not unclean, f"new requests after the kill failed: {unclean[:5]}"
    assert after_grpc.kind == "ok", after_grpc
    assert new is not None and new.name != old.name and new.pid != old.pid
    assert not orphans, f"processes of the old replica still alive: {orphans}"


def _retryable(outcome: Outcome) -> bool:
    """A failure that tells the client to retry: 503 (status or SSE error event), UNAVAILABLE."""
    detail = outcome.detail
    return detail.startswith(("503", "UNAVAILABLE")) or '"code": 503' in detail


def test_replica_death_fails_only_in_flight_requests_and_recovers(
    served: Served, report: Report
) -> None:
    import ray

    def kill_actor(replica: Replica) -> list[int]:
        ray.kill(ray.get_actor(replica.name, namespace="serve"), no_restart=True)
        return [replica.pid, *replica.children]

    _death_under_load(
        served, report, "5 replica death (ray.kill of the engine replica, 4 in flight)", kill_actor
    )


def test_engine_process_death_fails_cleanly_and_the_replica_is_replaced(
    served: Served, report: Report
) -> None:
    """vLLM's engine core process dies (OOM killer, a crash) while the replica actor lives:
    the replica answers 503 / UNAVAILABLE instead of 500s, fails its health check, and Serve
    replaces it."""

    def kill_engine_core(replica: Replica) -> list[int]:
        cores = [
            proc
            for proc in psutil.Process(replica.pid).children(recursive=True)
            if "EngineCore" in " ".join(proc.cmdline() or (proc.name(),))
        ]
        assert len(cores) == 1, f"no single vLLM engine core under the replica: {cores}"
        core = cores[0]
        ranks = [child.pid for child in core.children(recursive=True)]
        core.kill()
        return [core.pid, *ranks, replica.pid]

    _death_under_load(
        served,
        report,
        "5b engine process death (SIGKILL of vLLM's engine core, 4 in flight)",
        kill_engine_core,
    )


# ---- 7. rolling config change -------------------------------------------------------------------


def test_rolling_config_change_under_load_fails_no_request(served: Served, report: Report) -> None:
    """A changed application config deployed over the running one (what KubeRay does with a
    changed serveConfigV2: the same controller call as `serve.run`) while HTTP and gRPC clients
    keep sending: Serve replaces the replicas and every request gets its answer."""
    from ray import serve

    from moe_serving.app import build_app

    served.wait_depth(lambda d: d["total"] == 0)
    old = engine_replica()
    new_config = served.config.model_copy(
        update={"request_timeout_s": served.config.request_timeout_s + 30}
    )
    stop = threading.Event()
    outcomes: list[Outcome] = []
    channel = served.channel()

    def client(protocol: str) -> None:
        for _ in range(400):  # bounded; the roll ends long before
            if stop.is_set():
                return
            if protocol == "http":
                outcome = http_call(served.http, "/v1/completions", body=_completion(4))
            else:
                outcome = grpc_call(channel, "Complete", _grpc_complete(4))
            outcomes.append(outcome)

    def rolled() -> tuple[Any, list[str]]:
        app = serve.status().applications.get(APP)
        names = [
            a["name"]
            for a in ray_named_actors()
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#LLMEngine#")
        ]
        return app, names

    def roll() -> None:
        serve.run(
            build_app(new_config.model_dump(mode="json")),
            name=APP,
            route_prefix="/",
            blocking=False,
        )
        # Rolled: a new engine replica (the old one is gone) and the app RUNNING again.
        wait_until(
            rolled,
            420,
            1.0,
            "no new engine replica RUNNING (app, replicas)",
            ok=lambda r: (
                r[0] is not None and r[0].status == "RUNNING" and r[1] and old.name not in r[1]
            ),
        )

    threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in ("http", "grpc")]
    for thread in threads:
        thread.start()
    try:
        # Load flows before the change, while it rolls and after it, on the new replica.
        during, rolled_s = change_under_load(outcomes, roll)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CALL_TIMEOUT_S + 30)
        channel.close()
    new = engine_replica()
    row = report.row("7 rolling config change (new app config over the running one)")
    _tally(row, outcomes, clean=())
    row.notes += [
        f"{during} answered while it rolled ({rolled_s:.0f}s)",
        f"engine replica replaced: {new.name != old.name}",
    ]
    assert new.name != old.name and new.pid != old.pid
    assert during > 0, "no request was answered while the config rolled"
    not_ok = [o for o in outcomes if o.kind != "ok"]
    assert not_ok == [], not_ok[:5]


# ---- 8. Ray force-stopped (last: it ends the cluster) -------------------------------------------


def test_force_stopped_ray_leaves_no_engine_process(served: Served, report: Report) -> None:
    """`ray stop --force` SIGKILLs Ray's processes, the replica's among them, with no chance to
    shut its engine down. vLLM's engine core and ranks are not Ray's: they must still go (the
    moe_die_with_parent vLLM plugin), not live on re-parented to init."""
    replica = engine_replica()
    engine = list(replica.children)
    assert engine, "the replica has no vLLM processes to watch"
    served.stopped = True  # the fixture must not call into the dead cluster
    stopped = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "stop", "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    _, alive = psutil.wait_procs(
        [psutil.Process(pid) for pid in engine if psutil.pid_exists(pid)], 60
    )
    row = report.row("8 Ray force-stopped (ray stop --force)")
    row.notes.append(f"vLLM processes of the replica left: {len(alive)} of {len(engine)}")
    for proc in alive:
        proc.kill()
    assert not alive, f"engine processes outlived the cluster: {alive}"

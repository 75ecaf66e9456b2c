"""Tracing and metrics of the served app end to end: Ray Serve, vLLM with TP=2 + EP=2.

One Ray cluster and one app for the module, with tracing exported both to a JSONL file and over
OTLP/HTTP to a receiver run by this test on 127.0.0.1 (ingress and engine are separate Ray actors,
so an in-memory exporter would not be visible here). Every request of the module is checked for a
complete trace: moe.ingress -> moe.engine -> vLLM's llm_request.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from otlp_receiver import OtlpReceiver

from moe_serving.proto import inference_pb2 as pb
from tests.support.appconfig import tiny_app_config
from tests.support.served import Served, running_app
from tests.support.waiting import wait_until

pytestmark = pytest.mark.engine

IMBALANCE_WINDOW_S = 4.0  # short, so that one test's traffic leaves the window quickly
MODEL = "tiny-moe"
SECRET_PROMPT = "zebra quartz lantern orbit"  # must never appear in a span by default


@dataclass(kw_only=True)
class Traced(Served):
    """A served app exporting its spans to a JSONL file and to an OTLP receiver."""

    jsonl: Path
    receiver: OtlpReceiver

    def spans(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]

    def trace(
        self, trace_id: str, ok: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 60
    ) -> list[dict[str, Any]]:
        """Spans of a trace once `ok` holds (exports are asynchronous; only a hang fails)."""
        return wait_until(
            lambda: [s for s in self.spans() if s["trace_id"] == trace_id],
            timeout_s,
            0.2,
            f"trace {trace_id} incomplete",
            ok=ok,
        )


@pytest.fixture(scope="module")
def served(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    jsonl = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    with OtlpReceiver() as receiver:
        config = tiny_app_config(
            tiny_gemma4,
            "moe-obs",
            served_model_name=MODEL,
            max_model_len=1024,
            tensor_parallel_size=2,
            enable_expert_parallel=True,
            imbalance_window_s=IMBALANCE_WINDOW_S,
            tracing={
                "enabled": True,
                "endpoint": receiver.endpoint,
                "protocol": "http/protobuf",
                "jsonl_path": str(jsonl),
            },
        )
        with running_app(config, "moe-obs-tests", Traced, jsonl=jsonl, receiver=receiver) as app:
            yield app


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"expected one {name} span, got {found}"
    return found[0]


def _has(*names: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda spans: all(any(s["name"] == n for s in spans) for n in names)


def _complete_tree(spans: list[dict[str, Any]], caller_span: str | None) -> dict[str, Any]:
    """Checks ingress -> engine -> llm_request links; returns the engine span."""
    ingress = _one(spans, "moe.ingress")
    engine = _one(spans, "moe.engine")
    vllm = _one(spans, "llm_request")
    assert ingress["parent_span_id"] == caller_span
    assert engine["parent_span_id"] == ingress["span_id"]
    assert vllm["parent_span_id"] == engine["span_id"]
    assert ingress["status"] == engine["status"] == "OK"
    assert engine["attributes"]["moe.parallel.ep"] == 2
    assert engine["attributes"]["moe.parallel.tp"] == 2
    assert engine["attributes"]["gen_ai.request.model"] == MODEL
    assert engine["attributes"]["moe.replica"]
    assert engine["attributes"]["moe.queue_wait_s"] >= 0
    assert engine["attributes"]["moe.time_to_first_token_s"] > 0
    return engine


def _no_prompt_anywhere(spans: list[dict[str, Any]]) -> None:
    for span in spans:
        assert SECRET_PROMPT not in json.dumps(span["attributes"]), span


def test_http_completion_joins_the_callers_trace(served: Traced) -> None:
    traceparent, trace_id, caller_span = _traceparent()
    out = served.client(max_retries=0).completions.create(
        model=MODEL,
        prompt=SECRET_PROMPT,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
        extra_headers={"traceparent": traceparent},
    )
    assert out.usage is not None
    spans = served.trace(trace_id, _has("moe.ingress", "moe.engine", "llm_request"))
    engine = _complete_tree(spans, caller_span)
    assert engine["attributes"]["gen_ai.usage.prompt_tokens"] == out.usage.prompt_tokens
    assert engine["attributes"]["gen_ai.usage.completion_tokens"] == 5
    assert engine["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    assert _one(spans, "moe.ingress")["attributes"]["http.response.status_code"] == 200
    _no_prompt_anywhere(spans)
    # The same spans also went over OTLP/HTTP (vLLM's included).
    want = {s["span_id"] for s in spans}
    wait_until(
        lambda: {s["span_id"] for s in served.receiver.snapshot()},
        60,
        0.5,
        "spans never reached the OTLP receiver",
        ok=want.issubset,
    )


def test_http_streamed_chat_without_traceparent_is_a_new_root(served: Traced) -> None:
    before = {s["trace_id"] for s in served.spans()}
    stream = served.client(max_retries=0).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": SECRET_PROMPT}],
        max_tokens=4,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) >= 1
    new = wait_until(
        lambda: [
            s
            for s in served.spans()
            if s["trace_id"] not in before
            and s["name"] == "moe.ingress"
            and s["attributes"]["moe.endpoint"] == "/v1/chat/completions"
        ],
        60,
        0.2,
        "no new moe.ingress span",
    )
    assert len(new) == 1 and new[0]["attributes"]["moe.endpoint"] == "/v1/chat/completions"
    spans = served.trace(new[0]["trace_id"], _has("moe.engine", "llm_request"))
    engine = _complete_tree(spans, None)
    assert engine["attributes"]["moe.stream"] is True
    assert engine["attributes"]["gen_ai.usage.completion_tokens"] == 4
    _no_prompt_anywhere(spans)


def test_grpc_unary_and_streaming_take_traceparent_from_metadata(served: Traced) -> None:
    stub = served.stub()
    sampling = pb.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    traceparent, trace_id, caller = _traceparent()
    reply = stub.Complete(
        pb.CompleteRequest(model=MODEL, prompt=SECRET_PROMPT, sampling=sampling),
        metadata=[("traceparent", traceparent)],
    )
    assert reply.choices
    spans = served.trace(trace_id, _has("moe.ingress", "moe.engine", "llm_request"))
    _complete_tree(spans, caller)
    assert _one(spans, "moe.ingress")["attributes"]["rpc.grpc.status_code"] == "OK"
    _no_prompt_anywhere(spans)

    traceparent, trace_id, caller = _traceparent()
    request = pb.GenerateRequest(
        completion=pb.CompleteRequest(model=MODEL, prompt=SECRET_PROMPT, sampling=sampling)
    )
    chunks = list(stub.Generate(request, metadata=[("traceparent", traceparent)]))
    assert chunks
    spans = served.trace(trace_id, _has("moe.ingress", "moe.engine", "llm_request"))
    engine = _complete_tree(spans, caller)
    assert engine["attributes"]["gen_ai.usage.completion_tokens"] == 3
    assert _one(spans, "moe.ingress")["attributes"]["rpc.method"] == "Generate"


def test_endpoints_besides_generation_have_spans_too(served: Traced) -> None:
    for path in ("/health", "/metrics", "/v1/models", "/v1/moe/state"):
        traceparent, trace_id, caller = _traceparent()
        response = httpx.get(f"{served.http}{path}", headers={"traceparent": traceparent})
        assert response.status_code == 200, (path, response.text[:300])
        ingress = _one(served.trace(trace_id, _has("moe.ingress")), "moe.ingress")
        assert ingress["parent_span_id"] == caller
        assert ingress["attributes"]["http.route"] == path
        assert ingress["attributes"]["http.request.method"] == "GET"
        assert ingress["attributes"]["http.response.status_code"] == 200
        assert ingress["status"] == "OK"
    stub = served.stub()
    for method, call in (
        ("Health", lambda md: stub.Health(pb.HealthRequest(), metadata=md)),
        ("ListModels", lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md)),
    ):
        traceparent, trace_id, caller = _traceparent()
        call([("traceparent", traceparent)])
        ingress = _one(served.trace(trace_id, _has("moe.ingress")), "moe.ingress")
        assert ingress["parent_span_id"] == caller
        assert ingress["attributes"]["rpc.method"] == method
        assert ingress["attributes"]["rpc.grpc.status_code"] == "OK"


def test_failed_requests_have_error_spans(served: Traced) -> None:
    # Refused by the ingress (unknown model): the trace is the ingress span alone.
    traceparent, trace_id, caller = _traceparent()
    with pytest.raises(openai.BadRequestError):
        served.client(max_retries=0).completions.create(
            model="nope", prompt="x", extra_headers={"traceparent": traceparent}
        )
    ingress = _one(served.trace(trace_id, _has("moe.ingress")), "moe.ingress")
    assert ingress["parent_span_id"] == caller and ingress["status"] == "ERROR"
    assert ingress["attributes"]["http.response.status_code"] == 400

    # Refused by the engine (vLLM's validation): ingress and engine spans, both errors.
    traceparent, trace_id, caller = _traceparent()
    with pytest.raises(openai.BadRequestError):
        served.client(max_retries=0).completions.create(
            model=MODEL, prompt="x", temperature=-1, extra_headers={"traceparent": traceparent}
        )
    spans = served.trace(trace_id, _has("moe.ingress", "moe.engine"))
    ingress, engine = _one(spans, "moe.ingress"), _one(spans, "moe.engine")
    assert engine["parent_span_id"] == ingress["span_id"]
    assert engine["status"] == ingress["status"] == "ERROR"
    assert engine["attributes"]["moe.outcome"] == "invalid_request"

    # gRPC with an unknown model: NOT_FOUND on the ingress span.
    traceparent, trace_id, caller = _traceparent()
    with pytest.raises(grpc.RpcError) as info:
        served.stub().Complete(
            pb.CompleteRequest(model="nope", prompt="x"), metadata=[("traceparent", traceparent)]
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    ingress = _one(served.trace(trace_id, _has("moe.ingress")), "moe.ingress")
    assert ingress["status"] == "ERROR"
    assert ingress["attributes"]["rpc.grpc.status_code"] == "NOT_FOUND"


_RANK = re.compile(r'^moe_ep_rank_tokens_total\{[^}]*ep_rank="(\d+)"[^}]*\} (\S+)$', re.M)
_EXPERT = re.compile(r"^moe_expert_tokens_total\{[^}]*\} (\S+)$", re.M)


def _rank_counts(text: str) -> dict[str, float]:
    return {rank: float(v) for rank, v in _RANK.findall(text)}


def test_expert_load_counts_every_routed_token_on_both_ep_ranks(served: Traced) -> None:
    config = json.loads((served.model_dir / "config.json").read_text())
    text_config = config.get("text_config", config)
    layers, top_k = text_config["num_hidden_layers"], text_config["top_k_experts"]
    before = _rank_counts(served.metrics())
    new_tokens = 6
    out = served.client(max_retries=0).completions.create(
        model=MODEL,
        prompt="a prompt used by no other test: expert load " + secrets.token_hex(4),
        max_tokens=new_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage is not None
    # The forward passes: the prompt once, then each generated token but the last.
    tokens = out.usage.prompt_tokens + new_tokens - 1
    expected = tokens * top_k * layers

    def routed() -> tuple[str, dict[str, float], float]:
        text = served.metrics()
        after = _rank_counts(text)
        return text, after, sum(after.values()) - sum(before.values())

    text, after, _ = wait_until(
        routed,
        60,
        0.3,
        lambda r: f"routed {r[2]} != {expected} ({before} -> {r[1]})",
        ok=lambda r: r[2] == expected,
    )
    assert set(after) == {"0", "1"}
    assert all(after[r] > before.get(r, 0) for r in after), (before, after)
    assert sum(float(v) for v in _EXPERT.findall(text)) == sum(after.values())


def test_bounded_imbalance_signals_and_live_state(served: Traced) -> None:
    """After routed traffic (the test above), the per-layer imbalance series cover every MoE
    layer, the replica's worst layer is >= 1, and GET /v1/moe/state carries the engine's
    worst-layer imbalance for the operator's status (moe_serving.imbalance)."""
    config = json.loads((served.model_dir / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    rank_re = re.compile(r'^moe_layer_rank_imbalance\{[^}]*layer="(\d+)"[^}]*\} (\S+)$', re.M)
    worst_re = re.compile(r"^moe_ep_imbalance_worst\{[^}]*\} (\S+)$", re.M)

    def read() -> tuple[str, dict[str, Any]]:
        # Traffic on every read: the signals cover a short window (IMBALANCE_WINDOW_S).
        served.client().completions.create(
            model=MODEL, prompt="imbalance " + secrets.token_hex(4), max_tokens=4, temperature=0
        )
        return served.metrics(), httpx.get(f"{served.http}/v1/moe/state", timeout=30).json()

    def complete(got: tuple[str, dict[str, Any]]) -> bool:
        text, state = got
        layers_seen = {layer for layer, _ in rank_re.findall(text)}
        return (
            len(layers_seen) == layers
            and bool(worst_re.search(text))
            and bool(state["load"].get("expert_imbalance"))
        )

    text, state = wait_until(read, 60, 1.0, "imbalance signals never appeared", ok=complete)
    load = state["load"]
    worst = worst_re.search(text)
    assert worst is not None
    assert all(float(v) >= 1.0 for _, v in rank_re.findall(text))
    assert float(worst.group(1)) >= 1.0
    assert load["expert_imbalance"] >= 1.0
    hot = re.findall(r'^moe_layer_hot_expert_share\{[^}]*place="1"[^}]*\} (\S+)$', text, re.M)
    assert len(hot) == layers and all(0 < float(v) <= 1 for v in hot)
    print(f"\nworst-layer EP imbalance {worst.group(1)}, live {load['expert_imbalance']}")


def _mean_expert_imbalance(served: Traced) -> float | None:
    """Mean over MoE layers of max/mean tokens over experts, in the current window."""
    values = [
        float(v)
        for v in re.findall(r"^moe_layer_expert_imbalance\{[^}]*\} (\S+)$", served.metrics(), re.M)
    ]
    return sum(values) / len(values) if values else None


def _idle_window(served: Traced) -> None:
    """Let the imbalance window pass with no traffic: the signals then cover nothing."""
    wait_until(
        lambda: _mean_expert_imbalance(served) is None,
        IMBALANCE_WINDOW_S * 4 + 10,
        1.0,
        "the window never emptied",
    )


def test_skewed_routing_raises_the_expert_imbalance_signal(served: Traced) -> None:
    """Prompts of one repeated token drive the router to the same few experts at every
    position; varied text spreads tokens over the experts. The bounded signal (max/mean over a
    layer's experts, moe_layer_expert_imbalance) must rise for the first over the second. The
    model and greedy routing are deterministic, so the comparison is too."""
    client = served.client()

    def traffic(prompts: list[str]) -> float:
        for prompt in prompts:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        return wait_until(
            lambda: _mean_expert_imbalance(served), 30, 0.5, "no imbalance signal after traffic"
        )

    _idle_window(served)
    varied = traffic(
        [
            "the quick brown fox jumps over the lazy dog near river banks",
            "expert parallel serving splits experts across ranks of one engine",
            "1 2 3 4 5 6 7 8 9 10 eleven twelve thirteen fourteen",
            "Warsaw Lisbon Oslo Kyoto Lima Quito Dakar Perth Hanoi",
            "def f(x): return x * 2 if x > 0 else -x  # code",
            "Rain, wind; sun! Snow? Fog... hail - sleet: ice.",
        ]
    )
    _idle_window(served)
    skewed = traffic([" ".join(["zz"] * 120)] * 6)
    print(f"\nexpert imbalance (mean over layers): varied {varied:.2f}, skewed {skewed:.2f}")
    assert skewed > varied


def test_request_metrics(served: Traced) -> None:
    text = served.metrics()
    ok = re.search(r'^moe_engine_requests_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', text, re.M)
    assert ok and float(ok.group(1)) >= 1
    assert re.search(r'^moe_engine_requests_total\{[^}]*outcome="invalid_request"', text, re.M)
    count = re.search(r"^moe_engine_time_to_first_token_seconds_count\{[^}]*\} (\S+)$", text, re.M)
    assert count and float(count.group(1)) >= 1
    assert re.search(r"^moe_engine_time_per_output_token_seconds_count", text, re.M)
    assert re.search(r"^moe_engine_generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    running = re.search(r'^moe_serving_replicas\{[^}]*state="RUNNING"[^}]*\} (\S+)$', text, re.M)
    assert running and float(running.group(1)) == 1
    assert re.search(r'^moe_replica_queue_depth\{replica="[^"]+"\} ', text, re.M)

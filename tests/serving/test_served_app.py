"""The served application end to end: Ray Serve, the engine with TP=2 + EP=2, HTTP and gRPC.

One Ray cluster and one deployed app for the whole module (engine start-ups are slow). The app
serves the tiny Gemma-4 MoE with `tensor_parallel_size=2, enable_expert_parallel=True` and a
deliberately small admission queue (2 running, 2 waiting) so that the queue-full paths can be
reached. Clients are the unmodified `openai` package and the generated gRPC stub over sockets.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from moe_serving import live_state
from moe_serving.proto import inference_pb2 as pb
from tests.support import oracle
from tests.support.appconfig import tiny_app_config
from tests.support.served import Served, full_queue, running_app
from tests.support.waiting import wait_until

pytestmark = pytest.mark.engine

MODEL = "tiny-moe"
PROMPT = "The expert router sends a token to"
MAX_ONGOING, MAX_QUEUED = 2, 2
_FINISHED_BY_LENGTH = re.compile(
    r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)', re.M
)
HOURLY_USD = 2.0  # price of one replica, for the live cost series
LONG = 1900  # tokens: seconds of generation, far longer than the test needs to act


@pytest.fixture(scope="module")
def served(tiny_gemma4: Path) -> Iterator[Served]:
    config = tiny_app_config(
        tiny_gemma4,
        "moe-test",
        served_model_name=MODEL,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        max_ongoing_requests=MAX_ONGOING,
        max_queued_requests=MAX_QUEUED,
        hourly_cost_per_replica_usd=HOURLY_USD,
    )
    with running_app(config, "moe-serving-tests") as served:
        yield served


@pytest.fixture(scope="module")
def expected(served: Served) -> list[int]:
    """Transformers' greedy continuation of PROMPT on the same weights: the oracle."""
    return oracle.greedy_tokens(served.model_dir, oracle.encode(served.model_dir, PROMPT), 16)


# ---- HTTP, through the official openai client -------------------------------------------------


def test_models_lists_the_served_model(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_tokens_equal_transformers_with_ep2(served: Served, expected: list[int]) -> None:
    completion = served.client().completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = completion.choices[0]
    assert choice.model_extra is not None
    assert choice.model_extra["token_ids"] == expected
    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_streamed_completion_equals_the_unary_one(served: Served) -> None:
    client = served.client()
    args: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**args).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices]
    assert len(parts) > 1 and "".join(parts) == whole


def test_chat_uses_the_chat_template_and_matches_transformers(served: Served) -> None:
    messages = [{"role": "user", "content": "Which expert handles this token?"}]
    chat = served.client().chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served.model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False).input_ids
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.model_extra is not None
    assert choice.model_extra["token_ids"] == oracle.greedy_tokens(served.model_dir, prompt_ids, 10)
    assert choice.message.content == tok.decode(choice.model_extra["token_ids"])


def test_streamed_chat(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "nope", "prompt": "x"}, "model 'nope' is not served here"),
        ({"prompt": "", "max_tokens": 3}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature must be non-negative"),
        ({"prompt": "x", "top_p": 7}, "top_p must be in"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "hello world " * 3000, "max_tokens": 3}, "maximum context length is 2048"),
        ({"prompt": "x", "max_tokens": 5000}, "cannot be greater than max_model_len"),
    ],
)
def test_bad_completion_requests_get_400_with_a_message(
    served: Served, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.client(max_retries=0).completions.create(**{"model": MODEL, **body})
    assert info.value.status_code == 400
    assert message in str(info.value)


def test_bad_http_bodies_get_400(served: Served) -> None:
    url = f"{served.http}/v1/chat/completions"
    not_json = httpx.post(url, content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    no_messages = httpx.post(url, json={"messages": []})
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["message"] == "messages must not be empty"


def test_health_and_metrics(served: Served) -> None:
    assert httpx.get(f"{served.http}/health").status_code == 200
    text = httpx.get(f"{served.http}/metrics").text
    assert re.search(r'^moe_ingress_requests_total\{.*code="200"', text, re.M)
    # Engine series carry the replica that produced them (several replicas never collide).
    assert re.search(r'^moe_replica_queue_depth\{replica="[^"]+"\} ', text, re.M)
    assert "vllm:num_requests_running" in text
    assert "moe_replica_cancelled_requests_total" in text


def live(served: Served) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{served.http}/v1/moe/state", timeout=30).json()
    return body


def wait_live(served: Served, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> None:
    """Poll /v1/moe/state until `ok(load)` (replicas report every few seconds)."""
    wait_until(lambda: live(served)["load"], timeout_s, 0.2, "live state never settled", ok=ok)


def test_live_state_counts_replicas_and_generated_tokens(served: Served) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    # Let the replica's periodic report catch up with the requests of earlier tests.
    time.sleep(live_state.REPORT_INTERVAL_S * 2.5)
    state = live(served)
    assert state["version"] == live_state.STATE_VERSION
    assert state["deployment"] == "LLMEngine"
    assert state["replicas"] == {"running": 1, "target": 1}
    load = state["load"]
    assert load["reporting_replicas"] == 1 and load["waiting"] == 0 and load["running"] == 0
    base = load["generated_tokens_total"]
    response = served.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert response.usage is not None and response.usage.completion_tokens == 7
    wait_live(served, lambda load: load["generated_tokens_total"] == base + 7)


def _series(text: str, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def test_live_cost_per_million_tokens_metric(served: Served) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    time.sleep(live_state.REPORT_INTERVAL_S * 2.5)  # the replica's report catches up
    base = live(served)["load"]["generated_tokens_total"]
    first = httpx.get(f"{served.http}/metrics", timeout=30).text  # the window starts here
    assert _series(first, "moe_app_generated_tokens_total") == base
    assert _series(first, "moe_app_hourly_cost_usd") == HOURLY_USD  # one running replica
    # A rate needs two comparable reads (same reporting replicas, at least MIN_GAP_S apart); a
    # read that is not comparable gives none and starts a new window: generate, read, repeat.
    rate = cost = None
    produced = 0
    for _ in range(5):
        started = time.monotonic()
        for _ in range(2):
            served.client().completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=16, extra_body={"ignore_eos": True}
            )
        produced += 32
        wait_live(served, lambda load, n=produced: load["generated_tokens_total"] == base + n)
        time.sleep(max(0.0, live_state.RateWindow.MIN_GAP_S - (time.monotonic() - started)))
        second = httpx.get(f"{served.http}/metrics", timeout=30).text
        assert _series(second, "moe_app_generated_tokens_total") == base + produced
        rate = _series(second, "moe_app_output_tokens_per_second")
        cost = _series(second, "moe_cost_per_million_output_tokens")
        if rate is not None:
            break
    assert rate is not None and rate > 0, second[-2000:]
    assert cost == pytest.approx(HOURLY_USD / (rate * 3600) * 1e6, rel=1e-6)


def test_request_costs_add_up_to_the_replicas_price_under_load(served: Served) -> None:
    """Every response carries its cost (usage.cost_usd = prompt_cost_usd + output_cost_usd,
    moe_serving.request_cost); under continuous load (two clients back to back, the replica's
    two running slots) the requests' costs add up to the replica's price over the window: never
    more, and at most the idle gaps between a response and the next request less (README:
    within 20%)."""
    import threading

    served.wait_depth(lambda d: d["total"] == 0)
    costs: list[dict[str, float]] = []
    lock = threading.Lock()
    stop = time.monotonic() + 12

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True}
                usage = http.post(f"{served.http}/v1/completions", json=body).json()["usage"]
                with lock:
                    costs.append(usage)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(MAX_ONGOING)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    window = time.monotonic() - started
    assert costs and all(u["cost_usd"] > 0 for u in costs)
    for u in costs:
        assert u["cost_usd"] == pytest.approx(u["prompt_cost_usd"] + u["output_cost_usd"])
        assert u["prompt_cost_usd"] > 0 and u["output_cost_usd"] > 0
    total = sum(u["cost_usd"] for u in costs)
    price = HOURLY_USD * window / 3600
    print(f"\n{len(costs)} requests in {window:.1f}s: costs sum {total:.6f} USD, price {price:.6f}")
    assert total <= price * 1.001
    assert total >= price * 0.8


def test_stream_usage_and_grpc_trailer_carry_the_cost(served: Served) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = None
    with httpx.stream("POST", f"{served.http}/v1/completions", json=body, timeout=120) as rsp:
        for line in rsp.iter_lines():
            if line.startswith("data: {"):
                payload = json.loads(line[len("data: ") :])
                usage = payload.get("usage") or usage
    assert usage is not None and usage["cost_usd"] > 0
    _, call = served.stub().Complete.with_call(
        pb.CompleteRequest(
            model=MODEL, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=4, temperature=0)
        )
    )
    trailer = dict(call.trailing_metadata() or ())
    assert float(trailer["moe-cost-usd"]) > 0
    # The same cost in the response's usage, and on a gRPC stream's last chunk (Generate).
    complete = served.stub().Complete(
        pb.CompleteRequest(
            model=MODEL, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=4, temperature=0)
        )
    )
    assert complete.usage.cost_usd > 0
    chunks = list(
        served.stub().Generate(
            pb.GenerateRequest(
                completion=pb.CompleteRequest(
                    model=MODEL,
                    prompt=PROMPT,
                    sampling=pb.SamplingParams(max_tokens=4, temperature=0),
                )
            )
        )
    )
    last = chunks[-1].usage
    assert last.completion_tokens == 4 and last.cost_usd > 0
    assert last.cost_usd == pytest.approx(last.prompt_cost_usd + last.output_cost_usd)


# ---- gRPC, through the generated stub -----------------------------------------------------------


def test_grpc_complete_equals_transformers(served: Served, expected: list[int]) -> None:
    response = served.stub().Complete(
        pb.CompleteRequest(
            model=MODEL,
            prompt=PROMPT,
            return_token_ids=True,
            sampling=pb.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        )
    )
    assert list(response.choices[0].token_ids) == expected
    assert response.usage.completion_tokens == 16 and response.model == MODEL


def test_grpc_generate_streams_the_same_tokens(served: Served, expected: list[int]) -> None:
    request = pb.GenerateRequest(
        completion=pb.CompleteRequest(
            prompt=PROMPT,
            return_token_ids=True,
            sampling=pb.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        )
    )
    chunks = list(served.stub().Generate(request))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected
    assert len(chunks) > 2 and chunks[-1].usage.completion_tokens == 16


def test_grpc_chat_list_models_and_health(served: Served) -> None:
    stub = served.stub()
    chat = stub.Chat(
        pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            sampling=pb.SamplingParams(max_tokens=4, temperature=0),
        )
    )
    assert chat.choices[0].role == "assistant" and chat.usage.completion_tokens == 4
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest()).models] == [MODEL]
    assert stub.ListModels(pb.ListModelsRequest()).models[0].max_model_len == 2048
    assert stub.Health(pb.HealthRequest()).status == pb.HealthResponse.SERVING


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.CompleteRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (pb.CompleteRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.CompleteRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature must be non-negative",
        ),
        (
            pb.CompleteRequest(prompt="x", extra_json="{"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "extra_json is not valid JSON",
        ),
    ],
)
def test_grpc_bad_input_status_codes(
    served: Served, request_: pb.CompleteRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        served.stub().Complete(request_)
    assert info.value.code() == code
    assert message in info.value.details()


def test_grpc_generate_bad_input_fails_before_streaming(served: Served) -> None:
    request = pb.GenerateRequest(
        chat=pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="x")],
            sampling=pb.SamplingParams(top_p=9),
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        list(served.stub().Generate(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in info.value.details()


# ---- load: queue full, client cancellation -----------------------------------------------------


def _completed_count(served: Served) -> float:
    """Requests vLLM finished by reaching max_tokens (its Prometheus counter)."""
    match = _FINISHED_BY_LENGTH.search(httpx.get(f"{served.http}/metrics").text)
    assert match, "vLLM's request_success counter is missing"
    return float(match.group(1))


def _assert_dropped(
    served: Served, before: dict[str, Any], completed_before: float, n: int
) -> None:
    """The last `n` requests were cancelled in the replica and left vLLM without completing."""
    served.wait_depth(lambda d: d["in_engine"] == 0 and d["queued"] == 0 and d["in_replica"] == 0)
    assert served.depth()["cancelled_total"] == before["cancelled_total"] + n
    assert _completed_count(served) == completed_before


def test_client_disconnect_aborts_the_engine_request(served: Served) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    before, completed_before = served.depth(), _completed_count(served)
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{served.http}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # generation has started
    # The connection is closed here, long before LONG tokens: the engine must drop the request.
    _assert_dropped(served, before, completed_before, 1)


def test_grpc_cancel_and_deadline_abort_the_engine_request(served: Served) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    before, completed_before = served.depth(), _completed_count(served)
    request = pb.GenerateRequest(
        completion=pb.CompleteRequest(
            prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True)
        )
    )
    call = served.stub().Generate(request)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    _assert_dropped(served, before, completed_before, 1)
    # A client deadline ends the call with DEADLINE_EXCEEDED and frees the engine too.
    with pytest.raises(grpc.RpcError) as info:
        served.stub().Complete(
            pb.CompleteRequest(
                prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True)
            ),
            timeout=1.0,
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_dropped(served, before, completed_before, 2)


def test_full_queue_answers_503_and_resource_exhausted(served: Served) -> None:
    served.wait_depth(lambda d: d["total"] == 0)
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    # Two requests run in vLLM and two wait in the replica's queue: it is full.
    with full_queue(served, body, MAX_ONGOING, MAX_QUEUED) as statuses:
        # The operator's view of the same load (what goes into status.queueDepth).
        wait_live(
            served, lambda load: load["waiting"] == MAX_QUEUED and load["running"] == MAX_ONGOING
        )

        with pytest.raises(openai.APIStatusError) as info:
            served.client(max_retries=0).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
        assert "retry" in str(info.value)

        with pytest.raises(grpc.RpcError) as grpc_info:
            served.stub().Complete(pb.CompleteRequest(prompt="x"))
        assert grpc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert served.depth()["rejected_total"] >= 2
    # Everyone else was answered normally, and closing the streams emptied the replica.
    assert statuses.count(200) >= MAX_ONGOING
    served.wait_depth(lambda d: d["total"] == 0)
    body_ok = served.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert body_ok.choices[0].finish_reason == "length"
    assert json.dumps(served.depth())  # the replica survived all of it

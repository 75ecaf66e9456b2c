"""The client service config (`moe_serving.grpc_api.CLIENT_SERVICE_CONFIG`) with grpcio's own
retry support, over a real socket, against our real gRPC refusal path.

The server is a real `grpc.aio` server. Behind it sits the ingress's real `GrpcFront.Complete`
(`moe_serving.ingress_grpc`) with only its engine call replaced (no Ray, no vLLM): the engine
refuses as the replica does when its queue is full (`Refusal(503, QUEUE_FULL, ..., retry_after_s)`,
as in `moe_serving.engine`), then answers. Between socket and ingress, `serve_like_ray` does what
Ray Serve 2.60's gRPC proxy does with a deployment's answer: the ingress gets a
`RayServegRPCContext` (Ray's class), and the context it set is copied onto the call with Ray's
own `_set_on_grpc_context` together with a returned result, or, when the ingress raises, only
the code and details are kept (`Replica._maybe_wrap_grpc_exception` and
`set_grpc_code_and_details`). The same path through the real proxy on a Ray cluster is
`test_grpc_production.py::test_retry_pushback_through_serve_proxy`.

Pushback semantics are gRFC A6 "client retries" (grpc/proposal A6-client-retries.md, section
"Pushback"): trailing metadata `grpc-retry-pushback-ms`; a non-negative value is the delay before
the next attempt, a negative or unparsable one means "do not retry". `grpc-previous-rpc-attempts`
(same document, "Exposed Retry Metadata") is what the client's retry machinery adds to each retry:
the server counting those proves the retries are grpcio's, not ours.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from ray.serve.grpc_util import RayServegRPCContext

from moe_serving import grpc_api, tracing
from moe_serving.config import TracingArgs
from moe_serving.grpc_servicer import SERVICE, _trailers_only
from moe_serving.ingress_base import EngineCall
from moe_serving.ingress_grpc import GrpcFront
from moe_serving.metrics import IngressMetrics
from moe_serving.outcomes import RETRY_PUSHBACK_KEY
from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as rpc
from moe_serving.protocol import Reason, Refusal, ResponseHead

OK_BODY = {
    "id": "cmpl-1",
    "model": "tiny-moe",
    "created": 0,
    "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class _Done:
    """The handle generator of an answered engine call (nothing left to read)."""

    def cancel(self) -> None:
        pass


class RefusingFront(GrpcFront):
    """The real gRPC front of the ingress; its engine refuses the first `refusals` calls."""

    def __init__(self, refusals: list[Refusal]) -> None:  # no IngressBase set-up: no Ray
        self.model_name = "tiny-moe"
        self.timeout_s = 60.0
        self.api_key = None
        self.metrics = IngressMetrics()
        self.tracing = tracing.Tracing(TracingArgs(), "test", {})
        self.refusals = list(refusals)
        self.engine_calls = 0

    async def call_engine(self, kind: Any, body: Any, span: Any, deadline: float) -> EngineCall:
        self.engine_calls += 1
        if self.refusals:
            head, error = self.refusals.pop(0).events()
            assert isinstance(head, ResponseHead)
            return EngineCall(head, error, _Done())  # type: ignore[arg-type]
        return EngineCall(ResponseHead(200, stream=False), OK_BODY, _Done())  # type: ignore[arg-type]


Handler = Callable[[bytes, RayServegRPCContext], Awaitable[Any]]


def serve_like_ray(handler: Handler, seen: list[dict[str, str]], trailers_only: bool = True) -> Any:
    """A unary method handler of raw bytes that treats `handler`'s answer as Ray Serve's proxy
    does (see the module docstring), inside our `_trailers_only` wrapper as
    `add_InferenceServiceServicer_to_server` installs it under Serve; `seen` gets each attempt's
    invocation metadata."""

    async def unary(raw: bytes, context: Any) -> bytes:
        seen.append({k: v for k, v in context.invocation_metadata()})
        serve_context = RayServegRPCContext(context)
        try:
            result = await handler(raw, serve_context)
        except Exception as exc:
            # Replica: code and details of the context survive a raised exception; the proxy
            # sets them (nothing else of the context reaches the call).
            context.set_code(serve_context.code() or grpc.StatusCode.INTERNAL)
            context.set_details(serve_context.details() or str(exc))
            return b""
        serve_context._set_on_grpc_context(context)
        return bytes(result.SerializeToString())

    return grpc.unary_unary_rpc_method_handler(_trailers_only(unary) if trailers_only else unary)


async def _serving(methods: dict[str, Any]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def front_server() -> AsyncIterator[Callable[[list[Refusal]], Awaitable[Any]]]:
    """Starts a server with a `RefusingFront`; returns (front, target, seen attempts)."""
    servers: list[grpc.aio.Server] = []

    async def start(
        refusals: list[Refusal], trailers_only: bool = True
    ) -> tuple[RefusingFront, str, list[dict[str, str]]]:
        front = RefusingFront(refusals)
        seen: list[dict[str, str]] = []

        async def complete(raw: bytes, context: RayServegRPCContext) -> Any:
            return await front.Complete(raw, grpc_context=context)

        server, target = await _serving({"Complete": serve_like_ray(complete, seen, trailers_only)})
        servers.append(server)
        return front, target, seen

    yield start
    for server in servers:
        await server.stop(None)


def _queue_full(retry_after_s: int | None = 1) -> Refusal:
    return Refusal(503, Reason.QUEUE_FULL, "replica queue full", retry_after_s)


REQUEST = pb.CompleteRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=1))


def test_shipped_config_is_valid_json_retrying_our_retryable_codes() -> None:
    config = json.loads(json.dumps(grpc_api.CLIENT_SERVICE_CONFIG))
    generation = config["methodConfig"][0]
    assert {n["method"] for n in generation["name"]} == {"Complete", "Chat", "Generate"}
    assert set(generation["retryPolicy"]["retryableStatusCodes"]) == {
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
    }
    assert generation["timeout"].endswith("s")
    options = dict(grpc_api.client_channel_options())
    assert json.loads(options["grpc.service_config"]) == grpc_api.CLIENT_SERVICE_CONFIG
    assert options["grpc.enable_retries"] == 1


async def test_refusal_carries_the_retry_hint_as_grpc_pushback(front_server: Any) -> None:
    """Retries off: the client sees the refusal itself, with the pushback trailer (ms)."""
    front, target, seen = await front_server([_queue_full(retry_after_s=2)])
    async with grpc.aio.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc.InferenceServiceStub(ch).Complete(REQUEST, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "replica queue full" in (err.value.details() or "")
    assert (RETRY_PUSHBACK_KEY, "2000") in tuple(err.value.trailing_metadata() or ())
    assert front.engine_calls == 1 and len(seen) == 1


async def test_client_config_retries_on_pushback_and_succeeds(front_server: Any) -> None:
    front, target, seen = await front_server([_queue_full(), _queue_full()])
    async with grpc.aio.insecure_channel(target, options=grpc_api.client_channel_options()) as ch:
        response = await rpc.InferenceServiceStub(ch).Complete(REQUEST, timeout=60)
    assert response.choices[0].text == "ok"
    assert front.engine_calls == 3  # two refusals, then the answer
    # grpcio's retries, counted by grpcio itself (gRFC A6 "Exposed Retry Metadata").
    assert [m.get("grpc-previous-rpc-attempts") for m in seen] == [None, "1", "2"]


async def test_without_trailers_only_the_proxys_answer_is_not_retried(
    front_server: Any,
) -> None:
    """Why `_trailers_only` exists: the proxy's own error answer (code set, empty message
    returned) sends response headers first, which commits the call (gRFC A6, "When Retries are
    Valid"), so grpcio does not retry it even with the pushback trailer present."""
    front, target, seen = await front_server([_queue_full()], trailers_only=False)
    async with grpc.aio.insecure_channel(target, options=grpc_api.client_channel_options()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc.InferenceServiceStub(ch).Complete(REQUEST, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (RETRY_PUSHBACK_KEY, "1000") in tuple(err.value.trailing_metadata() or ())
    assert front.engine_calls == 1 and len(seen) == 1


async def test_refusal_without_hint_is_retried_with_backoff(front_server: Any) -> None:
    """No Retry-After (no pushback): A6 leaves the delay to the policy's backoff."""
    front, target, seen = await front_server([Refusal(503, Reason.UNSPECIFIED, "down", None)])
    async with grpc.aio.insecure_channel(target, options=grpc_api.client_channel_options()) as ch:
        response = await rpc.InferenceServiceStub(ch).Complete(REQUEST, timeout=60)
    assert response.choices[0].text == "ok"
    assert front.engine_calls == 2
    assert [m.get("grpc-previous-rpc-attempts") for m in seen] == [None, "1"]


@pytest.mark.parametrize("pushback", ["-1", "soon"])
async def test_negative_or_unparsable_pushback_stops_retries(pushback: str) -> None:
    """gRFC A6: a negative or unparsable pushback means "do not retry", whatever maxAttempts."""
    seen: list[dict[str, str]] = []

    async def refuse(raw: bytes, context: RayServegRPCContext) -> Any:
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details("go away")
        context.set_trailing_metadata([(RETRY_PUSHBACK_KEY, pushback)])
        return pb.CompleteResponse()

    server, target = await _serving({"Complete": serve_like_ray(refuse, seen)})
    try:
        async with grpc.aio.insecure_channel(
            target, options=grpc_api.client_channel_options()
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc.InferenceServiceStub(ch).Complete(REQUEST, timeout=60)
    finally:
        await server.stop(None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(seen) == 1


async def test_client_errors_are_not_retried(front_server: Any) -> None:
    front, target, seen = await front_server([])
    bad = pb.CompleteRequest(prompt="hi", prompt_token_ids=[1])  # both set: INVALID_ARGUMENT
    async with grpc.aio.insecure_channel(target, options=grpc_api.client_channel_options()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rpc.InferenceServiceStub(ch).Complete(bad, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(seen) == 1 and front.engine_calls == 0


async def test_config_timeout_is_the_calls_deadline() -> None:
    """The config's `timeout` ends a call that sets no deadline of its own. (grpcio applies it
    in the client; the server did not see it as `time_remaining()` here.) The server never
    answers: without the config's deadline this call would hang until the test's timeout."""
    never = asyncio.Event()
    seen: list[dict[str, str]] = []

    async def hang(raw: bytes, context: RayServegRPCContext) -> Any:
        await never.wait()
        return pb.CompleteResponse()

    config = json.loads(json.dumps(grpc_api.CLIENT_SERVICE_CONFIG))
    config["methodConfig"][0]["timeout"] = "2s"
    server, target = await _serving({"Complete": serve_like_ray(hang, seen)})
    try:
        async with grpc.aio.insecure_channel(
            target, options=grpc_api.client_channel_options(config)
        ) as ch:
            await ch.channel_ready()  # connected before the deadline starts
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc.InferenceServiceStub(ch).Complete(REQUEST)  # no per-call timeout
    finally:
        never.set()
        await server.stop(None)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(seen) == 1  # DEADLINE_EXCEEDED is not retryable in the config

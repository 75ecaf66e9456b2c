"""A streamed engine request is cancelled when the client goes away mid-stream, on both fronts.

The ingress's HTTP stream (`Ingress._sse`, iterated by Starlette's StreamingResponse) and gRPC
stream (`GrpcFront.Generate`, iterated by Ray Serve's replica) are async generators. When the
task iterating one is cancelled while the generator waits at a `yield` (the chunk is being sent
to a client that has left), Python leaves the generator suspended: its `finally`, which cancels
the engine request, runs only when the generator is garbage-collected (PEP 525; asyncio's
asyncgen finalizer hook). The engine then runs the request on for nobody. Here the real methods
run against a stand-in engine generator (no Ray cluster: the test is about the ingress's own
code, the end-to-end case is tests/reliability's disconnect test).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from moe_serving.ingress import Ingress
from moe_serving.ingress_base import EngineCall
from moe_serving.ingress_grpc import GrpcFront
from moe_serving.proto import inference_pb2 as pb
from moe_serving.protocol import ResponseHead

CHUNK = 'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n'


class StandInEvents:
    """The engine's stream as the ingress sees it (a DeploymentResponseGenerator): chunks
    forever, and `cancel()` recorded."""

    def __init__(self) -> None:
        self.cancels = 0

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        await asyncio.sleep(0)
        return CHUNK

    def cancel(self) -> None:
        self.cancels += 1


class StandInMetrics:
    def __init__(self) -> None:
        self.observed: list[tuple[str, str, str]] = []

    def observe(self, proto: str, endpoint: str, code: str, started: float, span: Any) -> None:
        self.observed.append((proto, endpoint, code))


class StandInIngress:
    """The attributes the two stream methods use (the real class needs a Serve replica)."""

    def __init__(self, call: EngineCall) -> None:
        self.call = call
        self.timeout_s = 600.0
        self.model_name = "tiny-moe"
        self.metrics = StandInMetrics()
        self.tracing = self

    def request_span(self, *args: Any) -> None:
        return None

    def _check_grpc_key(self, grpc_context: Any) -> None:
        return None

    def _check_model(self, body: dict[str, Any]) -> None:
        return None

    async def call_engine(self, *args: Any) -> EngineCall:
        return self.call


async def _client_leaves_mid_stream(stream: AsyncIterator[Any], fake: StandInIngress) -> int:
    """Take the first chunk, then block in 'sending' it until cancelled (the client left);
    the engine request's cancels right then, with the generator still alive and suspended
    (asserted: its `finally` has not run; asyncio.run closes it later, at loop shutdown)."""

    async def consume() -> None:
        async for _ in stream:
            await asyncio.Event().wait()

    task = asyncio.create_task(consume())
    for _ in range(100):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the task's done callbacks run
    assert fake.metrics.observed == []  # the generator's own `finally` has not run
    return cast(StandInEvents, fake.call.events).cancels


def _call() -> tuple[EngineCall, StandInEvents]:
    events = StandInEvents()
    return EngineCall(ResponseHead(200, True), None, events), events  # type: ignore[arg-type]


def test_http_stream_cancels_the_engine_request_when_its_task_is_cancelled() -> None:
    call, _ = _call()
    fake = StandInIngress(call)
    stream = Ingress._sse(fake, call, "/v1/completions", time.monotonic(), None)  # type: ignore[arg-type]
    assert asyncio.run(_client_leaves_mid_stream(stream, fake)) == 1


def test_grpc_stream_cancels_the_engine_request_when_its_task_is_cancelled() -> None:
    call, _ = _call()
    fake = StandInIngress(call)
    request = pb.GenerateRequest(completion=pb.CompleteRequest(prompt="hi"))
    stream = GrpcFront.Generate(fake, request, None)  # type: ignore[arg-type]
    assert asyncio.run(_client_leaves_mid_stream(stream, fake)) == 1


def test_a_stream_read_to_its_end_is_cancelled_as_a_no_op_once_finished() -> None:
    """The normal path: the stream's own `finally` cancels (a no-op on a finished request)
    and books the request's metrics."""
    call, events = _call()
    fake = StandInIngress(call)

    async def read_three() -> None:
        stream = Ingress._sse(fake, call, "/v1/completions", time.monotonic(), None)  # type: ignore[arg-type]
        chunks = [await stream.__anext__() for _ in range(3)]
        assert chunks == [CHUNK] * 3
        await stream.aclose()

    asyncio.run(read_three())
    assert events.cancels >= 1
    assert fake.metrics.observed == [("http", "/v1/completions", "200")]

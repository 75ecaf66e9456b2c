"""The ingress's gRPC methods, named after the RPCs of `inference.proto` and of the standard
`grpc.health.v1` service: Ray Serve's gRPC proxy calls them by name, with the request as bytes
(parsed here: `moe_serving.grpc_servicer`) and the call's `grpc_context`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from moe_serving import grpc_api, hops, tracing
from moe_serving.grpc_servicer import SERVICE as SERVICE_NAME
from moe_serving.grpc_servicer import UndecodableRequest, decode
from moe_serving.ingress_base import IngressBase
from moe_serving.outcomes import (
    ClientError,
    GrpcAbort,
    abort_grpc,
    abort_grpc_with,
    engine_failures,
    grpc_code,
    refuse_grpc,
)
from moe_serving.proto import inference_pb2 as pb
from moe_serving.protocol import Kind

#: gRPC generation RPCs answered in one message: the kind of request, its conversions and its
#: response type.
_UNARY: dict[
    str, tuple[Kind, Callable[[Any], dict[str, Any]], Callable[[Any], Any], Callable[[], Any]]
] = {
    "Complete": (
        "completions",
        lambda raw: grpc_api.completion_body(decode(raw, pb.CompleteRequest)),
        grpc_api.completion_response,
        pb.CompleteResponse,
    ),
    "Chat": (
        "chat",
        lambda raw: grpc_api.chat_body(decode(raw, pb.ChatRequest)),
        grpc_api.chat_response,
        pb.ChatResponse,
    ),
}


#: Trailing metadata key carrying a unary call's cost in USD (README: Cost per request).
COST_METADATA_KEY = "moe-cost-usd"


class GrpcFront(IngressBase):
    """The gRPC methods of the ingress deployment."""

    async def Complete(self, request: pb.CompleteRequest, grpc_context: Any = None) -> Any:
        return await self._grpc_unary("Complete", request, grpc_context)

    async def Chat(self, request: pb.ChatRequest, grpc_context: Any = None) -> Any:
        return await self._grpc_unary("Chat", request, grpc_context)

    async def _grpc_unary(self, method: str, request: Any, grpc_context: Any) -> Any:
        if hops.ENABLED:
            hops.mark("ingress.in")
        kind, to_body, to_response, empty = _UNARY[method]
        started = time.monotonic()
        span = self.tracing.request_span(
            "grpc", method, tracing.grpc_carrier(grpc_context), self.model_name
        )
        try:
            self._check_grpc_key(grpc_context)
            try:
                body = to_body(request)
            except (grpc_api.InvalidRequest, UndecodableRequest) as exc:
                raise ClientError(400, str(exc)) from exc
            self._check_model(body)
            call = await self.call_engine(kind, body, span, time.monotonic() + self.timeout_s)
            # Its one body is read and the engine's generator ends by itself: no cancel (as
            # over HTTP). A cancel here cost about 0.9 ms per call (bench/PROFILE.md).
            if call.head.status != 200:
                raise call.refusal()
        except ClientError as exc:
            code = grpc_code(exc.status, exc.reason).name
            self.metrics.observe("grpc", method, code, started, span)
            if exc.retry_after_s and grpc_context is not None:
                # A retryable refusal with a hint: its status and `grpc-retry-pushback-ms` go
                # out with an empty response (raising would lose the trailer; `refuse_grpc`).
                refuse_grpc(grpc_context, exc)
                return empty()
            abort_grpc_with(grpc_context, exc)
        self.metrics.observe("grpc", method, "OK", started, span)
        response = to_response(call.body)
        cost = (call.body.get("usage") or {}).get("cost_usd")
        if cost is not None and grpc_context is not None:
            # The request's cost (request_cost.py) as trailing metadata: Serve's proxy copies it
            # onto the client's call with the returned response (a list: Ray prepends its own).
            grpc_context.set_trailing_metadata([(COST_METADATA_KEY, repr(float(cost)))])
        if hops.ENABLED:
            hops.mark("ingress.out")
        return response

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateChunk]:
        if hops.ENABLED:
            hops.mark("ingress.in")
        started = time.monotonic()
        code = "OK"
        call = None
        span = self.tracing.request_span(
            "grpc", "Generate", tracing.grpc_carrier(grpc_context), self.model_name
        )
        try:
            self._check_grpc_key(grpc_context)
            try:
                request = decode(request, pb.GenerateRequest)
            except UndecodableRequest as exc:
                raise ClientError(400, str(exc)) from exc
            which = request.WhichOneof("input")
            if which is None:
                raise ClientError(400, "set GenerateRequest.completion or GenerateRequest.chat")
            kind: Kind = "completions" if which == "completion" else "chat"
            try:
                body = (
                    grpc_api.completion_body(request.completion, stream=True)
                    if kind == "completions"
                    else grpc_api.chat_body(request.chat, stream=True)
                )
            except grpc_api.InvalidRequest as exc:
                raise ClientError(400, str(exc)) from exc
            self._check_model(body)
            # One deadline for the whole stream.
            deadline = time.monotonic() + self.timeout_s
            call = await self.call_engine(kind, body, span, deadline)
            if not call.head.stream:  # refused before streaming: an error body
                raise call.refusal()
            call.cancel_when_task_ends()
            async with engine_failures(deadline, self.timeout_s):
                async for chunk in call.events:
                    if hops.ENABLED:
                        hops.mark("ingress.chunk")
                    for payload in grpc_api.parse_sse(chunk):
                        failure = grpc_api.error_message(payload)
                        if failure is not None:
                            raise ClientError(grpc_api.error_status(payload), failure)
                        for item in grpc_api.stream_chunks(payload):
                            yield item
        except ClientError as exc:
            code = grpc_code(exc.status, exc.reason).name
            abort_grpc_with(grpc_context, exc)
        finally:
            if call is not None:
                call.events.cancel()
            self.metrics.observe("grpc", "Generate", code, started, span)

    async def _traced_rpc(
        self, grpc_context: Any, method: str, answer: Callable[[], Awaitable[Any]]
    ) -> Any:
        """A non-generation RPC with its ingress span and request metrics."""
        started = time.monotonic()
        span = self.tracing.request_span(
            "grpc", method, tracing.grpc_carrier(grpc_context), self.model_name
        )
        code = "INTERNAL"
        try:
            result = await answer()
            code = "OK"
            return result
        except GrpcAbort as exc:
            code = str(exc).split(":", 1)[0]
            raise
        finally:
            self.metrics.observe("grpc", method, code, started, span)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any = None) -> Any:
        async def answer() -> Any:
            try:
                self._check_grpc_key(grpc_context)
            except ClientError as exc:
                abort_grpc_with(grpc_context, exc)
            return grpc_api.models_response(await self.engine.models.remote())

        return await self._traced_rpc(grpc_context, "ListModels", answer)

    async def Health(self, request: pb.HealthRequest, grpc_context: Any = None) -> Any:
        async def answer() -> Any:
            status = await self.engine.health.remote()
            return pb.HealthResponse(
                status=pb.HealthResponse.SERVING
                if status["healthy"]
                else pb.HealthResponse.NOT_SERVING,
                message=status["message"],
                queue_depth=status["total"],
            )

        return await self._traced_rpc(grpc_context, "Health", answer)

    # ---- grpc.health.v1 (the standard health service; grpc/grpc doc/health-checking.md) ----

    #: Services this server reports on: "" is the server as a whole (what probes ask).
    HEALTH_SERVICES = ("", SERVICE_NAME)
    WATCH_INTERVAL_S = 2.0

    async def _health_status(self) -> int:
        from grpc_health.v1 import health_pb2

        try:
            status = await self.engine.health.remote()
        except Exception:  # no replica to ask (being replaced): not serving
            return int(health_pb2.HealthCheckResponse.NOT_SERVING)
        return int(
            health_pb2.HealthCheckResponse.SERVING
            if status["healthy"]
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def _health_service(self, request: Any, grpc_context: Any) -> str:
        import grpc
        from grpc_health.v1 import health_pb2

        try:
            service = decode(request, health_pb2.HealthCheckRequest).service
        except UndecodableRequest as exc:
            abort_grpc(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if service not in self.HEALTH_SERVICES:
            # The protocol: Check answers NOT_FOUND for a service the server does not know.
            abort_grpc(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        return service

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        async def answer() -> Any:
            self._health_service(request, grpc_context)
            return health_pb2.HealthCheckResponse(status=await self._health_status())

        return await self._traced_rpc(grpc_context, "grpc.health.v1.Check", answer)

    async def List(self, request: Any, grpc_context: Any = None) -> Any:
        from grpc_health.v1 import health_pb2

        async def answer() -> Any:
            status = await self._health_status()
            return health_pb2.HealthListResponse(
                statuses={
                    name: health_pb2.HealthCheckResponse(status=status)
                    for name in self.HEALTH_SERVICES
                }
            )

        return await self._traced_rpc(grpc_context, "grpc.health.v1.List", answer)

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        """The current status at once, then each change, until the client goes away. An
        unknown service is SERVICE_UNKNOWN in the stream (not an error), as the protocol says."""
        from grpc_health.v1 import health_pb2

        service = decode(request, health_pb2.HealthCheckRequest).service
        last: int | None = None
        while True:
            status = (
                await self._health_status()
                if service in self.HEALTH_SERVICES
                else int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            )
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(self.WATCH_INTERVAL_S)

"""The ingress deployment: the FastAPI app for HTTP (OpenAI API; health, metrics, live state)
and, through `GrpcFront` (`moe_serving.ingress_grpc`), the target of Ray Serve's gRPC proxy.

It checks the API key and the model name, applies the request deadline, calls the engine
deployment (`IngressBase.call_engine`, `moe_serving.ingress_base`), answers with HTTP statuses
and gRPC codes (`moe_serving.outcomes`), and cancels the engine request when the client goes
away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from moe_serving import hops, live_state
from moe_serving.config import ENGINE_DEPLOYMENT
from moe_serving.ingress_base import EngineCall
from moe_serving.ingress_grpc import GrpcFront
from moe_serving.metrics import app_metrics_text, label_replicas, replicas_text, routing_text
from moe_serving.outcomes import (
    ClientError,
    engine_failures,
    error_response,
    retry_headers,
    sse_error,
)
from moe_serving.protocol import Kind

# `serve.ingress` freezes (pickles) the FastAPI app when the class below is defined, so every
# module-level helper its routes use must be defined above it.
fastapi_app = FastAPI(title="MoE serving", docs_url=None, redoc_url=None)


@serve.ingress(fastapi_app)
class Ingress(GrpcFront):
    """HTTP (OpenAI API) and gRPC front end; holds no model, takes no CPU."""

    async def _traced_get(
        self, request: Request, endpoint: str, answer: Callable[[], Awaitable[Response]]
    ) -> Response:
        """A GET endpoint with its ingress span and request metrics, like generation has."""
        started = time.monotonic()
        span = self.tracing.request_span(
            "http", endpoint, request.headers, self.model_name, method="GET"
        )
        response: Response | None = None
        try:
            response = await answer()
            return response
        finally:
            code = str(response.status_code) if response is not None else "500"
            self.metrics.observe("http", endpoint, code, started, span)

    @fastapi_app.get("/health")
    async def http_health(self, request: Request) -> Response:
        async def answer() -> Response:
            status = await self.engine.health.remote()
            return JSONResponse(status, status_code=200 if status["healthy"] else 503)

        return await self._traced_get(request, "/health", answer)

    @fastapi_app.get("/metrics")
    async def http_metrics(self, request: Request) -> Response:
        async def answer() -> Response:
            engine_text = await self._engine_metrics()
            replicas = await asyncio.to_thread(replicas_text, ENGINE_DEPLOYMENT)
            return PlainTextResponse(
                self.metrics.text()
                + routing_text()
                + replicas
                + await self._app_metrics()
                + engine_text,
                media_type="text/plain; version=0.0.4",
            )

        return await self._traced_get(request, "/metrics", answer)

    async def _engine_metrics(self) -> str:
        """Every engine replica's series, labelled `replica`: the one that answers fresh, the
        others as they last reported to the board (a few seconds old at most)."""
        fresh = await self.engine.metrics_text.remote()
        try:
            texts = await live_state.board(
                serve.get_replica_context().app_name
            ).get_metrics.remote()
        except Exception:  # board not up yet: the answering replica alone
            texts = {}
        texts[fresh["replica"]] = fresh["text"]
        return await asyncio.to_thread(label_replicas, texts)

    async def _app_metrics(self) -> str:
        """The application-wide series (all engine replicas' reports; live cost)."""
        ctx = serve.get_replica_context()
        try:
            reports = await live_state.board(ctx.app_name).get.remote()
        except Exception:  # board not up yet (no engine replica has reported): no series
            return ""
        running, _ = await asyncio.to_thread(
            live_state.serve_replicas,
            ctx.app_name,
            ENGINE_DEPLOYMENT,
            self.config.engine.data_parallel_size,
        )
        now = time.time()
        load = live_state.aggregate(reports, now)
        rate = self.token_rate.update(load, now)
        return app_metrics_text(load, running, self.config.hourly_cost_per_replica_usd, rate)

    @fastapi_app.get("/v1/moe/state")
    async def http_live_state(self, request: Request) -> Response:
        """Live load, replicas and token counters of this application (the operator's status
        source). Open like /health and /metrics: counts only, no request content."""

        async def answer() -> Response:
            ctx = serve.get_replica_context()
            try:
                reports = await live_state.board(ctx.app_name).get.remote()
            except Exception:  # board lost or not up yet: no replica reports, counts still
                reports = {}
            running, target = await asyncio.to_thread(
                live_state.serve_replicas,
                ctx.app_name,
                ENGINE_DEPLOYMENT,
                self.config.engine.data_parallel_size,
            )
            body = live_state.state_body(
                ctx.app_name, ENGINE_DEPLOYMENT, reports, running, target, time.time()
            )
            return JSONResponse(body)

        return await self._traced_get(request, "/v1/moe/state", answer)

    @fastapi_app.get("/v1/models")
    async def http_models(self, request: Request) -> Response:
        async def answer() -> Response:
            try:
                self._check_key(request.headers.get("authorization"))
            except ClientError as exc:
                return error_response(exc)
            return JSONResponse(await self.engine.models.remote())

        return await self._traced_get(request, "/v1/models", answer)

    @fastapi_app.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await self._http_openai("completions", request)

    @fastapi_app.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        return await self._http_openai("chat", request)

    async def _http_openai(self, kind: Kind, request: Request) -> Response:
        if hops.ENABLED:
            hops.mark("ingress.in")
        started = time.monotonic()
        endpoint = f"/v1/{'completions' if kind == 'completions' else 'chat/completions'}"
        span = self.tracing.request_span("http", endpoint, request.headers, self.model_name)
        try:
            self._check_key(request.headers.get("authorization"))
            try:
                body = await request.json()
            # RecursionError: nesting deeper than Python's parser goes (a client's body).
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise ClientError(400, f"request body is not valid JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise ClientError(400, "request body must be a JSON object")
            self._check_model(body)
            call = await self.call_engine(kind, body, span, time.monotonic() + self.timeout_s)
        except ClientError as exc:
            self.metrics.observe("http", endpoint, str(exc.status), started, span)
            return error_response(exc)
        head = call.head
        if not head.stream:
            self.metrics.observe("http", endpoint, str(head.status), started, span)
            headers = retry_headers(head.retry_after_s)
            response = JSONResponse(call.body, status_code=head.status, headers=headers)
            if hops.ENABLED:
                hops.mark("ingress.out")
            return response
        return StreamingResponse(
            self._sse(call, endpoint, started, span),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _sse(
        self, call: EngineCall, endpoint: str, started: float, span: Any
    ) -> AsyncIterator[str]:
        code = "200"
        call.cancel_when_task_ends()
        try:
            async with engine_failures(started + self.timeout_s, self.timeout_s):
                async for chunk in call.events:
                    if hops.ENABLED:
                        hops.mark("ingress.chunk")
                    yield chunk
        except ClientError as exc:  # the status is sent: the error goes in the stream
            code = str(exc.status)
            yield sse_error(exc)
        finally:
            # Client gone or deadline: stop the engine request (no-op when it already finished).
            call.events.cancel()
            self.metrics.observe("http", endpoint, code, started, span)

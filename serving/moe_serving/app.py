"""The Ray Serve application: `build_app(args)` -> an engine deployment behind an ingress.

    HTTP :8000 (OpenAI API) ─┐
                              ├─> Ingress (0 CPUs) ──handle──> LLMEngine (vLLM, TP/EP ranks)
    gRPC :9000 (proxy) ──────┘

* `LLMEngine` runs one vLLM engine per replica (`moe_serving.engine.EngineServer`: vLLM's async
  engine and vLLM's own OpenAI serving layer, see that module for why). Its placement group
  holds one bundle per engine rank (TP x PP x DP), so a replica's ranks are reserved together;
  the replica actor itself takes no CPU and sits in the first bundle. With the default `mp`
  executor the ranks are local processes using those reserved CPUs; with `ray` vLLM places its
  rank actors into the bundles.
* `Ingress` is the FastAPI app for HTTP and the target of Ray Serve's gRPC proxy (methods named
  after the RPCs of `inference.proto`). It checks auth and the model name, applies the request
  deadline, maps engine outcomes to HTTP statuses / gRPC codes, and cancels the engine request
  when the client goes away.

Operator contract: `import_path: moe_serving.app:build_app`, `args: AppConfig.model_dump(
mode="json")`, gRPC servicer function
`moe_serving.grpc_servicer.add_InferenceServiceServicer_to_server` (requests reach the
ingress as bytes and are parsed here: see that module).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from moe_serving import autoscaling, body_checks, dp_group, grpc_api, live_state, schemas, tracing
from moe_serving.config import AppConfig
from moe_serving.engine import EngineServer
from moe_serving.grpc_servicer import SERVICE as SERVICE_NAME
from moe_serving.grpc_servicer import UndecodableRequest, decode
from moe_serving.metrics import app_metrics_text, label_replicas, replicas_text
from moe_serving.proto import inference_pb2 as pb
from moe_serving.protocol import Kind, Reason, ResponseHead, error_body
from moe_serving.vllm_args import dp_cpu_binding, ranks_per_engine

logger = logging.getLogger("ray.serve.moe_serving")

ENGINE_DEPLOYMENT = "LLMEngine"
INGRESS_DEPLOYMENT = "Ingress"
# Calls besides generation (health, metrics, models) must never be refused by Ray's limit.
_CONTROL_HEADROOM = 16


def engine_bundles(config: AppConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one engine Serve replica: one per rank it runs (TP x PP), all
    reserved at once. With DP > 1 each DP rank is its own Serve replica (`dp_group`), so DP
    does not multiply the bundles here: the gang's placement group concatenates them."""
    res = config.resources
    bundle: dict[str, float] = {"CPU": res.num_cpus_per_rank}
    if res.num_gpus_per_rank:
        bundle["GPU"] = res.num_gpus_per_rank
    if res.accelerator_type:
        bundle[f"accelerator_type:{res.accelerator_type}"] = 0.001
    return [dict(bundle) for _ in range(ranks_per_engine(config.engine))]


def initial_replicas(config: AppConfig) -> int:
    scaling = config.autoscaling
    if scaling.initial_replicas is not None:
        return max(scaling.initial_replicas, 1)
    return max(scaling.min_replicas, 1)


def with_dp_rank(config: AppConfig, rank: dp_group.DPRank) -> AppConfig:
    """The replica's config once it knows its DP rank: vLLM's rank arguments, the bundles its
    Ray executor takes, and (on the CPU) the core its engine binds to."""
    engine = config.engine
    env = {**engine.env, **rank.env()}
    binding = dp_cpu_binding(engine, rank.rank)
    if binding is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    engine = engine.model_copy(update={"extra": {**engine.extra, **rank.engine_args()}, "env": env})
    return config.model_copy(update={"engine": engine})


class LLMEngine:
    """Ray Serve deployment holding one vLLM engine (one replica = one engine + its ranks)."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        # Ray Serve awaits an async constructor: the replica is ready once vLLM is.
        self.config = AppConfig.model_validate(config)
        self.dp_rank = await dp_group.discover(ranks_per_engine(self.config.engine))
        if self.dp_rank is not None:
            self.config = with_dp_rank(self.config, self.dp_rank)
            logger.info(
                "DP rank %d/%d of gang %s (rendezvous %s:%d, bundles %s)",
                self.dp_rank.rank,
                self.dp_rank.size,
                self.dp_rank.gang_id,
                self.dp_rank.master_address,
                self.dp_rank.master_port,
                self.dp_rank.bundle_indices,
            )
        self.server = EngineServer(self.config)
        await self.server.start()
        self._live_task = asyncio.get_running_loop().create_task(self._report_live_state())

    async def _report_live_state(self) -> None:
        """Push this replica's load to the application's board every few seconds (the
        operator reads the sum through the ingress's GET /v1/moe/state)."""
        import ray

        ctx = serve.get_replica_context()
        replica = str(ctx.replica_id.unique_id)
        node = ray.util.get_node_ip_address()
        dp_rank = self.dp_rank.rank if self.dp_rank is not None else None
        board = None
        while True:
            try:
                if board is None:
                    board = live_state.board(ctx.app_name)
                await board.put.remote(self.server.live_report(replica, node, dp_rank))
                # For the ingress's /metrics: every replica's series, not only the answering one's.
                await board.put_metrics.remote(replica, self.server.metrics_text())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the board actor died: make a new one next time
                logger.debug("live-state report failed: %s", exc)
                board = None
            await asyncio.sleep(live_state.REPORT_INTERVAL_S)

    async def openai(
        self, kind: Kind, body: dict[str, Any], trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[Any]:
        """Stream of engine events for one OpenAI request (see `EngineServer.openai`)."""
        async for event in self.server.openai(kind, body, trace_headers):
            yield event

    async def models(self) -> dict[str, Any]:
        return await self.server.models()

    async def health(self) -> dict[str, Any]:
        """Liveness of the engine core plus the current load (used by /health and gRPC Health)."""
        try:
            await self.server.check_health()
        except Exception as exc:
            return {"healthy": False, "message": str(exc), **self.server.queue_depth().as_dict()}
        return {"healthy": True, "message": "ok", **self.server.queue_depth().as_dict()}

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: raising marks the replica unhealthy (restarted)."""
        await self.server.check_health()

    def queue_depth(self) -> dict[str, int]:
        """Queued (ours) + waiting and running (vLLM) requests: the autoscaling signal."""
        return self.server.queue_depth().as_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom-metrics hook: waiting/running requests for the autoscaling policy."""
        return autoscaling.replica_stats(self.server.queue_depth().as_dict())

    def metrics_text(self) -> dict[str, str]:
        """This replica's Prometheus text and its Serve replica id (the label it gets)."""
        replica = str(serve.get_replica_context().replica_id.unique_id)
        return {"replica": replica, "text": self.server.metrics_text()}

    def __del__(self) -> None:
        # Ray Serve calls this after draining in-flight requests (graceful_shutdown_* options).
        dp_group.forget(getattr(self, "dp_rank", None))
        task = getattr(self, "_live_task", None)
        if task is not None:
            task.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()


class _EngineAvailability:
    """Whether requests should be refused because no engine replica can serve them, from the
    Serve controller, read at most once a second.

    Serve's handle holds a request while no replica runs. That is right while replicas are
    starting (scale from zero, a rolling config change: they will run soon), but not when the
    deployment is UNHEALTHY with none running (a node of a multi-node replica was lost and
    its gang waits for nodes to be placed again): clients then get a prompt retryable refusal
    instead of a wait until their deadline."""

    TTL_S = 1.0

    def __init__(self, gang_size: int) -> None:
        self.gang_size = gang_size
        self.checked = 0.0
        self.refuse = False

    def _read(self, app_name: str) -> bool:
        details = live_state.serve_details()
        return details is not None and live_state.none_can_serve(
            details, app_name, ENGINE_DEPLOYMENT, self.gang_size
        )

    async def none_can_serve(self) -> bool:
        now = time.monotonic()
        if now - self.checked > self.TTL_S:
            self.checked = now
            app_name = serve.get_replica_context().app_name
            self.refuse = await asyncio.to_thread(self._read, app_name)
        return self.refuse


# `serve.ingress` freezes (pickles) the FastAPI app when the class below is defined, so every
# module-level helper its routes use must be defined above it.
fastapi_app = FastAPI(title="MoE serving", docs_url=None, redoc_url=None)


class _Metrics:
    """The ingress's own Prometheus series (a private registry: no clash with the engine's)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "moe_ingress_requests",
            "Requests answered by the ingress.",
            ["protocol", "endpoint", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "moe_ingress_request_duration_seconds",
            "Time from request to the end of its response.",
            ["protocol", "endpoint"],
            registry=self.registry,
        )

    def observe(
        self, protocol: str, endpoint: str, code: str, started: float, span: Any = None
    ) -> None:
        self.requests.labels(protocol, endpoint, code).inc()
        self.latency.labels(protocol, endpoint).observe(time.monotonic() - started)
        if span is not None:
            tracing.end_request_span(span, code)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _ClientError(Exception):
    """A request that ends with an error status (HTTP status; mapped to a gRPC code)."""

    def __init__(
        self,
        status: int,
        message: str,
        retry_after_s: int | None = None,
        reason: Reason = Reason.UNSPECIFIED,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason


_GRPC_CODE_BY_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND"}


def _grpc_code(status: int, reason: Reason) -> Any:
    import grpc

    if reason == Reason.QUEUE_FULL:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if reason in (Reason.MODEL_NOT_FOUND, Reason.NOT_FOUND):
        return grpc.StatusCode.NOT_FOUND
    if status == 504:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if status == 503:
        return grpc.StatusCode.UNAVAILABLE
    name = _GRPC_CODE_BY_STATUS.get(status)
    return getattr(grpc.StatusCode, name) if name else grpc.StatusCode.INTERNAL


class GrpcAbort(Exception):
    """Raised after setting the gRPC status on the context; Ray Serve's proxy sends that status."""


def _abort_grpc(grpc_context: Any, code: Any, message: str) -> None:
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(message)
    raise GrpcAbort(f"{code.name}: {message}")


def _grpc_metadata(grpc_context: Any, key: str) -> str | None:
    if grpc_context is None:
        return None
    for name, value in grpc_context.invocation_metadata():
        if name.lower() == key:
            return str(value)
    return None


def _replica_lost(exc: BaseException) -> _ClientError:
    """The engine replica died mid-request (Serve replaces it): a retryable 503 / UNAVAILABLE."""
    return _ClientError(
        503,
        f"the engine replica serving this request went away ({type(exc).__name__}); retry",
        retry_after_s=1,
        reason=Reason.REPLICA_LOST,
    )


def _retry_headers(retry_after_s: int | None) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s)} if retry_after_s else {}


def _error_response(exc: _ClientError) -> JSONResponse:
    return JSONResponse(
        error_body(str(exc), exc.status, "BadRequestError" if exc.status == 400 else "Error"),
        status_code=exc.status,
        headers=_retry_headers(exc.retry_after_s),
    )


@serve.ingress(fastapi_app)
class Ingress:
    """HTTP (OpenAI API) and gRPC front end; holds no model, takes no CPU."""

    def __init__(self, engine: DeploymentHandle, config: dict[str, Any]) -> None:
        self.engine = engine
        self.config = AppConfig.model_validate(config)
        self.model_name = self.config.engine.served_model_name
        self.timeout_s = self.config.request_timeout_s
        self.metrics = _Metrics()
        self.token_rate = live_state.RateWindow()  # between /metrics scrapes (live cost)
        self.availability = _EngineAvailability(self.config.engine.data_parallel_size)
        self.tracing = tracing.process_tracing(
            self.config.tracing, f"{self.config.deployment_name}-ingress", {}
        )
        self.api_key: str | None = None
        if self.config.api_key_env:
            self.api_key = os.environ.get(self.config.api_key_env)
            if not self.api_key:
                raise RuntimeError(
                    f"api_key_env={self.config.api_key_env!r} but that environment variable "
                    "is empty in the serving pod: set it (e.g. from a Secret) or unset api_key_env"
                )

    # ---- shared checks ---------------------------------------------------------------------

    def _check_key(self, presented: str | None) -> None:
        if self.api_key is None:
            return
        token = (presented or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise _ClientError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    def _check_model(self, body: dict[str, Any]) -> None:
        problem = body_checks.text_problem(body) or schemas.schema_problem(body)
        if problem:
            raise _ClientError(400, problem, reason=Reason.INVALID_SCHEMA)
        model = body.get("model")
        if model is not None and model != self.model_name:
            # HTTP 400 (as asked of this API); gRPC NOT_FOUND.
            raise _ClientError(
                400,
                f"model {model!r} is not served here; available models: [{self.model_name!r}]",
                reason=Reason.MODEL_NOT_FOUND,
            )

    async def _engine_events(
        self, kind: Kind, body: dict[str, Any], span: Any = None
    ) -> tuple[ResponseHead, AsyncIterator[Any], DeploymentResponseGenerator[Any]]:
        """Start the engine request; returns (head, remaining events, the handle generator)."""
        from ray.serve.exceptions import BackPressureError

        if await self.availability.none_can_serve():
            raise _ClientError(
                503,
                "no engine replica is running (being replaced, or waiting for its nodes); retry",
                retry_after_s=5,
                reason=Reason.NO_REPLICA,
            )
        gen = cast(
            DeploymentResponseGenerator[Any],
            self.engine.options(stream=True).openai.remote(
                kind, body, tracing.headers_of(span) if span is not None else None
            ),
        )
        try:
            head = await gen.__anext__()
        except BackPressureError as exc:
            gen.cancel()
            raise _ClientError(
                503, f"server busy: {exc}", retry_after_s=1, reason=Reason.QUEUE_FULL
            ) from exc
        return head, gen, gen

    # ---- HTTP ------------------------------------------------------------------------------

    async def _traced_get(self, request: Request, endpoint: str, answer: Any) -> Response:
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
                self.metrics.text() + replicas + await self._app_metrics() + engine_text,
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
            except _ClientError as exc:
                return _error_response(exc)
            return JSONResponse(await self.engine.models.remote())

        return await self._traced_get(request, "/v1/models", answer)

    @fastapi_app.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        return await self._http_openai("completions", request)

    @fastapi_app.post("/v1/chat/completions")
    async def http_chat(self, request: Request) -> Response:
        return await self._http_openai("chat", request)

    async def _http_openai(self, kind: Kind, request: Request) -> Response:
        started = time.monotonic()
        endpoint = f"/v1/{'completions' if kind == 'completions' else 'chat/completions'}"
        span = self.tracing.request_span("http", endpoint, request.headers, self.model_name)
        try:
            self._check_key(request.headers.get("authorization"))
            try:
                body = await request.json()
            # RecursionError: nesting deeper than Python's parser goes (a client's body).
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise _ClientError(400, f"request body is not valid JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise _ClientError(400, "request body must be a JSON object")
            self._check_model(body)
            try:
                async with asyncio.timeout(self.timeout_s):
                    head, events, gen = await self._engine_events(kind, body, span)
                    if not head.stream:
                        payload = await events.__anext__()
            except TimeoutError as exc:
                raise _ClientError(504, f"request timed out after {self.timeout_s}s") from exc
            except RayActorError as exc:
                raise _replica_lost(exc) from exc
        except _ClientError as exc:
            self.metrics.observe("http", endpoint, str(exc.status), started, span)
            return _error_response(exc)
        if not head.stream:
            self.metrics.observe("http", endpoint, str(head.status), started, span)
            headers = _retry_headers(head.retry_after_s)
            return JSONResponse(payload, status_code=head.status, headers=headers)
        return StreamingResponse(
            self._sse(events, gen, endpoint, started, span),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _sse(
        self, events: AsyncIterator[Any], gen: Any, endpoint: str, started: float, span: Any
    ) -> AsyncIterator[str]:
        code = "200"
        try:
            async with asyncio.timeout(max(0.0, started + self.timeout_s - time.monotonic())):
                async for chunk in events:
                    yield chunk
        except TimeoutError:
            code = "504"
            message = f"request timed out after {self.timeout_s}s"
            yield f"data: {json.dumps(error_body(message, 504, 'TimeoutError'))}\n\n"
        except RayActorError as exc:
            code = "503"
            lost = _replica_lost(exc)
            yield f"data: {json.dumps(error_body(str(lost), 503, 'ServiceUnavailableError'))}\n\n"
        finally:
            # Client gone or deadline: stop the engine request (no-op when it already finished).
            gen.cancel()
            self.metrics.observe("http", endpoint, code, started, span)

    # ---- gRPC (method names = RPC names of inference.proto) --------------------------------

    async def Complete(self, request: pb.CompleteRequest, grpc_context: Any = None) -> Any:
        return await self._grpc_unary(
            "completions",
            "Complete",
            request,
            grpc_context,
            lambda raw: grpc_api.completion_body(decode(raw, pb.CompleteRequest)),
            grpc_api.completion_response,
        )

    async def Chat(self, request: pb.ChatRequest, grpc_context: Any = None) -> Any:
        return await self._grpc_unary(
            "chat",
            "Chat",
            request,
            grpc_context,
            lambda raw: grpc_api.chat_body(decode(raw, pb.ChatRequest)),
            grpc_api.chat_response,
        )

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateChunk]:
        started = time.monotonic()
        code = "OK"
        gen = None
        span = self.tracing.request_span(
            "grpc", "Generate", tracing.grpc_carrier(grpc_context), self.model_name
        )
        try:
            self._check_key(_grpc_metadata(grpc_context, "authorization"))
            try:
                request = decode(request, pb.GenerateRequest)
            except UndecodableRequest as exc:
                raise _ClientError(400, str(exc)) from exc
            which = request.WhichOneof("input")
            if which is None:
                raise _ClientError(400, "set GenerateRequest.completion or GenerateRequest.chat")
            kind: Kind = "completions" if which == "completion" else "chat"
            try:
                body = (
                    grpc_api.completion_body(request.completion, stream=True)
                    if kind == "completions"
                    else grpc_api.chat_body(request.chat, stream=True)
                )
            except grpc_api.InvalidRequest as exc:
                raise _ClientError(400, str(exc)) from exc
            self._check_model(body)
            try:
                async with asyncio.timeout(self.timeout_s):
                    head, events, gen = await self._engine_events(kind, body, span)
                    if not head.stream:  # refused before streaming: an error body
                        payload = await events.__anext__()
                        refusal = grpc_api.error_message(payload) or "request failed"
                        raise _ClientError(head.status, refusal, reason=head.reason)
                    async for chunk in events:
                        for payload in grpc_api.parse_sse(chunk):
                            failure = grpc_api.error_message(payload)
                            if failure is not None:
                                raise _ClientError(grpc_api.error_status(payload), failure)
                            for item in grpc_api.stream_chunks(payload):
                                yield item
            except TimeoutError as exc:
                raise _ClientError(504, f"request timed out after {self.timeout_s}s") from exc
            except RayActorError as exc:
                raise _replica_lost(exc) from exc
        except _ClientError as exc:
            code = _grpc_code(exc.status, exc.reason).name
            _abort_grpc(grpc_context, _grpc_code(exc.status, exc.reason), str(exc))
        finally:
            if gen is not None:
                gen.cancel()
            self.metrics.observe("grpc", "Generate", code, started, span)

    async def _traced_rpc(self, grpc_context: Any, method: str, answer: Any) -> Any:
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
                self._check_key(_grpc_metadata(grpc_context, "authorization"))
            except _ClientError as exc:
                _abort_grpc(grpc_context, _grpc_code(exc.status, Reason.UNSPECIFIED), str(exc))
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
            _abort_grpc(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if service not in self.HEALTH_SERVICES:
            # The protocol: Check answers NOT_FOUND for a service the server does not know.
            _abort_grpc(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
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

    async def _grpc_unary(
        self,
        kind: Kind,
        method: str,
        request: Any,
        grpc_context: Any,
        to_body: Any,
        to_response: Any,
    ) -> Any:
        started = time.monotonic()
        span = self.tracing.request_span(
            "grpc", method, tracing.grpc_carrier(grpc_context), self.model_name
        )
        try:
            self._check_key(_grpc_metadata(grpc_context, "authorization"))
            try:
                body = to_body(request)
            except (grpc_api.InvalidRequest, UndecodableRequest) as exc:
                raise _ClientError(400, str(exc)) from exc
            self._check_model(body)
            gen = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    head, events, gen = await self._engine_events(kind, body, span)
                    payload = await events.__anext__()
            except TimeoutError as exc:
                raise _ClientError(504, f"request timed out after {self.timeout_s}s") from exc
            except RayActorError as exc:
                raise _replica_lost(exc) from exc
            finally:
                if gen is not None:
                    gen.cancel()
            if head.status != 200:
                message = grpc_api.error_message(payload) or "request failed"
                raise _ClientError(head.status, message, reason=head.reason)
        except _ClientError as exc:
            code = _grpc_code(exc.status, exc.reason).name
            self.metrics.observe("grpc", method, code, started, span)
            _abort_grpc(grpc_context, _grpc_code(exc.status, exc.reason), str(exc))
        self.metrics.observe("grpc", method, "OK", started, span)
        return to_response(payload)


def engine_deployment_options(config: AppConfig) -> dict[str, Any]:
    """Ray Serve options of the engine deployment: one Serve replica = one vLLM engine with its
    TP x PP ranks; with DP > 1, one gang of DP such replicas is one MoEDeployment replica."""
    dp = config.engine.data_parallel_size
    placement: dict[str, Any] = {
        "placement_group_bundles": engine_bundles(config),
        "placement_group_strategy": config.resources.placement_strategy,
    }
    if dp > 1:
        from ray.serve.config import GangSchedulingConfig

        # Serve refuses a per-replica strategy beside a gang; the gang packs its bundles.
        placement = {
            "placement_group_bundles": engine_bundles(config),
            "gang_scheduling_config": GangSchedulingConfig(
                gang_size=dp,
                gang_placement_strategy="PACK",
                # A DP group that lost a rank cannot step its MoE layers: restart all of it.
                runtime_failure_policy="RESTART_GANG",
            ),
        }
    return {
        "name": ENGINE_DEPLOYMENT,
        # A fixed count, or replicas following queue depth (moe_serving.autoscaling), counted
        # in Serve replicas: DP of them per MoEDeployment replica.
        **autoscaling.replica_count_options(
            config.autoscaling, config.max_ongoing_requests, gang_size=dp
        ),
        # The replica actor holds no rank itself: it sits in its first bundle, free.
        "ray_actor_options": {"num_cpus": 0},
        **placement,
        # Our admission queue decides about 503s; Ray must deliver queued requests to it.
        "max_ongoing_requests": (
            config.max_ongoing_requests + config.max_queued_requests + _CONTROL_HEADROOM
        ),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # On shutdown Serve stops routing, waits for in-flight requests, then calls __del__.
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": min(config.request_timeout_s, 120),
    }


def ingress_deployment_options(config: AppConfig) -> dict[str, Any]:
    """Ray Serve options of the ingress: no CPU (it only forwards), never the bottleneck."""
    return {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": 1,
        # On the head node (Ray's `node:__internal_head__` resource), beside Serve's controller:
        # it lives as long as the cluster. On a worker node it would die with that node and cut
        # every request in flight through it, on every replica, without an answer.
        "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        "max_ongoing_requests": 10_000,
        # A rolling update replaces the ingress and the engine together: the old ingress may
        # hold requests waiting for the new engine replica to come up. It bounds every request
        # by request_timeout_s, so letting it drain that long loses none (Serve's default 20 s
        # force-killed such requests: a 500 from the proxy). It takes no CPU while it waits.
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": config.request_timeout_s + 10,
    }


def build(config: AppConfig, engine_cls: type) -> serve.Application:
    """The application with `engine_cls` as its engine deployment (LLMEngine, or a stand-in
    with the same constructor and methods in placement tests): same options, same ingress."""
    config_json = config.model_dump(mode="json")
    engine = serve.deployment(**engine_deployment_options(config))(engine_cls).bind(config_json)
    return serve.deployment(**ingress_deployment_options(config))(Ingress).bind(engine, config_json)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application for the operator's `serveConfigV2` (`args` = `AppConfig` JSON)."""
    return build(AppConfig.model_validate(args), LLMEngine)

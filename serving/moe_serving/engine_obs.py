"""What an engine replica observes of each request: its `moe.engine` span and its metrics.

`EngineServer` calls `EngineObserver.begin()` per request and feeds it the request's events;
`instrument_engine()` wraps the vLLM engine's `generate` so that (a) the request's trace context
reaches vLLM (`trace_headers`, which joins vLLM's `llm_request` span to ours) and (b) vLLM's
`RequestOutput`s (token counts, finish reasons, vLLM's timing stats) reach the observer, for the
completions and chat paths alike, without touching vLLM's OpenAI serving code. The current
request is found through a context variable set just before vLLM's serving layer calls
`generate` (in the same task).
"""

from __future__ import annotations

import contextvars
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from moe_serving import expert_load, expert_metrics, hops, metrics, request_cost, tracing
from moe_serving.config import AppConfig
from moe_serving.protocol import ResponseHead

_CURRENT: contextvars.ContextVar[EngineRequest | None] = contextvars.ContextVar(
    "moe_engine_request", default=None
)


def _replica_name() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Ray Serve (unit use)
        return f"{socket.gethostname()}-{os.getpid()}"


class EngineObserver:
    """Tracing + metrics of one replica."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.model = config.engine.served_model_name
        self.replica = _replica_name()
        self.tracing: tracing.Tracing | None = None
        self.metrics: metrics.EngineMetrics | None = None
        self.expert_load_dir: Path | None = None
        self.vllm_tracing = tracing.otlp_endpoint(config.tracing) is not None
        # Since start, for the live-state report (moe_serving.live_state).
        self.generated_tokens_total = 0
        self.requests_total = 0
        self.active = 0  # requests begun and not yet ended, whatever stage they are at
        # Each request's share of the replica's price (request_cost.py), when it has a price.
        price = config.hourly_cost_per_replica_usd
        self.costs = request_cost.CostMeter(price) if price else None

    def environment(self) -> dict[str, str]:
        """Environment for vLLM's processes (set before they start): expert-load directory and
        the OTLP protocol vLLM's own exporter uses."""
        self.expert_load_dir = Path(tempfile.mkdtemp(prefix="moe-expert-load-"))
        env = {expert_load.ENV_DIR: str(self.expert_load_dir)}
        if self.vllm_tracing:
            env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = self.config.tracing.protocol
        return env

    def engine_args(self, args: Any) -> None:
        """Turn on vLLM's request tracing (it exports only over OTLP) when an endpoint is set."""
        endpoint = tracing.otlp_endpoint(self.config.tracing)
        if endpoint is not None:
            args.otlp_traces_endpoint = endpoint

    def start(self) -> None:
        """Before vLLM starts: install the tracer provider vLLM's spans will use too."""
        engine = self.config.engine
        self.tracing = tracing.process_tracing(
            self.config.tracing,
            f"{self.config.deployment_name}-engine",
            {"moe.replica": self.replica, "moe.model": self.model},
        )
        self.metrics = metrics.engine_metrics(self.model)
        if self.expert_load_dir is not None:
            expert_metrics.register_expert_load(
                self.expert_load_dir,
                self.model,
                self.config.per_expert_metrics,
                self.config.imbalance_window_s,
            )
        self.parallel = {
            "moe.parallel.tp": engine.tensor_parallel_size,
            "moe.parallel.dp": engine.data_parallel_size,
            "moe.parallel.pp": engine.pipeline_parallel_size,
            "moe.parallel.ep": (
                engine.tensor_parallel_size * engine.data_parallel_size
                if engine.enable_expert_parallel
                else 1
            ),
        }

    def begin(
        self, kind: str, body: Mapping[str, Any], trace_headers: Mapping[str, str] | None
    ) -> EngineRequest:
        request = EngineRequest(self, kind, body, trace_headers)
        self.active += 1
        return request


class EngineRequest:
    """One request's span and measurements inside the replica."""

    def __init__(
        self,
        observer: EngineObserver,
        kind: str,
        body: Mapping[str, Any],
        trace_headers: Mapping[str, str] | None,
    ) -> None:
        self.observer = observer
        self.received = time.monotonic()
        self.received_wall = time.time()
        self.queue_wait_s: float | None = None
        self.status = 0
        self.outcome = "internal"
        self.error: str | None = None
        self.prompt_tokens = 0
        self.output_tokens: dict[int, int] = {}
        self.finish_reasons: dict[int, str] = {}
        self.texts: dict[int, str] = {}
        self.ttft_s: float | None = None
        self.tpot_s: float | None = None
        self.ended = False
        self.cost: request_cost.RequestCost | None = None
        self.complete = False  # the whole response was produced (a later cancel is no failure)
        tracer = observer.tracing
        attributes: dict[str, Any] = {
            "gen_ai.request.model": observer.model,
            "moe.endpoint": kind,
            "moe.replica": observer.replica,
            "moe.stream": bool(body.get("stream")),
            **getattr(observer, "parallel", {}),
        }
        if tracer is not None and tracer.record_content:
            prompt = body.get("prompt", body.get("messages"))
            attributes["moe.prompt"] = prompt if isinstance(prompt, str) else json.dumps(prompt)
        self.span = (
            tracer.start("moe.engine", trace_headers, attributes, SpanKind.SERVER)
            if tracer is not None
            else None
        )
        _CURRENT.set(self)

    # ---- fed by EngineServer -----------------------------------------------------------------

    def admitted(self) -> None:
        self.queue_wait_s = time.monotonic() - self.received

    def event(self, event: Any) -> None:
        if isinstance(event, ResponseHead):
            self.status = event.status
            self.outcome = "ok" if self.status == 200 else str(event.reason)
            return
        if isinstance(event, dict):  # the one body of a non-streaming response
            self.complete = True
            if isinstance(event.get("error"), dict):
                self.error = str(event["error"].get("message"))
        elif isinstance(event, str) and event.startswith("data: [DONE]"):
            self.complete = True
        elif isinstance(event, str) and event.startswith("data: {") and '"error"' in event:
            try:
                payload = json.loads(event[len("data: ") :])
            except ValueError:
                return
            if isinstance(payload.get("error"), dict):
                self.error = str(payload["error"].get("message"))
                self.outcome = "internal"
                self.status = 500

    def cancelled(self, swallowed: bool = False) -> None:
        """The caller went away. `swallowed`: vLLM answered a body to nobody after aborting."""
        if swallowed or not self.complete:
            self.outcome = "cancelled"
            self.error = "client went away"

    # ---- fed by the wrapped vLLM generate ----------------------------------------------------

    def vllm_headers(self) -> dict[str, str] | None:
        if self.span is None or not self.observer.vllm_tracing:
            return None
        return tracing.headers_of(self.span)

    def output(self, out: Any, delta: bool) -> None:
        """One vLLM `RequestOutput` (`delta`: it carries only the new tokens)."""
        if out.prompt_token_ids is not None:
            self.prompt_tokens = len(out.prompt_token_ids)
        for completion in out.outputs:
            i = completion.index
            n = len(completion.token_ids)
            self.output_tokens[i] = self.output_tokens.get(i, 0) + n if delta else n
            if self.observer.tracing is not None and self.observer.tracing.record_content:
                self.texts[i] = (
                    self.texts.get(i, "") + completion.text if delta else completion.text
                )
            if completion.finish_reason is not None:
                self.finish_reasons[i] = str(completion.finish_reason)
        stats = getattr(out, "metrics", None)
        if out.finished and stats is not None and getattr(stats, "first_token_latency", 0) > 0:
            # vLLM measures from its own arrival; add the time before it (our queue).
            before_vllm = max(0.0, stats.arrival_time - self.received_wall)
            self.ttft_s = before_vllm + stats.first_token_latency
            if stats.num_generation_tokens > 1 and stats.last_token_ts > stats.first_token_ts:
                self.tpot_s = (stats.last_token_ts - stats.first_token_ts) / (
                    stats.num_generation_tokens - 1
                )

    def cost_start(self, prompt: Any) -> None:
        """vLLM received this request: its share of the replica's cost starts."""
        costs = self.observer.costs
        if costs is None:
            return
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        ids = ids if ids is not None else getattr(prompt, "prompt_token_ids", None)
        costs.start(id(self), len(ids) if ids is not None else 0)

    def _cost_finish(self) -> None:
        costs = self.observer.costs
        if costs is not None and self.cost is None:
            self.cost = costs.finish(id(self))

    async def watch(self, outputs: AsyncIterator[Any], delta: bool) -> AsyncIterator[Any]:
        if hops.ENABLED:
            hops.mark("vllm.generate")
        costs = self.observer.costs
        try:
            async for out in outputs:
                self.output(out, delta)
                if costs is not None:
                    costs.progress(id(self), self.prompt_tokens + sum(self.output_tokens.values()))
                    if out.finished:
                        self._cost_finish()
                if hops.ENABLED:
                    hops.mark("vllm.output")
                    stats = getattr(out, "metrics", None)
                    if out.finished and stats is not None:
                        # vLLM's own clock: its arrival and first token (wall time).
                        hops.mark("vllm.arrival", at_ns=int(stats.arrival_time * 1e9))
                        first = stats.arrival_time + getattr(stats, "first_token_latency", 0.0)
                        hops.mark("vllm.first_token", at_ns=int(first * 1e9))
                yield out
        finally:
            self._cost_finish()  # aborted or cancelled: the share it had so far

    # ---- end ---------------------------------------------------------------------------------

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        generated = sum(self.output_tokens.values())
        obs = self.observer
        obs.generated_tokens_total += generated
        obs.requests_total += 1
        obs.active -= 1
        if obs.metrics is not None:
            obs.metrics.observe(
                self.outcome,
                self.queue_wait_s,
                self.ttft_s,
                self.tpot_s,
                self.prompt_tokens,
                generated,
            )
        span = self.span
        if span is None:
            return
        attrs: dict[str, Any] = {
            "moe.outcome": self.outcome,
            "gen_ai.usage.prompt_tokens": self.prompt_tokens,
            "gen_ai.usage.completion_tokens": generated,
        }
        if self.queue_wait_s is not None:
            attrs["moe.queue_wait_s"] = self.queue_wait_s
        if self.cost is not None:
            attrs["moe.cost_usd"] = self.cost.total_usd
            attrs["moe.prompt_cost_usd"] = self.cost.prompt_usd
            attrs["moe.output_cost_usd"] = self.cost.output_usd
        if self.ttft_s is not None:
            attrs["moe.time_to_first_token_s"] = self.ttft_s
        if self.tpot_s is not None:
            attrs["moe.time_per_output_token_s"] = self.tpot_s
        if self.finish_reasons:
            reasons = [self.finish_reasons[i] for i in sorted(self.finish_reasons)]
            attrs["gen_ai.response.finish_reasons"] = reasons
        if self.texts:
            attrs["moe.output"] = json.dumps([self.texts[i] for i in sorted(self.texts)])
        span.set_attributes(attrs)
        if self.outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, self.error or self.outcome))
        else:
            span.set_status(Status(StatusCode.OK))
        if self.status:
            span.set_attribute("http.response.status_code", self.status)
        span.end()


def instrument_engine(engine: Any) -> None:
    """Wrap `engine.generate` (instance attribute: vLLM's serving objects share the engine)."""
    original = engine.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        request = _CURRENT.get()
        if request is None or request.ended:
            return original(*args, **kwargs)
        if kwargs.get("trace_headers") is None:
            kwargs["trace_headers"] = request.vllm_headers()
        request.cost_start(args[0] if args else kwargs.get("prompt"))
        params = args[1] if len(args) > 1 else kwargs.get("sampling_params")
        from vllm.sampling_params import RequestOutputKind

        delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        return request.watch(original(*args, **kwargs), delta)

    engine.generate = generate

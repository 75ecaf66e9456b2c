"""OpenTelemetry tracing of every generation request, from the ingress into vLLM.

One trace per request (a caller's W3C `traceparent` is honoured, else a new root):

    moe.ingress            (Ingress actor; SERVER span: protocol, endpoint, status)
     └─ moe.engine         (LLMEngine replica; queue wait, TTFT, tokens, model, replica,
         │                  EP/TP/DP sizes, finish reason, outcome)
         └─ llm_request    (vLLM's own span, joined by passing `trace_headers` into
                            `AsyncLLM.generate`; only when an OTLP endpoint is set, since
                            vLLM enables its tracing through `otlp_traces_endpoint` only)

Each process installs one `TracerProvider` as the global one *before* vLLM starts, so that
vLLM's `llm_request` spans (made with the global provider in the replica process) go through
the same sampler and exporters as ours (OpenTelemetry lets the global provider be set once:
vLLM's own later attempt is ignored). Exporters: OTLP gRPC or HTTP to `TracingArgs.endpoint`,
the console, and a JSONL file (one span per line; several processes append to it).
Prompt and output text are recorded only with `TracingArgs.record_content`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from moe_serving.config import TracingArgs

logger = logging.getLogger("ray.serve.moe_serving.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as a flat JSON-able dict (the JSONL format; ids in W3C hex)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "attributes": dict(span.attributes or {}),
        "resource": dict(span.resource.attributes),
    }


class JsonlSpanExporter(SpanExporter):
    """Appends one JSON line per span; one `write` per batch on an O_APPEND file, so that the
    processes of a local run (ingress, replicas) can share a file without tearing lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def otlp_endpoint(args: TracingArgs) -> str | None:
    """The exporter URL: OTLP/HTTP needs the `/v1/traces` path, added when only a host is given."""
    if not args.enabled or not args.endpoint:
        return None
    if args.protocol == "http/protobuf" and urlparse(args.endpoint).path in ("", "/"):
        return args.endpoint.rstrip("/") + "/v1/traces"
    return args.endpoint


def _otlp_exporter(args: TracingArgs, endpoint: str) -> SpanExporter:
    if args.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


def make_provider(args: TracingArgs, service: str, attributes: Mapping[str, str]) -> TracerProvider:
    """A provider with the spec's sampler and exporters (console/JSONL flush span by span)."""
    resource = Resource.create({"service.name": service, **attributes})
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(args.sample_ratio))
    )
    endpoint = otlp_endpoint(args)
    if endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(args, endpoint)))
    if args.console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if args.jsonl_path:
        provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(args.jsonl_path)))
    return provider


class Tracing:
    """This process's tracer (a no-op one when tracing is off)."""

    def __init__(self, args: TracingArgs, service: str, attributes: Mapping[str, str]) -> None:
        self.args = args
        self.record_content = args.enabled and args.record_content
        self.provider: TracerProvider | None = None
        if args.enabled:
            self.provider = make_provider(args, service, attributes)
            trace.set_tracer_provider(self.provider)  # once per process; see module docstring
            self.tracer: trace.Tracer = self.provider.get_tracer("moe_serving")
        else:
            self.tracer = trace.NoOpTracer()

    def start(
        self,
        name: str,
        parent: Mapping[str, str] | None,
        attributes: Mapping[str, Any],
        kind: SpanKind = SpanKind.SERVER,
    ) -> Span:
        """A span that continues the W3C context in `parent` (headers/metadata) or a new root."""
        context = extract(parent) if parent else Context()
        return self.tracer.start_span(name, context=context, kind=kind, attributes=attributes)

    def request_span(
        self,
        protocol: str,
        endpoint: str,
        carrier: Mapping[str, str],
        model: str,
        method: str = "POST",
    ) -> Span:
        """The ingress span of one request (continues the caller's `traceparent`, if any)."""
        attributes = {
            "moe.protocol": protocol,
            "moe.endpoint": endpoint,
            "gen_ai.request.model": model,
        }
        if protocol == "grpc":
            attributes.update({"rpc.system": "grpc", "rpc.method": endpoint})
        else:
            attributes.update({"http.request.method": method, "http.route": endpoint})
        return self.start("moe.ingress", carrier, attributes)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()
            self.provider.shutdown()


def extract(carrier: Mapping[str, str]) -> Context:
    """Trace context from HTTP headers or gRPC metadata (keys compared in lower case)."""
    lowered = {k.lower(): v for k, v in carrier.items() if k.lower() in TRACE_HEADERS}
    return _PROPAGATOR.extract(lowered)


def headers_of(span: Span) -> dict[str, str]:
    """W3C headers naming `span` as the parent (empty for an invalid span context)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def end_span(span: Span, status_code: int, message: str | None = None) -> None:
    """Close a request span with its HTTP status; 4xx/5xx are errors."""
    span.set_attribute("http.response.status_code", status_code)
    if status_code >= 400:
        span.set_status(Status(StatusCode.ERROR, message or f"HTTP {status_code}"))
    else:
        span.set_status(Status(StatusCode.OK))
    span.end()


def end_request_span(span: Span, code: str) -> None:
    """Close an ingress span with its outcome: an HTTP status ("200") or a gRPC code ("OK")."""
    if code.isdigit():
        end_span(span, int(code))
        return
    span.set_attribute("rpc.grpc.status_code", code)
    span.set_status(Status(StatusCode.OK) if code == "OK" else Status(StatusCode.ERROR, code))
    span.end()


def grpc_carrier(grpc_context: Any) -> dict[str, str]:
    """The W3C trace headers among a gRPC call's metadata."""
    if grpc_context is None:
        return {}
    return {
        str(k).lower(): str(v)
        for k, v in grpc_context.invocation_metadata()
        if str(k).lower() in TRACE_HEADERS
    }


_PROCESS: list[Tracing] = []


def process_tracing(args: TracingArgs, service: str, attributes: Mapping[str, str]) -> Tracing:
    """The process's `Tracing`, made once (a replica restarted in the same process reuses it)."""
    if not _PROCESS:
        _PROCESS.append(Tracing(args, service, attributes))
    return _PROCESS[0]

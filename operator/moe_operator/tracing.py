"""OpenTelemetry traces of the operator's reconciles.

One trace per reconcile pass:

    moe_operator.reconcile   (INTERNAL; k8s namespace/name, generation, outcome, writes,
     │                        problem reason; status ERROR when the API stopped the pass)
     └─ moe_operator.api     (CLIENT; one per API call of the operator's own client: method,
                              path, operation, HTTP status; errors on 4xx/5xx)

The settings (settings.py, env `MOE_OPERATOR_OTLP_ENDPOINT`, `..._OTLP_PROTOCOL`,
`..._TRACE_SAMPLE_RATIO`) follow the serving side's conventions (moe_serving/tracing.py): OTLP
gRPC or HTTP (`/v1/traces` added to a bare HTTP host), a parent-based trace-id ratio sampler.
Without an endpoint nothing is exported and the tracer is a no-op. The operator keeps its own
provider rather than the process-global one, so that embedding programs (and tests) keep theirs.
Only names, generations, outcomes and API paths are recorded: never spec contents, never
anything from a Secret (the operator never reads one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from moe_operator.settings import OperatorConfig

SERVICE_NAME = "moe-operator"
RECONCILE_SPAN = "moe_operator.reconcile"
API_SPAN = "moe_operator.api"
Tracer = trace.Tracer

#: Span processors added to every operator run's provider in this process (tests, programs that
#: embed the operator). They are not shut down with the run: their owner does that.
EXTRA_PROCESSORS: list[SpanProcessor] = []


def otlp_endpoint(cfg: OperatorConfig) -> str | None:
    """The exporter URL: OTLP/HTTP needs the `/v1/traces` path, added when only a host is given."""
    if not cfg.otlp_endpoint:
        return None
    if cfg.otlp_protocol != "grpc" and urlparse(cfg.otlp_endpoint).path in ("", "/"):
        return cfg.otlp_endpoint.rstrip("/") + "/v1/traces"
    return cfg.otlp_endpoint


def _otlp_exporter(cfg: OperatorConfig, endpoint: str) -> SpanExporter:
    if cfg.otlp_protocol != "grpc":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


@dataclass
class Tracing:
    """One operator run's tracer (a no-op one when nothing would receive the spans)."""

    tracer: trace.Tracer
    provider: TracerProvider | None = None
    owned: list[SpanProcessor] = field(default_factory=list)

    def shutdown(self) -> None:
        """Flush, and stop the exporters this run created."""
        if self.provider is not None:
            self.provider.force_flush()
        for processor in self.owned:
            processor.shutdown()
        self.owned.clear()


def setup(cfg: OperatorConfig) -> Tracing:
    """The tracer of one operator run, from its settings (no endpoint: no exporter)."""
    endpoint = otlp_endpoint(cfg)
    extra: Sequence[SpanProcessor] = list(EXTRA_PROCESSORS)
    if endpoint is None and not extra:
        return Tracing(tracer=trace.NoOpTracer())
    attributes = {"service.name": SERVICE_NAME}
    if cfg.namespace:
        attributes["k8s.namespace.name"] = cfg.namespace
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=ParentBased(TraceIdRatioBased(cfg.trace_sample_ratio)),
    )
    owned: list[SpanProcessor] = []
    if endpoint is not None:
        owned.append(BatchSpanProcessor(_otlp_exporter(cfg, endpoint)))
    for processor in (*owned, *extra):
        provider.add_span_processor(processor)
    return Tracing(tracer=provider.get_tracer("moe_operator"), provider=provider, owned=owned)


@contextlib.contextmanager
def reconcile_span(tracer: trace.Tracer, meta: Mapping[str, Any]) -> Iterator[Span]:
    """The span of one reconcile pass of the MoEDeployment with this metadata (current span
    while it runs, so the API calls made meanwhile are its children)."""
    attributes: dict[str, AttributeValue] = {
        "k8s.namespace.name": str(meta.get("namespace") or ""),
        "moe.deployment.name": str(meta.get("name") or ""),
        "moe.deployment.generation": int(meta.get("generation") or 0),
    }
    with tracer.start_as_current_span(
        RECONCILE_SPAN, kind=SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield span


def record_outcome(
    span: Span,
    writes: Sequence[str],
    problem_reason: str | None,
    error_status: int | None,
    error_reason: str | None,
) -> None:
    """What the pass did: its writes ("create RayService/x", "patch status"), or that it wrote
    nothing, the reason a spec cannot be deployed, or the API error that stopped it. Only the
    problem's reason is recorded: its message may quote the spec."""
    if error_status is not None:
        outcome = "error"
    elif problem_reason is not None:
        outcome = "problem"
    else:
        outcome = "changed" if writes else "no-op"
    span.set_attribute("moe.reconcile.outcome", outcome)
    span.set_attribute("moe.reconcile.writes", list(writes))
    span.set_attribute("moe.reconcile.write_count", len(writes))
    if problem_reason is not None:
        span.set_attribute("moe.reconcile.problem", problem_reason)
    if error_status is not None:
        span.set_attribute("http.response.status_code", error_status)
        span.set_status(Status(StatusCode.ERROR, f"HTTP {error_status} {error_reason or ''}"))
    elif problem_reason is not None:
        # Reported as Degraded, but the spec is not deployed: a failed reconcile.
        span.set_status(Status(StatusCode.ERROR, problem_reason))
    else:
        span.set_status(Status(StatusCode.OK))


@contextlib.contextmanager
def api_span(
    tracer: trace.Tracer | None, method: str, path: str, operation: str
) -> Iterator[Span | None]:
    """A CLIENT span around one API call (no span without a tracer)."""
    if tracer is None:
        yield None
        return
    attributes = {"http.request.method": method, "url.path": path, "k8s.operation": operation}
    with tracer.start_as_current_span(
        API_SPAN,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        # The API's error text is not recorded: end_api_span sets the status from the code.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def end_api_span(span: Span | None, status: int) -> None:
    """The HTTP status of a call; 4xx/5xx are errors (a 404 on a read is the caller's concern)."""
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))

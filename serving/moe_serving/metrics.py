"""Prometheus series of an engine replica beyond vLLM's own `vllm:*` ones.

* request outcomes, admission-queue wait, time to first token, time per output token and
  prompt/generated token counters (rate() of the counters = tokens/s), recorded per request by
  `moe_serving.engine_obs`;
* the replica's queue depth (`EngineServer.queue_depth()`: admission queue, in the engine,
  refused and cancelled requests), read at scrape time;
* the replica count of the engine deployment, from Ray Serve's status (asked by the ingress);
* the ingress's own request counts and durations (`IngressMetrics`, a registry of its own).

The engine's series go to prometheus_client's default registry of the process (where vLLM's
metrics are, and the expert-load series of `moe_serving.expert_metrics`), so
`EngineServer.metrics_text()` exposes them together; the ingress's /metrics shows every
replica's text at once, each sample labelled with its replica (`label_replicas`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from moe_serving import tracing

if TYPE_CHECKING:
    from moe_serving.engine import QueueDepth

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineMetrics:
    """Per-request series of one replica process (created once per process)."""

    def __init__(self, model: str, registry: CollectorRegistry = REGISTRY) -> None:
        labels = ["model"]
        self.model = model
        self.requests = Counter(
            "moe_engine_requests",
            "Requests finished by the engine replica, by outcome "
            "(ok, invalid_request, not_found, queue_full, internal, cancelled).",
            ["model", "outcome"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "moe_engine_queue_wait_seconds",
            "Time a request waited in the replica's admission queue.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "moe_engine_time_to_first_token_seconds",
            "From the request reaching the replica to its first generated token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "moe_engine_time_per_output_token_seconds",
            "Mean time between output tokens of a request (after the first).",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "moe_engine_prompt_tokens", "Prompt tokens processed.", labels, registry=registry
        )
        self.generation_tokens = Counter(
            "moe_engine_generation_tokens", "Tokens generated.", labels, registry=registry
        )

    def observe(
        self,
        outcome: str,
        queue_wait_s: float | None,
        ttft_s: float | None,
        tpot_s: float | None,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        self.requests.labels(self.model, outcome).inc()
        if queue_wait_s is not None:
            self.queue_wait.labels(self.model).observe(queue_wait_s)
        if ttft_s is not None:
            self.ttft.labels(self.model).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(self.model).observe(tpot_s)
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(output_tokens)


_ENGINE_METRICS: list[EngineMetrics] = []


def engine_metrics(model: str) -> EngineMetrics:
    """The process's `EngineMetrics` (Prometheus names can be registered only once)."""
    if not _ENGINE_METRICS:
        _ENGINE_METRICS.append(EngineMetrics(model))
    return _ENGINE_METRICS[0]


class QueueCollector(Collector):
    """`queue_depth()` of the process's engine server as Prometheus series, computed at scrape
    time."""

    def __init__(self, queue_depth: Callable[[], QueueDepth]) -> None:
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[Any]:
        depth = self.queue_depth()
        gauge = GaugeMetricFamily(
            "moe_replica_requests",
            "Requests in this replica, by where they are.",
            labels=["where"],
        )
        gauge.add_metric(["admission_queue"], depth.queued)
        gauge.add_metric(["engine"], depth.in_engine)
        yield gauge
        total = GaugeMetricFamily(
            "moe_replica_queue_depth", "Queued plus in-engine requests (autoscaling signal)."
        )
        total.add_metric([], depth.total)
        yield total
        rejected = CounterMetricFamily(
            "moe_replica_rejected_requests", "Requests refused because the queue was full."
        )
        rejected.add_metric([], depth.rejected_total)
        yield rejected
        cancelled = CounterMetricFamily(
            "moe_replica_cancelled_requests", "Requests dropped because the client went away."
        )
        cancelled.add_metric([], depth.cancelled_total)
        yield cancelled


_QUEUE_COLLECTOR: list[QueueCollector] = []


def register_queue_depth(queue_depth: Callable[[], QueueDepth]) -> None:
    """Expose `queue_depth()` as Prometheus series (once per process; a later server's
    `queue_depth` replaces the earlier one)."""
    if _QUEUE_COLLECTOR:
        _QUEUE_COLLECTOR[0].queue_depth = queue_depth
        return
    collector = QueueCollector(queue_depth)
    _QUEUE_COLLECTOR.append(collector)
    REGISTRY.register(collector)


class IngressMetrics:
    """The ingress's own Prometheus series (a private registry: no clash with the engine's)."""

    def __init__(self) -> None:
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
        """One answered request (`started`: its `time.monotonic()`); ends its span, if any."""
        self.requests.labels(protocol, endpoint, code).inc()
        self.latency.labels(protocol, endpoint).observe(time.monotonic() - started)
        if span is not None:
            tracing.end_request_span(span, code)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


#: The prefix-affinity router's series (`moe_serving.routing`), in their own registry: the router
#: runs in the ingress, whose /metrics appends them. Here, not in routing.py: Serve pickles the
#: router's module by value, so a counter there would be a copy nobody scrapes.
ROUTING_REGISTRY = CollectorRegistry(auto_describe=True)
ROUTING_DECISIONS = Counter(
    "moe_routing_decisions",
    "Engine-replica choices of the prefix-affinity router, by reason: affinity (the replica "
    "holding the longest known prefix), load (that replica was too busy), fallback (no known "
    "prefix: power of two choices).",
    ["reason"],
    registry=ROUTING_REGISTRY,
)


def count_routing_decision(reason: str) -> None:
    """One choice of the prefix-affinity router (reason: affinity, load or fallback)."""
    ROUTING_DECISIONS.labels(reason).inc()


def routing_text() -> str:
    """This process's routing decisions (nothing until the prefix-affinity router decided)."""
    if not any(m.samples for m in ROUTING_DECISIONS.collect()):
        return ""
    return generate_latest(ROUTING_REGISTRY).decode()


def replicas_text(deployment: str) -> str:
    """`moe_serving_replicas{state}` of a deployment of the calling replica's application, from
    Ray Serve's status (asked by the ingress; empty text when Serve cannot tell)."""
    from ray import serve

    try:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
    except Exception:  # not in a replica, or the controller is unreachable: no series
        return ""
    states: dict[str, int] = {}
    if app is not None and deployment in app.deployments:
        states = {str(k): int(v) for k, v in app.deployments[deployment].replica_states.items()}
    gauge = GaugeMetricFamily(
        "moe_serving_replicas",
        "Engine replicas of this application, by Ray Serve replica state.",
        labels=["deployment", "state"],
    )
    for state, n in sorted(states.items()):
        gauge.add_metric([deployment, state], n)
    registry = CollectorRegistry(auto_describe=False)

    class _Once(Collector):
        def collect(self) -> Iterator[Any]:
            yield gauge

    registry.register(_Once())
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def app_metrics_text(
    load: Mapping[str, Any],
    running_replicas: int | None,
    hourly_cost_per_replica: float | None,
    tokens_per_s: float | None,
) -> str:
    """Application-wide series from the replicas' live reports (moe_serving.live_state): load,
    generated tokens, and the live cost per million output tokens."""
    from moe_serving.live_state import cost_per_million_tokens

    families: list[Any] = []

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            families.append(family)

    tokens = CounterMetricFamily(
        "moe_app_generated_tokens",
        "Tokens generated by the live engine replicas since they started (drops when a replica "
        "goes, which Prometheus treats as a counter reset).",
    )
    tokens.add_metric([], int(load.get("generated_tokens_total", 0)))
    families.append(tokens)
    gauge("moe_app_waiting_requests", "Requests waiting, all replicas.", load.get("waiting"))
    gauge("moe_app_running_requests", "Requests running, all replicas.", load.get("running"))
    gauge(
        "moe_app_reporting_replicas",
        "Engine replicas with a fresh load report.",
        load.get("reporting_replicas"),
    )
    hourly = None
    if hourly_cost_per_replica is not None and running_replicas is not None:
        hourly = hourly_cost_per_replica * running_replicas
    gauge("moe_app_hourly_cost_usd", "Hourly price of the running engine replicas.", hourly)
    gauge(
        "moe_app_output_tokens_per_second",
        "Output tokens per second between the last two scrapes.",
        tokens_per_s,
    )
    gauge(
        "moe_cost_per_million_output_tokens",
        "Live USD per million output tokens: hourly price of the running replicas over the "
        "output rate between the last two scrapes (absent while idle or without a price).",
        cost_per_million_tokens(hourly, tokens_per_s),
    )
    registry = CollectorRegistry(auto_describe=False)

    class _Once(Collector):
        def collect(self) -> Iterator[Any]:
            yield from families

    registry.register(_Once())
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def label_replicas(texts: Mapping[str, str], label: str = "replica") -> str:
    """One exposition of several engine replicas' texts, each sample labelled with its replica.

    Every replica registers the same series (same names, same labels), so without a label a
    scrape of several would collide; with it, Prometheus sees one series per replica whichever
    replica answered the scrape, and `sum by (...)` gives the application. A family appears once
    (first HELP and TYPE seen); a sample that already has `label` keeps it.
    """
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    merged: dict[str, Metric] = {}
    for replica in sorted(texts):
        for family in text_string_to_metric_families(texts[replica]):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                labels = (
                    sample.labels if label in sample.labels else {**sample.labels, label: replica}
                )
                target.samples.append(
                    Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
                )
    registry = CollectorRegistry(auto_describe=False)

    class _Merged(Collector):
        def collect(self) -> Iterator[Any]:
            yield from merged.values()

    registry.register(_Merged())
    return generate_latest(registry).decode()

"""The operator's reconciles are traced: one span per pass, its API writes as child spans.

Spans go to an in-memory exporter added to the operator's own provider in this process
(`moe_operator.tracing.EXTRA_PROCESSORS`); the operator itself is the real one, over HTTP.
"""

from __future__ import annotations

from typing import Any

import pytest
from expectations import EXPECTED, children, deploy_ready, is_, unplannable
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, StatusCode

from moe_operator import settings, tracing
from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, Operator, mixtral
from tests.support.waiting import eventually


def reconciles(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == tracing.RECONCILE_SPAN]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def writes_of(span: ReadableSpan) -> list[str]:
    return list(attrs(span).get("moe.reconcile.writes", ()))


def api_children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    ctx = parent.get_span_context()
    assert ctx is not None
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == tracing.API_SPAN and s.parent is not None and s.parent.span_id == ctx.span_id
    ]


def all_attribute_text(exporter: InMemorySpanExporter) -> str:
    return repr(
        [(s.name, attrs(s), s.status.description, s.events) for s in exporter.get_finished_spans()]
    )


async def test_create_is_one_traced_reconcile_with_its_writes(
    api: em.ApiServer, operator: Operator, spans: InMemorySpanExporter
) -> None:
    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children")
    await eventually(lambda: is_(api, "Progressing", "True"), message="Progressing")
    await eventually(lambda: not operator.busy, message="idle operator")

    creating = [s for s in reconciles(spans) if "create RayService/mixtral" in writes_of(s)]
    assert len(creating) == 1, [writes_of(s) for s in reconciles(spans)]
    span = creating[0]
    a = attrs(span)
    assert a["k8s.namespace.name"] == NS
    assert a["moe.deployment.name"] == "mixtral"
    assert a["moe.deployment.generation"] == 1
    assert a["moe.reconcile.outcome"] == "changed"
    assert sorted(writes_of(span)) == sorted(
        [f"create {child}" for child in EXPECTED] + ["patch status"]
    )
    assert a["moe.reconcile.write_count"] == len(writes_of(span))
    assert span.status.status_code == StatusCode.OK
    assert span.parent is None  # a root: one trace per pass

    # Each write is a child span of the pass, with the API path and the answer's status.
    calls = api_children(spans, span)
    applied = sorted(
        str(attrs(c)["url.path"]).rsplit("/", 2)[-2:][1]
        for c in calls
        if attrs(c)["k8s.operation"] == "apply"
    )
    assert applied == sorted(child.split("/")[1] for child in EXPECTED)
    status_patches = [c for c in calls if attrs(c)["k8s.operation"] == "patch_status"]
    assert len(status_patches) == 1
    assert str(attrs(status_patches[0])["url.path"]).endswith(
        f"/{NS}/moedeployments/mixtral/status"
    )
    writes = [c for c in calls if attrs(c)["http.request.method"] != "GET"]
    assert all(attrs(c)["http.response.status_code"] == 200 for c in writes)

    # Spec contents are not recorded (the source is only in the spec).
    source = mixtral()["spec"]["model"]["source"]
    assert source not in all_attribute_text(spans)


async def test_noop_resume_is_a_span_without_writes(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay, spans: InMemorySpanExporter
) -> None:
    await deploy_ready(api, operator, kuberay)
    await operator.stop()
    spans.clear()
    await operator.start()
    await eventually(lambda: reconciles(spans), message="resume reconcile span")
    await eventually(lambda: not operator.busy, message="idle operator")
    resumed = reconciles(spans)
    assert resumed
    for span in resumed:
        assert attrs(span)["moe.reconcile.outcome"] == "no-op"
        assert writes_of(span) == []
        assert attrs(span)["moe.reconcile.write_count"] == 0
        assert span.status.status_code == StatusCode.OK
        assert attrs(span)["moe.deployment.name"] == "mixtral"
        # No API call at all: the decision came from the watch caches.
        assert api_children(spans, span) == []


async def test_unplannable_spec_span_names_the_problem(
    api: em.ApiServer, operator: Operator, spans: InMemorySpanExporter
) -> None:
    api.admission_enabled = False  # it got in while the webhook was off
    await operator.start()
    await api.create(MOED, unplannable())
    await eventually(lambda: is_(api, "Degraded", "True"), message="Degraded")
    await eventually(lambda: not operator.busy, message="idle operator")
    failed = [s for s in reconciles(spans) if attrs(s).get("moe.reconcile.problem")]
    assert failed, [attrs(s) for s in reconciles(spans)]
    span = failed[0]
    assert attrs(span)["moe.reconcile.problem"] == "PlanFailed"
    assert attrs(span)["moe.reconcile.outcome"] == "problem"
    assert writes_of(span) == ["patch status"]  # Degraded is reported, nothing deployed
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "PlanFailed"
    # Only the reason: the message quotes the spec ("does not fit ... L40S-48GB").
    assert "does not fit" not in all_attribute_text(spans)


async def test_api_error_marks_the_span_failed_and_the_retry_succeeds(
    api: em.ApiServer, operator: Operator, spans: InMemorySpanExporter
) -> None:
    fault = em.Fault(
        match=lambda c: c.resource == "rayservices" and c.is_write and c.user_agent[:3] == "moe",
        status=503,
    )
    api.faults.append(fault)
    await operator.start()
    await api.create(MOED, mixtral(), admit=True)
    await eventually(lambda: children(api) == EXPECTED, message="children", timeout=60)
    await eventually(lambda: not operator.busy, message="idle operator")
    assert fault.hits == 1
    failed = [s for s in reconciles(spans) if s.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1
    assert attrs(failed[0])["moe.reconcile.outcome"] == "error"
    assert attrs(failed[0])["http.response.status_code"] == 503
    rejected = [c for c in api_children(spans, failed[0]) if attrs(c)["k8s.operation"] == "apply"]
    assert [attrs(c)["http.response.status_code"] for c in rejected] == [503]
    assert rejected[0].status.status_code == StatusCode.ERROR
    later = reconciles(spans)[reconciles(spans).index(failed[0]) + 1 :]
    assert any("create RayService/mixtral" in writes_of(s) for s in later)


def test_no_endpoint_means_no_exporter() -> None:
    off = tracing.setup(settings.load({}))
    assert isinstance(off.tracer, NoOpTracer) and off.provider is None and off.owned == []


def test_endpoint_settings_make_an_otlp_exporter() -> None:
    cfg = settings.load(
        {
            "MOE_OPERATOR_OTLP_ENDPOINT": "http://collector:4318",
            "MOE_OPERATOR_OTLP_PROTOCOL": "http",
            "MOE_OPERATOR_TRACE_SAMPLE_RATIO": "0.25",
        }
    )
    assert tracing.otlp_endpoint(cfg) == "http://collector:4318/v1/traces"
    on = tracing.setup(cfg)
    try:
        assert on.provider is not None and len(on.owned) == 1
        assert "0.25" in on.provider.sampler.get_description()
    finally:
        on.shutdown()
    grpc = settings.load({"MOE_OPERATOR_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.otlp_endpoint(grpc) == "http://collector:4317"
    with pytest.raises(ValueError, match="MOE_OPERATOR_TRACE_SAMPLE_RATIO"):
        settings.load({"MOE_OPERATOR_TRACE_SAMPLE_RATIO": "2"})

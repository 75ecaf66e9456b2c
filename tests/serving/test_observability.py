"""Tracing and expert-load pieces without an engine (real OpenTelemetry SDK, real files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from otlp_receiver import OtlpReceiver
from prometheus_client import CollectorRegistry, generate_latest

from moe_serving import expert_load, expert_metrics, metrics, tracing
from moe_serving.config import AppConfig, TracingArgs
from moe_serving.engine_obs import EngineObserver
from moe_serving.protocol import ResponseHead


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_traceparent_is_continued_and_children_link(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    t = tracing.Tracing(TracingArgs(enabled=True, jsonl_path=str(path)), "svc", {"a": "b"})
    trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    parent = {"TraceParent": f"00-{trace_id}-{caller}-01", "authorization": "x"}
    ingress = t.request_span("http", "/v1/completions", parent, "m")
    child = t.start("moe.engine", tracing.headers_of(ingress), {})
    child.end()
    tracing.end_request_span(ingress, "503")
    spans = {s["name"]: s for s in _read(path)}
    assert spans["moe.ingress"]["trace_id"] == spans["moe.engine"]["trace_id"] == trace_id
    assert spans["moe.ingress"]["parent_span_id"] == caller
    assert spans["moe.engine"]["parent_span_id"] == spans["moe.ingress"]["span_id"]
    assert spans["moe.ingress"]["status"] == "ERROR"
    assert spans["moe.ingress"]["resource"]["service.name"] == "svc"
    t.shutdown()


def test_no_traceparent_starts_a_root_and_ratio_zero_samples_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    on = tracing.Tracing(TracingArgs(enabled=True, jsonl_path=str(path)), "svc", {})
    tracing.end_request_span(on.request_span("grpc", "Complete", {}, "m"), "OK")
    (root,) = _read(path)
    assert root["parent_span_id"] is None and root["attributes"]["rpc.method"] == "Complete"
    off = tracing.Tracing(
        TracingArgs(enabled=True, jsonl_path=str(path), sample_ratio=0), "svc", {}
    )
    tracing.end_request_span(off.request_span("grpc", "Complete", {}, "m"), "OK")
    assert len(_read(path)) == 1  # the unsampled root was not exported


def test_otlp_http_export_reaches_a_receiver() -> None:
    with OtlpReceiver() as receiver:
        host_only = receiver.endpoint.removesuffix("/v1/traces")
        args = TracingArgs(enabled=True, endpoint=host_only, protocol="http/protobuf")
        assert tracing.otlp_endpoint(args) == receiver.endpoint
        t = tracing.Tracing(args, "svc", {})
        tracing.end_request_span(t.request_span("http", "/v1/chat/completions", {}, "m"), "200")
        t.shutdown()  # flushes the batch processor
        (span,) = receiver.snapshot()
    assert span["name"] == "moe.ingress"
    assert span["attributes"]["http.response.status_code"] == 200


def test_grpc_carrier_keeps_only_trace_headers() -> None:
    class Ctx:
        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("traceparent", "00-1-2-01"), ("authorization", "Bearer k")]

    assert tracing.grpc_carrier(Ctx()) == {"traceparent": "00-1-2-01"}
    assert tracing.grpc_carrier(None) == {}


def _observer(tmp_path: Path, record_content: bool) -> EngineObserver:
    config = AppConfig.model_validate(
        {
            "engine": {"model": "m", "served_model_name": "m", "tensor_parallel_size": 2},
            "tracing": {
                "enabled": True,
                "jsonl_path": str(tmp_path / "spans.jsonl"),
                "record_content": record_content,
            },
        }
    )
    observer = EngineObserver(config)
    # A Tracing of its own (the process-wide one may already exist from another test).
    observer.tracing = tracing.Tracing(config.tracing, "engine", {})
    return observer


def test_engine_span_has_no_prompt_text_unless_opted_in(tmp_path: Path) -> None:
    for record in (False, True):
        observer = _observer(tmp_path, record)
        request = observer.begin("completions", {"prompt": "secret words"}, None)
        request.event(ResponseHead(200, stream=False))
        request.event({"choices": []})
        request.end()
    default, opted_in = _read(tmp_path / "spans.jsonl")
    assert "secret words" not in json.dumps(default)
    assert opted_in["attributes"]["moe.prompt"] == "secret words"
    assert default["attributes"]["moe.outcome"] == "ok" and default["status"] == "OK"


def test_cancel_after_a_complete_response_is_not_a_failure(tmp_path: Path) -> None:
    observer = _observer(tmp_path, False)
    done = observer.begin("completions", {"prompt": "p"}, None)
    done.event(ResponseHead(200, stream=True))
    done.event("data: [DONE]\n\n")
    done.cancelled()
    done.end()
    gone = observer.begin("completions", {"prompt": "p"}, None)
    gone.event(ResponseHead(200, stream=True))
    gone.cancelled()
    gone.end()
    first, second = _read(tmp_path / "spans.jsonl")
    assert first["attributes"]["moe.outcome"] == "ok"
    assert second["attributes"]["moe.outcome"] == "cancelled" and second["status"] == "ERROR"


def test_expert_counts_per_rank_sum_to_tokens_times_topk(tmp_path: Path) -> None:
    # Two "ranks" of an EP=2 layout with 4 experts: rank 0 holds 0-1, rank 1 holds 2-3.
    topk_ids = torch.tensor([[0, 2], [1, 3], [3, 2]], dtype=torch.int32)
    maps = {0: torch.tensor([0, 1, -1, -1]), 1: torch.tensor([-1, -1, 0, 1])}
    layer_a, layer_b = object(), object()
    for rank, expert_map in maps.items():
        counter = expert_load.ExpertCounter(tmp_path)
        counter.rank = (rank, rank == 0)
        counter.record(layer_a, topk_ids, expert_map)
        counter.record(layer_b, topk_ids[:1], expert_map)
        counter.flush()
    load = expert_metrics.read_expert_load(tmp_path)
    assert load.by_rank == {0: 2 + 1, 1: 4 + 1}
    assert load.total == (3 + 1) * 2  # (tokens of both layers) x top_k
    assert load.by_expert[(0, 2)] == 2 and load.by_expert[(0, 3)] == 2
    assert load.by_expert[(1, 0)] == 1 and load.by_expert[(1, 1)] == 0

    registry = CollectorRegistry()
    registry.register(expert_metrics.ExpertLoadCollector(tmp_path, "m", per_expert=True))
    text = generate_latest(registry).decode()
    assert 'moe_ep_rank_tokens_total{ep_rank="1",model="m"} 5.0' in text
    assert 'moe_expert_tokens_total{expert="3",layer="0",model="m"} 2.0' in text


def test_without_expert_map_only_the_first_tp_rank_counts(tmp_path: Path) -> None:
    ids = torch.tensor([[1, 0]])
    for first in (True, False):
        counter = expert_load.ExpertCounter(tmp_path)
        counter.rank = (0, first)
        counter.record(object(), ids, None)
        counter.flush()
    assert expert_metrics.read_expert_load(tmp_path).total == 2


def test_install_wraps_apply_once_and_keeps_behaviour(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv(expert_load.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(expert_load, "_COUNTER", [])

    class Experts:
        def apply(self, output: list[int], topk_ids: torch.Tensor, expert_map: Any) -> None:
            output.append(int(topk_ids.numel()))

    assert expert_load.install([Experts]) == ["Experts"]
    assert expert_load.install([Experts]) == []  # idempotent
    out: list[int] = []
    Experts().apply(out, torch.tensor([[0, 1]]), None)
    assert out == [2]
    found = expert_load.counter()
    assert found is not None
    found.flush()
    assert expert_metrics.read_expert_load(tmp_path).total == 2


_CHART = Path(__file__).parents[2] / "charts" / "moe-operator"
# Every series this project exports (the dashboard may use only these, plus Prometheus suffixes).
_EXPORTED = {
    "moe_engine_requests_total",
    "moe_engine_time_to_first_token_seconds_bucket",
    "moe_engine_time_per_output_token_seconds_bucket",
    "moe_engine_queue_wait_seconds_bucket",
    "moe_engine_generation_tokens_total",
    "moe_engine_prompt_tokens_total",
    "moe_ep_rank_tokens_total",
    "moe_expert_tokens_total",
    "moe_ep_imbalance_worst",
    "moe_ep_imbalance_step_lost_fraction",
    "moe_layer_expert_imbalance",
    "moe_layer_rank_imbalance",
    "moe_layer_hot_expert_share",
    "moe_serving_replicas",
    "moe_replica_queue_depth",
    "moe_replica_requests",
    "moe_ingress_requests_total",
    "moe_app_generated_tokens_total",
    "moe_app_waiting_requests",
    "moe_app_running_requests",
    "moe_app_hourly_cost_usd",
    "moe_app_output_tokens_per_second",
    "moe_cost_per_million_output_tokens",
}


def test_dashboard_uses_only_exported_series_and_ships_in_the_chart() -> None:
    import re
    import shutil
    import subprocess
    import sys

    import pytest
    import yaml

    text = (_CHART / "dashboards" / "moe-serving.json").read_text()
    dashboard = json.loads(text)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(moe_[a-z_]+)", e)}
    assert used and used <= _EXPORTED, used - _EXPORTED
    # The metric names the code registers (a rename must update the dashboard).
    registry = CollectorRegistry()
    metrics.EngineMetrics("m", registry).observe("ok", 0.1, 0.2, 0.01, 3, 4)
    exposed = generate_latest(registry).decode()
    for name in used & {n for n in _EXPORTED if n.startswith("moe_engine_")}:
        assert f"\n{name}" in exposed, name

    helm = Path(sys.executable).parent / "helm"
    binary = str(helm) if helm.exists() else shutil.which("helm")
    if binary is None:
        pytest.skip("helm binary not installed (hack/install_helm.py)")
    args = [binary, "template", "r", str(_CHART), "--show-only", "templates/grafana-dashboard.yaml"]
    out = subprocess.run(
        [*args, "--set", "grafanaDashboard.enabled=true"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (configmap,) = [d for d in yaml.safe_load_all(out) if d]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["moe-serving.json"]) == dashboard
    off = subprocess.run(args, capture_output=True, text=True)
    assert "kind: ConfigMap" not in off.stdout  # off by default

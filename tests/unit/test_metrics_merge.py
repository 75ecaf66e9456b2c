"""Several engine replicas' /metrics texts merged into one exposition, one series per replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_serving.metrics import label_replicas


def _replica_text(requests: int, depth: float, latencies: list[float]) -> str:
    """What one replica's process registry exposes (real prometheus_client output)."""
    registry = CollectorRegistry()
    counter = Counter("moe_engine_requests", "Requests.", ["model", "outcome"], registry=registry)
    counter.labels("m", "ok").inc(requests)
    Gauge("vllm:num_requests_running", "Running.", ["engine"], registry=registry).labels("0").set(
        depth
    )
    histogram = Histogram("moe_engine_ttft_seconds", "TTFT.", ["model"], registry=registry)
    for value in latencies:
        histogram.labels("m").observe(value)
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_every_sample_of_every_replica_is_kept_under_its_replica_label() -> None:
    texts = {"r1": _replica_text(3, 2, [0.1, 0.2]), "r2": _replica_text(5, 0, [3.0])}
    merged = label_replicas(texts)
    got = _samples(merged)
    for replica, text in texts.items():
        for (name, labels), value in _samples(text).items():
            assert got[(name, tuple(sorted((*labels, ("replica", replica)))))] == value
    assert len(got) == sum(len(_samples(t)) for t in texts.values())
    ok = ("moe_engine_requests_total", (("model", "m"), ("outcome", "ok")))
    assert got[(ok[0], tuple(sorted((*ok[1], ("replica", "r2")))))] == 5


def test_each_family_is_declared_once_with_its_type() -> None:
    merged = label_replicas({"a": _replica_text(1, 1, [1]), "b": _replica_text(2, 2, [2])})
    assert merged.count("# TYPE moe_engine_requests_total counter") == 1
    assert merged.count("# TYPE moe_engine_ttft_seconds histogram") == 1
    assert merged.count("# TYPE vllm:num_requests_running gauge") == 1
    types = {f.name: f.type for f in text_string_to_metric_families(merged)}
    assert types["moe_engine_requests"] == "counter"
    assert types["moe_engine_ttft_seconds"] == "histogram"


def test_an_existing_replica_label_is_kept_and_no_replica_gives_no_series() -> None:
    registry = CollectorRegistry()
    Gauge("g", "G.", ["replica"], registry=registry).labels("inner").set(1)
    merged = label_replicas({"outer": generate_latest(registry).decode()})
    assert _samples(merged) == {("g", (("replica", "inner"),)): 1}
    assert label_replicas({}) == ""

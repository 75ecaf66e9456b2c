"""Bounded expert-imbalance signals (moe_serving.imbalance), their series, the live report's
merge over a DP group's replicas, and the operator's status field (pure, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_serving import imbalance, live_state
from moe_serving.imbalance import Counts, Window, rank_imbalance, signals


def counts(experts: dict[tuple[int, int], int], per_rank: int = 4) -> Counts:
    """Counts where expert e lives on rank e // per_rank."""
    by_rank: dict[tuple[int, int], int] = {}
    for (layer, e), n in experts.items():
        key = (layer, e // per_rank)
        by_rank[key] = by_rank.get(key, 0) + n
    return Counts(experts, by_rank)


def test_even_routing_is_one_and_loses_nothing() -> None:
    c = counts({(0, e): 10 for e in range(8)})
    sig = signals(c)
    assert sig.worst_rank_imbalance == 1.0
    assert sig.step_fraction_lost == 0.0
    assert sig.layers[0].expert_imbalance == 1.0


def test_skew_to_one_rank_is_measured_and_costed() -> None:
    # Layer 0: rank 0 gets 30, rank 1 gets 10 -> max/mean 1.5; layer 1 even (20/20).
    c = counts({(0, 0): 30, (0, 4): 10, (1, 1): 20, (1, 5): 20})
    sig = signals(c, num_experts=8)
    by_layer = {s.layer: s for s in sig.layers}
    assert by_layer[0].rank_imbalance == pytest.approx(1.5)
    assert by_layer[1].rank_imbalance == pytest.approx(1.0)
    assert sig.worst_rank_imbalance == pytest.approx(1.5)
    # lost = 1 - (20 + 20) / (30 + 20)
    assert sig.step_fraction_lost == pytest.approx(0.2)
    # Over 8 experts, layer 0's hottest expert has 30 of a mean of 5.
    assert by_layer[0].expert_imbalance == pytest.approx(6.0)
    assert by_layer[0].hottest == [(0, 0.75), (4, 0.25)]


def test_top_n_is_bounded() -> None:
    c = counts({(0, e): 100 - e for e in range(16)})
    assert len(signals(c).layers[0].hottest) == imbalance.TOP_N


def test_idle_rank_counts_when_named() -> None:
    c = Counts({(0, 0): 10}, {(0, 0): 10})
    assert rank_imbalance(c.by_layer_rank)[0] == 1.0  # only the rank seen
    assert rank_imbalance(c.by_layer_rank, [0, 1])[0] == pytest.approx(2.0)


def test_nothing_counted_is_none() -> None:
    sig = signals(Counts({}, {}))
    assert sig.worst_rank_imbalance is None and sig.step_fraction_lost is None


def test_window_forgets_old_routing_and_survives_a_restart() -> None:
    w = Window(window_s=60)
    skewed = counts({(0, 0): 100, (0, 4): 0})
    assert w.observe(0.0, skewed) == skewed  # the first read: all of it
    later = counts({(0, 0): 110, (0, 4): 10})
    delta = w.observe(70.0, later)
    assert delta.by_expert == {(0, 0): 10, (0, 4): 10}  # since the snapshot at t=0
    even = w.observe(140.0, counts({(0, 0): 120, (0, 4): 20}))
    assert even.by_expert == {(0, 0): 10, (0, 4): 10}  # t=0 dropped, base t=70
    restarted = w.observe(150.0, counts({(0, 0): 3, (0, 4): 1}))
    assert restarted.by_expert == {(0, 0): 3, (0, 4): 1}  # counters went down: taken whole


def _report(replica: str, group: str, window: dict[str, int]) -> live_state.Report:
    return live_state.report(replica, {}, 0, 0, engine_group=group, expert_window=window)


def test_live_state_merges_a_dp_groups_replicas_and_takes_the_worst_engine() -> None:
    # A DP2 group: each replica holds one EP rank; together rank 0 has 3x rank 1 in layer 0.
    reports = {
        "a": _report("a", "gang-1", {"0:0": 30}),
        "b": _report("b", "gang-1", {"0:1": 10}),
        # An independent TP2xEP2 engine, even.
        "c": _report("c", "c", {"0:0": 5, "0:1": 5}),
        # A single-rank engine: nothing to balance.
        "d": _report("d", "d", {"0:0": 50}),
    }
    now = max(r["time"] for r in reports.values())
    load = live_state.aggregate(reports, now)
    assert load["expert_imbalance"] == pytest.approx(1.5)
    only_even = {k: reports[k] for k in ("c", "d")}
    assert live_state.aggregate(only_even, now)["expert_imbalance"] == pytest.approx(1.0)
    assert live_state.aggregate({"d": reports["d"]}, now)["expert_imbalance"] is None


def test_operator_reads_it_into_status_rounded() -> None:
    from moe_operator import live

    body = {
        "version": live_state.STATE_VERSION,
        "time": 100.0,
        "replicas": {"running": 1, "target": 1},
        "load": {
            "reporting_replicas": 1,
            "waiting": 0,
            "running": 0,
            "generated_tokens_total": 0,
            "replica_ids": ["a"],
            "expert_imbalance": 1.23456,
        },
    }
    status = live.summarize(None, live.parse(body), 1.0)
    assert status.expert_imbalance == 1.23
    body["load"].pop("expert_imbalance")  # an older serving image: no field, no value
    assert live.summarize(None, live.parse(body), 1.0).expert_imbalance is None


def test_series_are_bounded_and_per_expert_is_opt_in(tmp_path: Path) -> None:
    from moe_serving.expert_metrics import ExpertLoadCollector

    layers, experts = 4, 64
    for rank in (0, 1):
        payload = {
            "ep_rank": rank,
            "pid": rank,
            "layers": {
                str(ly): [(7 if e == 0 else 1) if e // 32 == rank else 0 for e in range(experts)]
                for ly in range(layers)
            },
        }
        (tmp_path / f"rank{rank}-pid{rank}.json").write_text(json.dumps(payload))

    def series(per_expert: bool) -> dict[str, list[tuple[dict[str, str], float]]]:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(ExpertLoadCollector(tmp_path, "m", per_expert))
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    off = series(False)
    assert "moe_expert_tokens_total" not in off
    assert len(off["moe_layer_rank_imbalance"]) == layers
    assert len(off["moe_layer_hot_expert_share"]) == layers * imbalance.TOP_N
    # Rank 0 holds expert 0 (7 tokens) + 31 x 1; rank 1 holds 32 x 1 -> 38 / 35 over the mean.
    assert off["moe_ep_imbalance_worst"][0][1] == pytest.approx(38 / 35)
    on = series(True)
    assert len(on["moe_expert_tokens_total"]) == layers * experts


def test_render_resolves_auto_by_series_count() -> None:
    from moe_operator.api import MoEDeploymentSpec
    from moe_operator.planner import plan
    from moe_operator.render import per_expert_metrics

    def spec(choice: str, source: str, **extra: object) -> MoEDeploymentSpec:
        return MoEDeploymentSpec.model_validate(
            {"model": {"name": "m", "source": source}, "serving": {"perExpertMetrics": choice}}
            | extra
        )

    gemma = spec("auto", "hf://google/gemma-4-26B-A4B-it")  # 30 layers x 128 = 3,840
    assert per_expert_metrics(gemma, plan(gemma)) is True
    deepseek = spec(
        "auto",
        "hf://deepseek-ai/DeepSeek-V3",
        resources={"gpusPerNode": 8, "maxNodesPerReplica": 4},
        model={"name": "m", "source": "hf://deepseek-ai/DeepSeek-V3", "quantization": "fp8"},
    )
    p = plan(deepseek)
    assert p.num_moe_layers * p.num_experts > 4096
    assert per_expert_metrics(deepseek, p) is False
    forced = deepseek.model_copy(
        update={"serving": deepseek.serving.model_copy(update={"per_expert_metrics": "on"})}
    )
    assert per_expert_metrics(forced, p) is True

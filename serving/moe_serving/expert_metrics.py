"""Expert-load series of an engine replica, computed at scrape time.

The per-worker JSON files that `moe_serving.expert_load` writes (one per vLLM worker process) are
summed into tokens routed to each EP rank (`moe_ep_rank_tokens_total`) and bounded imbalance
signals per MoE layer over a sliding window of those counts (`moe_serving.imbalance`); tokens per
(layer, expert) only when asked for (`AppConfig.per_expert_metrics`: layers x experts series).
The same window feeds the replica's live-state report (`expert_window()`).

The collector goes into prometheus_client's default registry of the process, next to the series
of `moe_serving.metrics`, so `EngineServer.metrics_text()` exposes them together.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from moe_serving import imbalance


@dataclass
class ExpertLoad:
    """Summed worker counts: per (layer, expert), per (layer, EP rank) and per EP rank."""

    by_expert: dict[tuple[int, int], int] = field(default_factory=dict)
    by_rank: dict[int, int] = field(default_factory=dict)
    by_layer_rank: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_rank.values())

    def counts(self) -> imbalance.Counts:
        return imbalance.Counts(dict(self.by_expert), dict(self.by_layer_rank))


def read_expert_load(directory: Path) -> ExpertLoad:
    """Sum the JSON files of `moe_serving.expert_load` (one per worker process)."""
    load = ExpertLoad()
    for path in sorted(directory.glob("rank*-pid*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced between glob and read: next scrape sees it
            continue
        rank = int(data["ep_rank"])
        for layer, counts in data["layers"].items():
            for expert, n in enumerate(counts):
                key = (int(layer), expert)
                load.by_expert[key] = load.by_expert.get(key, 0) + int(n)
                load.by_rank[rank] = load.by_rank.get(rank, 0) + int(n)
                lr = (int(layer), rank)
                load.by_layer_rank[lr] = load.by_layer_rank.get(lr, 0) + int(n)
    return load


class ExpertLoadCollector(Collector):
    """Scrape-time view of the expert-load files of one replica, and the window of counts that
    the imbalance signals (series and live report) are computed over."""

    def __init__(
        self,
        directory: Path,
        model: str,
        per_expert: bool = False,
        window_s: float = imbalance.WINDOW_S,
    ) -> None:
        self.directory = directory
        self.model = model
        self.per_expert = per_expert
        self.window = imbalance.Window(window_s)
        self.lock = threading.Lock()  # scrapes and live reports may run on different threads

    def recent(self) -> tuple[ExpertLoad, imbalance.Counts]:
        """The cumulative load, and what was counted within the window."""
        load = read_expert_load(self.directory)
        with self.lock:
            return load, self.window.observe(time.monotonic(), load.counts())

    def live(self) -> dict[str, Any]:
        """For the live-state report: this engine's (layer, rank) counts within the window."""
        _, delta = self.recent()
        return {f"{layer}:{rank}": n for (layer, rank), n in delta.by_layer_rank.items()}

    def collect(self) -> Iterator[Any]:
        load, delta = self.recent()
        if self.per_expert:
            experts = CounterMetricFamily(
                "moe_expert_tokens",
                "Tokens routed to an expert (each token counts once per top-k slot), by MoE layer.",
                labels=["model", "layer", "expert"],
            )
            for (layer, expert), n in sorted(load.by_expert.items()):
                experts.add_metric([self.model, str(layer), str(expert)], n)
            yield experts
        ranks = CounterMetricFamily(
            "moe_ep_rank_tokens",
            "Token-expert pairs computed by an expert-parallel rank (all MoE layers).",
            labels=["model", "ep_rank"],
        )
        for rank, n in sorted(load.by_rank.items()):
            ranks.add_metric([self.model, str(rank)], n)
        yield ranks
        yield from self._signals(imbalance.signals(delta))

    def _signals(self, sig: imbalance.Signals) -> Iterator[Any]:
        window = f" over the last {self.window.window_s:.0f}s"
        by_rank = GaugeMetricFamily(
            "moe_layer_rank_imbalance",
            "Max / mean tokens over this engine's EP ranks in a MoE layer" + window,
            labels=["model", "layer"],
        )
        by_expert = GaugeMetricFamily(
            "moe_layer_expert_imbalance",
            "Max / mean tokens over the experts of a MoE layer" + window,
            labels=["model", "layer"],
        )
        hot = GaugeMetricFamily(
            "moe_layer_hot_expert_share",
            f"Share of a MoE layer's tokens routed to its {imbalance.TOP_N} hottest experts "
            f"(place 1 = hottest){window}",
            labels=["model", "layer", "place", "expert"],
        )
        for layer in sig.layers:
            by_rank.add_metric([self.model, str(layer.layer)], layer.rank_imbalance)
            by_expert.add_metric([self.model, str(layer.layer)], layer.expert_imbalance)
            for place, (expert, share) in enumerate(layer.hottest, start=1):
                hot.add_metric([self.model, str(layer.layer), str(place), str(expert)], share)
        yield by_rank
        yield by_expert
        yield hot
        if sig.worst_rank_imbalance is not None:
            yield GaugeMetricFamily(
                "moe_ep_imbalance_worst",
                "The worst MoE layer's max / mean tokens over this engine's EP ranks" + window,
                value=sig.worst_rank_imbalance,
            )
            yield GaugeMetricFamily(
                "moe_ep_imbalance_step_lost_fraction",
                "Estimated fraction of MoE compute lost waiting for the busiest EP rank" + window,
                value=sig.step_fraction_lost or 0.0,
            )


_EXPERT_COLLECTOR: list[ExpertLoadCollector] = []


def register_expert_load(
    directory: Path,
    model: str,
    per_expert: bool = False,
    window_s: float = imbalance.WINDOW_S,
) -> None:
    """Expose the expert-load files (once per process; a new directory replaces the old one)."""
    if _EXPERT_COLLECTOR:
        _EXPERT_COLLECTOR[0].directory = directory
        _EXPERT_COLLECTOR[0].per_expert = per_expert
        _EXPERT_COLLECTOR[0].window = imbalance.Window(window_s)
        return
    collector = ExpertLoadCollector(directory, model, per_expert, window_s)
    _EXPERT_COLLECTOR.append(collector)
    REGISTRY.register(collector)


def expert_window() -> dict[str, Any]:
    """This process's (layer, rank) counts within the window, for the live report ({} if off)."""
    return _EXPERT_COLLECTOR[0].live() if _EXPERT_COLLECTOR else {}

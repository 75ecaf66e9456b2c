"""Bounded expert-imbalance signals from the expert-load counts (pure: no Ray, no vLLM).

`moe_expert_tokens_total{layer,expert}` is layers x experts series per replica (DeepSeek-V3:
58 x 256 = ~15k), too many for a Prometheus at scale, so it is opt-in. What is always exported
is a handful of series per layer, computed over a sliding window of the cumulative counts:

* imbalance over EP ranks = max / mean of the tokens each rank computed in the layer (1.0 =
  even; 2.0 = the busiest rank does twice the average). The slowest rank sets the step time.
* imbalance over experts = max / mean over the layer's experts (routing skew, whatever the EP).
* the top-N hottest experts of the layer and their share of its tokens (N = `TOP_N`).

Per replica: the worst layer's rank imbalance, and the estimated fraction of the MoE compute
lost to it: each layer waits for its busiest rank, so with per-layer rank loads L,
    lost = 1 - sum_layers(mean L) / sum_layers(max L)
(0 when even; an estimate that treats expert compute as proportional to tokens computed).
Without expert parallelism (one EP rank) there is no rank imbalance: 1.0 and 0 lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Hottest experts exported per layer.
TOP_N = 3
#: Default window of the signals, seconds.
WINDOW_S = 60.0


@dataclass(frozen=True)
class Counts:
    """Cumulative counts: tokens per (layer, expert) and per (layer, EP rank)."""

    by_expert: Mapping[tuple[int, int], int]
    by_layer_rank: Mapping[tuple[int, int], int]

    def minus(self, older: Counts) -> Counts:
        """What was counted since `older` (a counter that went down restarted: take it whole)."""

        def diff(new: Mapping[tuple[int, int], int], old: Mapping[tuple[int, int], int]) -> dict:
            out = {}
            for key, n in new.items():
                before = old.get(key, 0)
                out[key] = n - before if n >= before else n
            return out

        return Counts(
            diff(self.by_expert, older.by_expert), diff(self.by_layer_rank, older.by_layer_rank)
        )


@dataclass(frozen=True)
class LayerSignal:
    layer: int
    rank_imbalance: float
    expert_imbalance: float
    hottest: list[tuple[int, float]]  # (expert, share of the layer's tokens), hottest first


@dataclass(frozen=True)
class Signals:
    layers: list[LayerSignal]
    worst_rank_imbalance: float | None  # None: nothing counted in the window
    step_fraction_lost: float | None


def _max_over_mean(values: list[int]) -> float:
    if not values or sum(values) == 0:
        return 1.0
    return max(values) / (sum(values) / len(values))


def rank_imbalance(
    by_layer_rank: Mapping[tuple[int, int], int], ranks: list[int] | None = None
) -> tuple[float | None, float | None]:
    """(worst layer's max/mean over EP ranks, fraction of MoE compute lost) of one engine's
    window; `ranks`: the engine's EP ranks (default: those in the counts). None: nothing counted."""
    ranks = sorted({r for _, r in by_layer_rank}) if ranks is None else ranks
    worst: float | None = None
    sum_mean = sum_max = 0.0
    for layer in sorted({layer for layer, _ in by_layer_rank}):
        loads = [by_layer_rank.get((layer, r), 0) for r in ranks]
        if not loads or sum(loads) == 0:
            continue
        ratio = _max_over_mean(loads)
        worst = ratio if worst is None else max(worst, ratio)
        sum_mean += sum(loads) / len(loads)
        sum_max += max(loads)
    if worst is None:
        return None, None
    return worst, 1.0 - sum_mean / sum_max


def signals(
    delta: Counts, ranks: list[int] | None = None, num_experts: int | None = None
) -> Signals:
    """The signals of the tokens counted in one window (`delta`) of one engine.

    `ranks`: its EP ranks (default: those in the counts; one that counted nothing in the window
    still appears with 0 once it has ever counted); `num_experts`: experts per layer (idle
    experts count), else the highest id seen + 1."""
    ranks = sorted({r for _, r in delta.by_layer_rank}) if ranks is None else ranks
    out: list[LayerSignal] = []
    for layer in sorted({layer for layer, _ in delta.by_expert}):
        experts = {e: n for (ly, e), n in delta.by_expert.items() if ly == layer}
        total = sum(experts.values())
        if total == 0:
            continue
        width = num_experts or (max(experts) + 1)
        per_expert = [experts.get(e, 0) for e in range(width)]
        loads = [delta.by_layer_rank.get((layer, r), 0) for r in ranks]
        hottest = sorted(experts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_N]
        out.append(
            LayerSignal(
                layer=layer,
                rank_imbalance=_max_over_mean(loads),
                expert_imbalance=_max_over_mean(per_expert),
                hottest=[(e, n / total) for e, n in hottest if n > 0],
            )
        )
    worst, lost = rank_imbalance(delta.by_layer_rank, ranks)
    return Signals(out, worst, lost)


@dataclass
class Window:
    """Snapshots of cumulative counts over the last `window_s` seconds (times are the
    caller's clock), so signals describe recent routing, not all of history."""

    window_s: float = WINDOW_S
    snapshots: deque[tuple[float, Counts]] = field(default_factory=deque)

    def observe(self, now: float, counts: Counts) -> Counts:
        """Record `counts` at `now`; returns what was counted within the window."""
        self.snapshots.append((now, counts))
        # Keep the newest snapshot at or before the window's start as the baseline.
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - self.window_s:
            self.snapshots.popleft()
        base_time, base = self.snapshots[0]
        if base_time == now:  # the first observation: all of it is recent
            return counts
        return counts.minus(base)

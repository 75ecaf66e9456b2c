"""Pure helpers for trustworthy ratios: the order of rounds, and bootstrap intervals over rounds.

Rounds. Every serving cell is measured in several rounds; each round measures every system once,
in an order rotated by one place per round, so slow drift of a shared machine (other tenants,
thermal state, page cache) falls on every system alike instead of on whichever system ran last.
Only one engine fits on the machine, so a system's visit in a round is one launch of it, except
that the rotation is chosen so that each round begins with the system the previous round ended
with: that system stays up across the boundary (`launch_groups`), saving one start per round.

Ratios. For a comparison A / B in one cell, round r gives a ratio a_r / b_r (paired: both were
measured in the same round, minutes apart). The estimate is the geometric mean of the per-round
ratios (symmetric: B / A is exactly its reciprocal), and its 95% interval is a percentile
bootstrap over rounds (rounds resampled with replacement, a seeded generator, so a report is
reproducible), expanded for few rounds (`expanded_tail`: the plain percentile interval from 5
rounds covers the truth only ~83% of the time). Launch-level facts that do not pair by round
(cold start) use the unpaired variant: each side resampled on its own, ratio of geometric means.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: Resamples per interval (the expanded interval reads far quantiles, ~0.1% for 5 rounds).
RESAMPLES = 20000
LEVEL = 0.95


def round_orders(systems: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of systems in each round: rotated right by one place per round.

    Round r+1 begins with the system round r ended with, and over any `len(systems)` consecutive
    rounds every system takes every position once.
    """
    if rounds < 1:
        raise ValueError("at least one round")
    n = len(systems)
    if n == 0:
        return [[] for _ in range(rounds)]
    out = []
    for r in range(rounds):
        shift = r % n
        out.append([*systems[n - shift :], *systems[: n - shift]])
    return out


@dataclass(frozen=True)
class LaunchGroup:
    """One launch of `system`, serving its visits in `rounds` back to back."""

    system: str
    rounds: tuple[int, ...]


def launch_groups(orders: Sequence[Sequence[str]]) -> list[LaunchGroup]:
    """Consecutive visits of the same system (across a round boundary) share one launch."""
    groups: list[LaunchGroup] = []
    for r, order in enumerate(orders):
        for system in order:
            if groups and groups[-1].system == system:
                groups[-1] = LaunchGroup(system, (*groups[-1].rounds, r))
            else:
                groups.append(LaunchGroup(system, (r,)))
    return groups


def rotate(items: Sequence[T], by: int) -> list[T]:
    """`items` rotated left by `by` places (the order of cells, or of targets, in a round)."""
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


# ------------------------------------------------------------------------------ bootstrap


@dataclass(frozen=True)
class Interval:
    """A ratio estimate with its bootstrap interval (`low`/`high` None: fewer than 2 rounds)."""

    estimate: float
    low: float | None
    high: float | None
    n: int  # rounds (paired) or the smaller side's launches (unpaired)

    def excludes_one(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 1 or self.high < 1)

    def worse(self, higher_is_better: bool) -> bool:
        """The whole interval is on the bad side of 1.0 (ours is behind, beyond noise)."""
        if self.low is None or self.high is None:
            return False
        return self.high < 1 if higher_is_better else self.low > 1

    def better(self, higher_is_better: bool) -> bool:
        if self.low is None or self.high is None:
            return False
        return self.low > 1 if higher_is_better else self.high < 1


def geomean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("geomean of nothing")
    return math.exp(sum(math.log(v) for v in values) / len(values))


#: Student's t, 97.5% quantile, by degrees of freedom (a missing df uses the next lower one).
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000,
}  # fmt: skip


def expanded_tail(n: int, level: float = LEVEL) -> float:
    """The lower tail probability of the expanded percentile interval for `n` samples.

    The plain percentile bootstrap is too narrow for few samples (its 95% interval covers the
    truth ~83% of the time from 5 rounds). Hesterberg's expansion uses the bootstrap quantiles
    at Phi(-sqrt(n / (n - 1)) * t_{n-1}) instead of (1 - level) / 2: for n = 5 and 95%, the
    0.1% and 99.9% quantiles. Other levels than 95% use the normal quantile for t.
    """
    if n < 2:
        raise ValueError("an interval needs at least 2 samples")
    normal = statistics.NormalDist()
    if abs(level - 0.95) < 1e-12:
        df = n - 1
        t = _T975[max(k for k in _T975 if k <= df)]
    else:
        t = normal.inv_cdf(1 - (1 - level) / 2)
    return normal.cdf(-math.sqrt(n / (n - 1)) * t)


def _bootstrap_means(logs: Sequence[float], resamples: int, rng: np.random.Generator) -> Any:
    values = np.asarray(logs, dtype=float)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return np.sort(values[picks].mean(axis=1))


def _usable(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a > 0 and b > 0 and math.isfinite(a * b)


def paired_ratio(
    a: Sequence[float | None],
    b: Sequence[float | None],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval | None:
    """Geometric mean of a_r / b_r over rounds r, with its percentile bootstrap interval.

    Rounds where either side is missing (None, a failed cell) or not positive are left out.
    None when no round has both; no interval (low/high None) from a single round.
    """
    if len(a) != len(b):
        raise ValueError("a and b must have one value per round each")
    logs = [math.log(x / y) for x, y in zip(a, b, strict=True) if _usable(x, y)]  # type: ignore[operator]
    if not logs:
        return None
    estimate = math.exp(sum(logs) / len(logs))
    n = len(logs)
    if n < 2:
        return Interval(estimate, None, None, n)
    means = _bootstrap_means(logs, resamples, np.random.default_rng(seed))
    tail = expanded_tail(n, level)
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(estimate, math.exp(low), math.exp(high), n)


def unpaired_ratio(
    a: Sequence[float | None],
    b: Sequence[float | None],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval | None:
    """geomean(a) / geomean(b), each side resampled on its own (e.g. cold starts per launch)."""
    la = [math.log(x) for x in a if x is not None and x > 0]
    lb = [math.log(y) for y in b if y is not None and y > 0]
    if not la or not lb:
        return None
    estimate = math.exp(sum(la) / len(la) - sum(lb) / len(lb))
    n = min(len(la), len(lb))
    if n < 2:
        return Interval(estimate, None, None, n)
    rng = np.random.default_rng(seed)
    diffs = np.sort(
        _bootstrap_means(la, resamples, rng) - rng.permutation(_bootstrap_means(lb, resamples, rng))
    )
    tail = expanded_tail(n, level)
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(estimate, math.exp(low), math.exp(high), n)

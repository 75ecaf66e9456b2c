"""Rounds (rotation, shared launches) and bootstrap intervals on synthetic data, known answers."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from bench.stats import (
    Interval,
    LaunchGroup,
    expanded_tail,
    geomean,
    launch_groups,
    paired_ratio,
    rotate,
    round_orders,
    unpaired_ratio,
)

SYSTEMS = ["vllm", "ray-serve-llm", "ours"]


# ------------------------------------------------------------------------------------ rounds


def test_round_orders_rotate_by_one_place_per_round() -> None:
    assert round_orders(SYSTEMS, 5) == [
        ["vllm", "ray-serve-llm", "ours"],
        ["ours", "vllm", "ray-serve-llm"],
        ["ray-serve-llm", "ours", "vllm"],
        ["vllm", "ray-serve-llm", "ours"],
        ["ours", "vllm", "ray-serve-llm"],
    ]


@pytest.mark.parametrize("n_systems", [1, 2, 3, 4])
@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 8])
def test_every_round_has_every_system_once_and_positions_balance(
    n_systems: int, rounds: int
) -> None:
    systems = [f"s{i}" for i in range(n_systems)]
    orders = round_orders(systems, rounds)
    assert len(orders) == rounds
    for order in orders:
        assert sorted(order) == systems
    for r in range(1, rounds):
        assert orders[r][0] == orders[r - 1][-1]  # the last system of a round starts the next
    # Over any n consecutive rounds every system takes every position exactly once.
    for start in range(rounds - n_systems + 1):
        window = orders[start : start + n_systems]
        for position in range(n_systems):
            assert sorted(order[position] for order in window) == systems


def test_round_orders_reject_no_rounds() -> None:
    with pytest.raises(ValueError):
        round_orders(SYSTEMS, 0)


def test_launch_groups_share_a_launch_across_a_round_boundary() -> None:
    groups = launch_groups(round_orders(SYSTEMS, 5))
    assert groups == [
        LaunchGroup("vllm", (0,)),
        LaunchGroup("ray-serve-llm", (0,)),
        LaunchGroup("ours", (0, 1)),
        LaunchGroup("vllm", (1,)),
        LaunchGroup("ray-serve-llm", (1, 2)),
        LaunchGroup("ours", (2,)),
        LaunchGroup("vllm", (2, 3)),
        LaunchGroup("ray-serve-llm", (3,)),
        LaunchGroup("ours", (3, 4)),
        LaunchGroup("vllm", (4,)),
        LaunchGroup("ray-serve-llm", (4,)),
    ]
    # 11 launches instead of 15, and every (system, round) visit is in exactly one launch.
    visits = [(g.system, r) for g in groups for r in g.rounds]
    assert sorted(visits) == sorted((s, r) for s in SYSTEMS for r in range(5))
    # No system is launched twice in a row.
    assert all(a.system != b.system for a, b in itertools.pairwise(groups))


def test_rotate() -> None:
    assert rotate([1, 2, 3], 0) == [1, 2, 3]
    assert rotate([1, 2, 3], 1) == [2, 3, 1]
    assert rotate([1, 2, 3], 5) == [3, 1, 2]
    assert rotate([], 3) == []


# --------------------------------------------------------------------------------- bootstrap


def test_a_constant_ratio_under_drift_is_exact() -> None:
    """Pairing by round removes drift that moves both systems: the answer is exactly 1.25."""
    drift = [1.0, 1.7, 0.6, 2.9, 1.3]
    b = [100 * d for d in drift]
    a = [125 * d for d in drift]
    iv = paired_ratio(a, b)
    assert iv is not None
    assert iv.estimate == pytest.approx(1.25)
    assert iv.low == pytest.approx(1.25) and iv.high == pytest.approx(1.25)
    assert iv.n == 5
    assert iv.excludes_one()
    assert iv.worse(higher_is_better=False) and iv.better(higher_is_better=True)
    assert not iv.worse(higher_is_better=True)


def test_the_estimate_is_the_geometric_mean_of_per_round_ratios() -> None:
    iv = paired_ratio([1.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    assert iv is not None
    assert iv.estimate == pytest.approx(2.0)
    assert iv.low is not None and iv.high is not None
    assert 1.0 <= iv.low < 2.0 < iv.high <= 4.0
    assert not iv.excludes_one() or iv.low > 1  # all resamples are >= 1


def test_the_interval_of_the_reciprocal_is_the_reciprocal_interval() -> None:
    a = [1.1, 0.9, 1.3, 1.05, 1.2, 0.95]
    b = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    ab, ba = paired_ratio(a, b), paired_ratio(b, a)
    assert ab is not None and ba is not None
    assert ab.low is not None and ab.high is not None and ba.low is not None
    assert ba.high is not None
    assert ab.estimate * ba.estimate == pytest.approx(1.0)
    assert ab.low * ba.high == pytest.approx(1.0)
    assert ab.high * ba.low == pytest.approx(1.0)


def test_missing_rounds_are_left_out_and_one_round_has_no_interval() -> None:
    iv = paired_ratio([2.0, None, 3.0], [1.0, 1.0, None])
    assert iv == Interval(2.0, None, None, 1)
    assert not iv.excludes_one() and not iv.worse(True) and not iv.worse(False)
    assert paired_ratio([None, 0.0], [1.0, 1.0]) is None
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_intervals_are_reproducible() -> None:
    a, b = [1.0, 1.2, 0.9, 1.4], [1.1, 1.0, 1.0, 1.2]
    assert paired_ratio(a, b) == paired_ratio(a, b)


def test_coverage_and_false_alarms_on_synthetic_rounds() -> None:
    """Known truth, lognormal noise per round: the 95% interval covers the true ratio in most
    experiments, and a true ratio of 1.0 is rarely called worse."""
    rng = random.Random(7)

    def experiment(true_ratio: float, rounds: int = 8) -> Interval:
        drift = [math.exp(rng.gauss(0, 0.3)) for _ in range(rounds)]  # shared by both systems
        b = [100 * d * math.exp(rng.gauss(0, 0.08)) for d in drift]
        a = [100 * true_ratio * d * math.exp(rng.gauss(0, 0.08)) for d in drift]
        iv = paired_ratio(a, b, resamples=4000, seed=rng.randrange(1 << 30))
        assert iv is not None
        return iv

    runs = [experiment(1.2) for _ in range(200)]
    covered = sum(
        iv.low is not None and iv.high is not None and iv.low <= 1.2 <= iv.high for iv in runs
    )
    # The expanded interval covers ~94% from 8 rounds (the plain percentile one: ~88%).
    assert 0.9 <= covered / len(runs) <= 0.99
    five = [experiment(1.2, rounds=5) for _ in range(200)]
    covered5 = sum(
        iv.low is not None and iv.high is not None and iv.low <= 1.2 <= iv.high for iv in five
    )
    assert covered5 / len(five) >= 0.88  # ~92%; the plain percentile interval: ~83%
    # A 20% difference with 8% noise per round is found (the interval excludes 1.0) nearly always.
    assert sum(iv.worse(higher_is_better=False) for iv in runs) >= 190
    null = [experiment(1.0) for _ in range(200)]
    assert sum(iv.worse(higher_is_better=False) for iv in null) <= 20
    assert sum(iv.worse(higher_is_better=True) for iv in null) <= 20


def test_the_expansion_for_few_rounds() -> None:
    # Phi(-sqrt(5/4) * t_{0.975, 4}) = Phi(-3.104): the 0.1% and 99.9% bootstrap quantiles.
    assert expanded_tail(5) == pytest.approx(0.000956, rel=0.01)
    assert expanded_tail(8) == pytest.approx(0.00573, rel=0.01)
    # Many rounds: back to about the plain 2.5% (t -> 2.0 in the table, normal 1.96).
    assert 0.02 < expanded_tail(500) < 0.025
    assert expanded_tail(10, level=0.9) > expanded_tail(10)
    with pytest.raises(ValueError):
        expanded_tail(1)


def test_unpaired_ratio_of_launch_level_facts() -> None:
    iv = unpaired_ratio([60.0, 60.0, 60.0], [30.0, 30.0])
    assert iv is not None and iv.n == 2
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((2.0, 2.0, 2.0))
    one = unpaired_ratio([60.0], [30.0, 40.0])
    assert (
        one is not None
        and one.low is None
        and one.estimate == pytest.approx(60 / geomean([30.0, 40.0]))
    )
    assert unpaired_ratio([], [1.0]) is None
    spread = unpaired_ratio([50.0, 70.0, 60.0, 55.0], [30.0, 31.0, 29.0, 30.0])
    assert spread is not None and spread.low is not None and spread.high is not None
    assert 1.0 < spread.low < spread.estimate < spread.high

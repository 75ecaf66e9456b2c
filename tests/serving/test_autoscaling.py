"""The queue-depth autoscaling policy.

Part 1 (no Ray): the pure decision function `decide`, driven tick by tick with a fake clock:
bounds, delays, hysteresis, no flapping under steady (and noisy steady) load, scale to zero
and back, the capacity it learns, and the Serve config built from `AutoscalingArgs`.

Part 2 (Ray, `engine` marker, run under the engine lock) lives in
`test_autoscaling_served.py`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest

from moe_serving import autoscaling
from moe_serving.autoscaling import Observation, Settings, State, decide, replica_stats
from moe_serving.config import AppConfig

TICK = 0.1  # Serve's control loop period


def settings(**kw: float) -> Settings:
    base: dict[str, float] = {
        "target_queue_depth": 2,
        "upscale_delay_s": 3,
        "downscale_delay_s": 10,
        "capacity_per_replica": 4,
    }
    base.update(kw)
    return Settings(**base)


@dataclass
class Sim:
    """A deployment whose replicas each run `capacity` requests at once; the rest wait.

    Replicas appear `start_ticks` after a decision (running_replicas lags the target).
    """

    s: Settings
    low: int = 1
    high: int = 8
    replicas: int = 1
    capacity: float = 4
    start_ticks: int = 0
    now: float = 1000.0

    def __post_init__(self) -> None:
        self.state = State()
        self.running = self.replicas
        self.history = [self.replicas]
        self.ticks = 0
        self._pending: list[tuple[int, int]] = []  # (tick when up, count)

    def tick(self, demand: float) -> int:
        """One control-loop tick with `demand` requests in flight; returns the target."""
        self.now += TICK
        self.ticks += 1
        for due, count in [p for p in self._pending if p[0] <= self.ticks]:
            self.running = count
            self._pending.remove((due, count))
        if self.running > 0:
            running = min(demand, self.running * self.capacity)
            waiting, router = demand - running, 0.0
        else:
            running, waiting, router = 0.0, 0.0, demand
        obs = Observation(
            replicas=self.replicas,
            running_replicas=self.running,
            router_waiting=router,
            waiting=waiting,
            running=running,
            min_replicas=self.low,
            max_replicas=self.high,
        )
        desired, self.state = decide(self.s, obs, self.now, self.state)
        if desired != self.replicas:
            if desired < self.running or self.start_ticks == 0:
                self.running = desired
            else:
                self._pending.append((self.ticks + self.start_ticks, desired))
            self.replicas = desired
        self.history.append(desired)
        return desired

    def run(self, demand: float, seconds: float) -> int:
        for _ in range(round(seconds / TICK)):
            self.tick(demand)
        return self.replicas


def changes(history: list[int]) -> list[int]:
    """The sequence of distinct counts (one entry per change)."""
    return [k for k, _ in itertools.groupby(history)]


def turns(history: list[int]) -> int:
    """Direction reversals of a replica timeline."""
    steps = [1 if b > a else -1 for a, b in itertools.pairwise(changes(history))]
    return sum(1 for a, b in itertools.pairwise(steps) if a != b)


# ---- bounds and targets ----------------------------------------------------------------------


def test_idle_deployment_stays_at_min() -> None:
    sim = Sim(settings(), low=2, high=5, replicas=2)
    assert sim.run(0, 60) == 2
    assert set(sim.history) == {2}


def test_overload_scales_to_the_count_that_meets_the_target() -> None:
    # 30 in flight, 4 run per replica, target 2 waiting per replica -> ceil(30 / 6) = 5.
    sim = Sim(settings())
    assert sim.run(30, 20) == 5
    # At 5 replicas: 6 in flight each, 4 running + 2 waiting = the target, not above it.
    assert changes(sim.history) == [1, 5]


def test_scale_up_never_exceeds_max() -> None:
    sim = Sim(settings(), high=3)
    assert sim.run(1000, 30) == 3
    assert max(sim.history) == 3


def test_out_of_bounds_count_is_corrected_at_once() -> None:
    sim = Sim(settings(), low=2, high=4, replicas=6)
    sim.running = 6
    assert sim.tick(0) == 4
    sim2 = Sim(settings(), low=3, high=4, replicas=1)
    assert sim2.tick(0) == 3


def test_queue_at_or_below_target_does_not_scale_up() -> None:
    # 1 replica, 4 running + 2 waiting = exactly the target.
    sim = Sim(settings())
    assert sim.run(6, 60) == 1
    # One more waiting request is above the target.
    assert sim.run(7, 10) == 2


# ---- delays ----------------------------------------------------------------------------------


def test_upscale_waits_for_sustained_overload() -> None:
    s = settings(upscale_delay_s=3)
    sim = Sim(s)
    sim.run(30, 2.5)  # less than the delay
    assert sim.replicas == 1
    sim.run(30, 1)
    assert sim.replicas == 5


def test_overload_blips_shorter_than_the_delay_never_scale_up() -> None:
    sim = Sim(settings(upscale_delay_s=3))
    for _ in range(20):
        sim.run(30, 2)  # overload for 2 s ...
        sim.run(2, 0.2)  # ... then one calm moment restarts the clock
    assert set(sim.history) == {1}


def test_downscale_waits_for_sustained_underload() -> None:
    sim = Sim(settings(downscale_delay_s=10), replicas=4)
    sim.running = 4
    sim.run(0, 9.5)
    assert sim.replicas == 4
    sim.run(0, 1)
    assert sim.replicas == 1


def test_zero_delays_act_on_the_first_tick() -> None:
    sim = Sim(settings(upscale_delay_s=0, downscale_delay_s=0))
    assert sim.tick(30) == 5
    assert sim.tick(0) == 1


def test_a_change_of_direction_restarts_the_delay() -> None:
    s = settings(upscale_delay_s=3, downscale_delay_s=3)
    sim = Sim(s, replicas=3)
    sim.running = 3
    sim.run(0, 2)  # wanting down for 2 s
    sim.run(100, 2)  # now wanting up for 2 s: the down clock does not count
    assert sim.replicas == 3
    sim.run(100, 1.5)
    assert sim.replicas > 3


# ---- hysteresis / no flapping ------------------------------------------------------------------


@pytest.mark.parametrize("demand", [1, 4, 6, 7, 11, 12, 13, 17, 24, 30, 31, 47])
def test_steady_load_settles_and_never_flaps(demand: int) -> None:
    sim = Sim(settings(upscale_delay_s=1, downscale_delay_s=2), high=10)
    sim.run(demand, 30)
    settled = sim.replicas
    sim.history = [settled]
    sim.run(demand, 300)
    assert set(sim.history) == {settled}
    # Settled where the queue meets the target (or the bound).
    per_replica_waiting = max(0, demand - settled * 4) / settled
    assert per_replica_waiting <= 2


def test_noisy_steady_load_does_not_flap() -> None:
    rng = random.Random(7)
    sim = Sim(settings(upscale_delay_s=2, downscale_delay_s=5), high=10)
    for _ in range(6000):  # 10 minutes of ticks, load 20 +- 4
        sim.tick(20 + rng.uniform(-4, 4))
    assert turns(sim.history) == 0
    assert len(changes(sim.history)) <= 3


def test_step_load_goes_up_then_back_down_once() -> None:
    sim = Sim(settings(upscale_delay_s=1, downscale_delay_s=5), high=6, start_ticks=30)
    sim.run(1, 20)
    sim.run(40, 60)
    peak = sim.replicas
    sim.run(1, 60)
    assert peak == 6
    assert sim.replicas == 1
    assert turns(sim.history) == 1
    # While replicas start (3 s here) the target does not run away beyond what is needed.
    assert max(sim.history) == 6


def test_no_overshoot_while_new_replicas_start() -> None:
    # Long start-up: the queue stays high on the old replicas, but the target must not creep.
    sim = Sim(settings(upscale_delay_s=1), high=10, start_ticks=600)
    sim.run(12, 50)  # needs ceil(12 / 6) = 2
    assert changes(sim.history) == [1, 2]


def test_slowly_drifting_load_around_a_threshold_does_not_flap() -> None:
    # Load drifts between 17 and 19 in flight (period 60 s); 18 is where 3 replicas' queue
    # reaches the target. Without a band between the up and down thresholds this flaps.
    sim = Sim(settings(upscale_delay_s=2, downscale_delay_s=5), high=10, replicas=3)
    sim.running = 3
    for i in range(6000):
        sim.tick(18 + math.sin(2 * math.pi * i * TICK / 60))
    assert turns(sim.history) == 0
    assert changes(sim.history) == [3, 4]


def test_lower_real_capacity_is_learned_and_does_not_flap() -> None:
    # The admission limit says 8 at once, but the engine runs only 1 (e.g. KV cache bound).
    s = settings(upscale_delay_s=1, downscale_delay_s=2, capacity_per_replica=8)
    sim = Sim(s, high=10, capacity=1)
    sim.run(9, 120)
    assert turns(sim.history) == 0
    # With 1 running per replica and target 2 waiting: ceil(9 / 3) = 3 replicas.
    assert sim.replicas == 3


def test_stale_metrics_right_after_a_change_force_no_extra_replica() -> None:
    # Serve averages metrics over a look-back window: just after the 2nd replica came up the
    # average still shows the old queue. Only `needed` (from the total) acts until it settles.
    s = settings(target_queue_depth=1, capacity_per_replica=1, upscale_delay_s=0, settle_s=2)
    state = State(capacity=1.0, running=1, running_since=0.0)
    stale = Observation(2, 2, 0.0, waiting=3.0, running=1.0, min_replicas=1, max_replicas=5)
    desired, state = decide(s, stale, 10.0, state)
    assert desired == 2  # 4 in flight need ceil(4 / 2) = 2; no forced +1 while unsettled
    desired, state = decide(s, stale, 11.0, state)
    assert desired == 2
    # The same queue after the window has passed is real: one more replica.
    desired, _ = decide(s, stale, 12.5, state)
    assert desired == 3


# ---- scale to zero -----------------------------------------------------------------------------


def test_scale_to_zero_when_allowed_and_idle() -> None:
    sim = Sim(settings(downscale_delay_s=5), low=0, replicas=2)
    sim.running = 2
    sim.run(0, 6)
    assert sim.replicas == 0


def test_no_scale_to_zero_when_min_is_one() -> None:
    sim = Sim(settings(downscale_delay_s=5), low=1, replicas=2)
    sim.running = 2
    sim.run(0, 60)
    assert sim.replicas == 1


def test_from_zero_a_waiting_request_starts_a_replica_without_delay() -> None:
    sim = Sim(settings(upscale_delay_s=30), low=0, replicas=0)
    sim.running = 0
    assert sim.tick(0) == 0
    assert sim.tick(1) == 1  # first tick, despite the 30 s delay
    # Many waiting at the router: as many as the target asks for at once.
    sim2 = Sim(settings(upscale_delay_s=30), low=0, replicas=0)
    sim2.running = 0
    assert sim2.tick(30) == 5


def test_busy_replica_is_not_scaled_to_zero() -> None:
    sim = Sim(settings(downscale_delay_s=1), low=0, replicas=1)
    assert sim.run(1, 30) == 1


# ---- state and replica stats ---------------------------------------------------------------


def test_state_round_trips_through_serve_policy_state() -> None:
    state = State(direction=-1, since=12.5, capacity=3.0, running=2, running_since=11.0)
    merged = {"some_serve_key": 1, **state.as_dict()}
    assert State.from_dict(merged) == state
    assert State.from_dict({}) == State()


def test_decide_is_pure() -> None:
    obs = Observation(3, 3, 0.0, 10.0, 12.0, 1, 5)
    state = State(direction=1, since=1.0, capacity=4.0)
    first = decide(settings(), obs, 2.0, state)
    assert decide(settings(), obs, 2.0, state) == first
    assert state == State(direction=1, since=1.0, capacity=4.0)


def test_replica_stats_from_queue_depth() -> None:
    depth = {
        "queued": 3,
        "in_engine": 5,
        "scheduler_running": 4,
        "scheduler_waiting": 1,
        "rejected_total": 9,
        "cancelled_total": 2,
        "total": 8,
    }
    assert replica_stats(depth) == {"waiting": 4.0, "running": 4.0}
    # Idle engine with stale scheduler counts from its last step: nothing is in flight.
    stale = {**depth, "queued": 0, "in_engine": 0}
    assert replica_stats(stale) == {"waiting": 0.0, "running": 0.0}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"target_queue_depth": 0}, "must be > 0"),
        ({"capacity_per_replica": 0}, "must be > 0"),
        ({"downscale_headroom": 1.5}, "downscale_headroom"),
    ],
)
def test_bad_settings_are_refused(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**kw)


# ---- the Serve config built from AppConfig ---------------------------------------------------


def _config(**scaling: object) -> AppConfig:
    return AppConfig.model_validate(
        {"engine": {"model": "/m", "served_model_name": "m"}, "autoscaling": scaling}
    )


def test_fixed_count_when_min_equals_max() -> None:
    opts = autoscaling.replica_count_options(_config(min_replicas=2, max_replicas=2).autoscaling, 8)
    assert opts == {"num_replicas": 2}


def test_autoscaling_config_carries_the_spec() -> None:
    from ray.serve.config import AutoscalingConfig

    args = _config(
        min_replicas=0,
        max_replicas=3,
        target_queue_depth=5,
        upscale_delay_s=7,
        downscale_delay_s=70,
        look_back_period_s=4,
        metrics_interval_s=1,
    ).autoscaling
    opts = autoscaling.replica_count_options(args, 8)
    parsed = AutoscalingConfig(**opts["autoscaling_config"])
    assert (parsed.min_replicas, parsed.max_replicas, parsed.initial_replicas) == (0, 3, 1)
    # Serve's own delays are off: ours (with hysteresis) are the only ones.
    assert (parsed.upscale_delay_s, parsed.downscale_delay_s) == (0, 0)
    assert parsed.downscale_to_zero_delay_s == 0
    assert parsed.look_back_period_s == 4
    assert parsed.policy.policy_function == autoscaling.POLICY_FUNCTION
    assert parsed.policy.policy_kwargs == {
        "target_queue_depth": 5.0,
        "upscale_delay_s": 7.0,
        "downscale_delay_s": 70.0,
        "capacity_per_replica": 8,
        "settle_s": 4.0,
        "gang_size": 1,
    }
    # What Serve instantiates in the controller: our class with those kwargs.
    policy = parsed.policy.get_policy()(**parsed.policy.policy_kwargs)
    assert policy.settings == Settings(5, 7, 70, 8, settle_s=4)


def test_spec_initial_replicas_is_kept() -> None:
    args = _config(min_replicas=1, max_replicas=4, initial_replicas=3).autoscaling
    opts = autoscaling.replica_count_options(args, 8)
    assert opts["autoscaling_config"]["initial_replicas"] == 3


def test_min_above_max_is_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match="lower min_replicas or raise max_replicas"):
        _config(min_replicas=3, max_replicas=2)


class _Ctx:
    """Just the `AutoscalingContext` attributes the policy reads (Serve builds the real one
    in the controller; the served test exercises that path)."""

    target_num_replicas: int
    policy_state: dict[str, object]

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


def test_policy_reads_serve_context_and_keeps_state() -> None:
    policy = autoscaling.QueueDepthPolicy(2, 0, 10, 4)
    ctx = _Ctx(
        aggregated_metrics={"waiting": {"r1": 10.0}, "running": {"r1": 4.0}},
        target_num_replicas=1,
        current_num_replicas=1,
        total_queued_requests=2.0,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=5,
        current_time=100.0,
        policy_state={"serve_internal": 1},
    )
    desired, state = policy(ctx)
    assert desired == 3  # 16 in flight / (4 running + 2 waiting) per replica
    idle = _Ctx(**{**ctx.__dict__, "aggregated_metrics": {}, "total_queued_requests": 0.0})
    idle.target_num_replicas = 3
    idle.policy_state = state
    desired, state = policy(idle)
    assert desired == 3 and state["moe_direction"] == -1  # down is wanted, delay running


def test_gangs_scale_as_whole_dp_groups() -> None:
    """With one Serve replica per DP rank, Serve counts DP replicas per MoEDeployment replica;
    the policy decides in whole groups (each with all its ranks' capacity) and answers a
    multiple of the gang size (Serve refuses counts that split a gang:
    ray/serve/_private/deployment_scheduler.py, `_prepare_gangs_for_deployment`)."""
    policy = autoscaling.QueueDepthPolicy(2, 0, 10, 4, gang_size=2)
    ctx = _Ctx(
        aggregated_metrics={
            "waiting": {"r1": 5.0, "r2": 5.0},
            "running": {"r1": 4.0, "r2": 4.0},
        },
        target_num_replicas=2,
        current_num_replicas=2,
        total_queued_requests=2.0,
        capacity_adjusted_min_replicas=2,
        capacity_adjusted_max_replicas=10,
        current_time=100.0,
        policy_state={},
    )
    desired, _ = policy(ctx)
    # 20 in flight over groups of 8 running + 2 waiting -> 2 groups = 4 Serve replicas.
    assert desired == 4
    assert desired % 2 == 0
    fixed = autoscaling.replica_count_options(
        _config(min_replicas=2, max_replicas=2).autoscaling, 8, gang_size=4
    )
    assert fixed == {"num_replicas": 8}

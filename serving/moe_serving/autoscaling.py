"""Replicas follow queue depth: a Ray Serve custom autoscaling policy.

The signal is the number of requests *waiting* per replica: those queued at Serve's router
(no replica took them yet) plus, on each replica, those in our admission queue and those
waiting in vLLM's scheduler. Replicas report theirs through `record_autoscaling_stats`
(`replica_stats`), Serve averages them over `look_back_period_s` and calls
`QueueDepthPolicy` in the controller.

The decision itself is `decide`, a pure function (no Ray), so that hysteresis, delays, bounds
and scale-to-zero are tested exhaustively without a cluster:

* up: when the waiting requests per replica exceed `target_queue_depth`, to the smallest count
  whose projected queue (the in-flight requests beyond what the replicas run at once) is at
  most the target, and at least one more replica unless a scale-up is still starting;
* down: only when a smaller count could run every in-flight request with nothing waiting and
  `downscale_headroom` of its capacity to spare. Between the two thresholds nothing happens,
  so a steady load never flaps;
* a change must be wanted continuously for `upscale_delay_s` / `downscale_delay_s`; one
  observation inside the band restarts the clock;
* with `min_replicas` 0 the deployment goes to zero when nothing is in flight, and from zero
  it starts replicas at once when requests wait at the router (they wait, they do not fail).

A replica's capacity (requests it runs at once) starts as `max_ongoing_requests` and is
learned from observation when replicas are saturated (requests waiting): vLLM may run fewer
than our admission limit, and a capacity that is too high would make the policy shrink
into overload and grow again (flapping).

Serve's own delay/bound logic wraps every custom policy; `serve_autoscaling_config` sets
Serve's delays to 0 so that ours are the only ones, and the same min/max.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Metric names a replica reports from `record_autoscaling_stats`.
WAITING = "waiting"
RUNNING = "running"
POLICY_FUNCTION = "moe_serving.autoscaling:QueueDepthPolicy"
# Keys of our state inside Serve's policy_state (shared with Serve's internal keys).
_STATE_PREFIX = "moe_"


@dataclass(frozen=True)
class Settings:
    """The spec's targets (`AppConfig.autoscaling`) plus the replica's admission capacity."""

    target_queue_depth: float
    upscale_delay_s: float
    downscale_delay_s: float
    capacity_per_replica: float  # requests a replica runs at once (max_ongoing_requests)
    downscale_headroom: float = 0.8  # fraction of capacity a smaller count may be loaded to
    # After the running count changes, metrics averaged over Serve's look-back window still
    # describe the old count: no extra replica is forced for this long (`needed` still acts).
    settle_s: float = 0.0

    def __post_init__(self) -> None:
        if self.target_queue_depth <= 0 or self.capacity_per_replica <= 0:
            raise ValueError("target_queue_depth and capacity_per_replica must be > 0")
        if not 0 < self.downscale_headroom <= 1:
            raise ValueError("downscale_headroom must be in (0, 1]")


@dataclass(frozen=True)
class Observation:
    """What the controller sees at one tick (sums over the replicas that reported)."""

    replicas: int  # the current target count (what a decision changes)
    running_replicas: int  # replicas up and reporting (fewer while a scale-up starts)
    router_waiting: float  # queued at Serve handles, not yet on a replica
    waiting: float  # on replicas: admission queue + vLLM scheduler waiting
    running: float  # on replicas: running in vLLM
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class State:
    """What the policy remembers between ticks."""

    direction: int = 0  # +1 / -1 while a change is wanted, 0 otherwise
    since: float | None = None  # when that change became wanted
    capacity: float | None = None  # learned requests-at-once per replica
    running: int | None = None  # running replicas last seen ...
    running_since: float | None = None  # ... and since when

    def as_dict(self) -> dict[str, Any]:
        return {f"{_STATE_PREFIX}{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> State:
        def get(key: str, kind: type) -> Any:
            value = data.get(f"{_STATE_PREFIX}{key}")
            return None if value is None else kind(value)

        return cls(
            direction=int(data.get(f"{_STATE_PREFIX}direction", 0)),
            since=get("since", float),
            capacity=get("capacity", float),
            running=get("running", int),
            running_since=get("running_since", float),
        )


def _learn_capacity(settings: Settings, obs: Observation, state: State) -> float:
    capacity = state.capacity if state.capacity is not None else settings.capacity_per_replica
    if obs.running_replicas > 0:
        per_replica = obs.running / obs.running_replicas
        if obs.waiting / obs.running_replicas >= 1 or per_replica > capacity:
            # Requests wait on the replicas (they run all they can), or they proved to run
            # more at once than we thought: either way this is their capacity.
            capacity = per_replica
    return min(max(capacity, 1.0), settings.capacity_per_replica)


def _needed(demand: float, capacity: float, target: float) -> int:
    """Smallest count whose projected queue per replica is at most the target."""
    if demand <= 0:
        return 0
    return max(1, math.ceil(demand / (capacity + target) - 1e-9))


def decide(settings: Settings, obs: Observation, now: float, state: State) -> tuple[int, State]:
    """Desired replica count and the new state (pure: same inputs, same answer)."""
    low, high = obs.min_replicas, max(obs.max_replicas, obs.min_replicas)
    capacity = _learn_capacity(settings, obs, state)
    waiting = obs.router_waiting + obs.waiting
    demand = waiting + obs.running
    n = obs.replicas
    running_since = state.running_since
    if state.running != obs.running_replicas or running_since is None:
        running_since = now
    settled = now - running_since + 1e-6 >= settings.settle_s
    # What is kept whatever the decision (a pending change is added below when there is one).
    keep = State(capacity=capacity, running=obs.running_replicas, running_since=running_since)

    def clamp(count: int) -> int:
        return min(max(count, low), high)

    if n == 0 or not low <= n <= high:
        # From zero: requests are waiting for a replica, start them now (no delay).
        # Out of bounds (the spec changed): back inside at once.
        wanted = clamp(_needed(demand, capacity, settings.target_queue_depth)) if n == 0 else n
        return clamp(wanted), keep

    if waiting / n > settings.target_queue_depth:
        wanted = _needed(demand, capacity, settings.target_queue_depth)
        if obs.running_replicas >= n and settled:
            wanted = max(wanted, n + 1)  # the queue is real: at least one more
        candidate = clamp(wanted)
    else:
        # A smaller count must carry all in-flight work below its running capacity.
        fits = math.ceil(demand / (capacity * settings.downscale_headroom) - 1e-9)
        candidate = clamp(fits) if fits < n else n

    if candidate == n:
        return n, keep  # inside the band: any pending change is forgotten
    direction = 1 if candidate > n else -1
    since = state.since if state.direction == direction and state.since is not None else now
    delay = settings.upscale_delay_s if direction > 0 else settings.downscale_delay_s
    if now - since + 1e-6 >= delay:
        return candidate, keep
    return n, replace(keep, direction=direction, since=since)


# ---- the replica side ----------------------------------------------------------------------


def replica_stats(depth: dict[str, int]) -> dict[str, float]:
    """What a replica reports (`record_autoscaling_stats`) from its `QueueDepth.as_dict()`.

    vLLM's scheduler counts are as of its last step (stale once idle), so they are bounded by
    the requests actually unfinished in the engine.
    """
    in_engine = max(int(depth.get("in_engine", 0)), 0)
    engine_waiting = min(max(int(depth.get("scheduler_waiting", 0)), 0), in_engine)
    return {
        WAITING: float(int(depth.get("queued", 0)) + engine_waiting),
        RUNNING: float(in_engine - engine_waiting),
    }


# ---- the Serve side ------------------------------------------------------------------------


class QueueDepthPolicy:
    """Serve calls an instance once per control-loop tick with an `AutoscalingContext`.

    A class (not a function) because Serve passes `policy_kwargs` only to a class constructor.
    """

    def __init__(
        self,
        target_queue_depth: float,
        upscale_delay_s: float,
        downscale_delay_s: float,
        capacity_per_replica: float,
        downscale_headroom: float = 0.8,
        settle_s: float = 0.0,
        gang_size: int = 1,
    ) -> None:
        # With DP > 1 Serve counts one replica per DP rank; decide() counts whole DP groups,
        # whose capacity is that of all their ranks.
        self.gang = max(int(gang_size), 1)
        self.settings = Settings(
            target_queue_depth=target_queue_depth,
            upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s,
            capacity_per_replica=capacity_per_replica * self.gang,
            downscale_headroom=downscale_headroom,
            settle_s=settle_s,
        )

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics: dict[str, dict[Any, float]] = ctx.aggregated_metrics or {}
        waiting = metrics.get(WAITING, {})
        running = metrics.get(RUNNING, {})
        g = self.gang
        running_serve = len(waiting) if waiting else int(ctx.current_num_replicas)
        obs = Observation(
            replicas=int(ctx.target_num_replicas) // g,
            running_replicas=running_serve // g,
            router_waiting=float(ctx.total_queued_requests or 0.0),
            waiting=float(sum(waiting.values())),
            running=float(sum(running.values())),
            min_replicas=int(ctx.capacity_adjusted_min_replicas) // g,
            max_replicas=int(ctx.capacity_adjusted_max_replicas) // g,
        )
        now = float(ctx.current_time) if ctx.current_time is not None else 0.0
        desired, state = decide(self.settings, obs, now, State.from_dict(ctx.policy_state or {}))
        return desired * g, state.as_dict()


def serve_autoscaling_config(
    args: Any, capacity_per_replica: int, initial_replicas: int, gang_size: int = 1
) -> dict[str, Any]:
    """Serve's `autoscaling_config` for an `AutoscalingArgs` (our policy, Serve's delays off)."""
    from ray.serve.config import AutoscalingPolicy

    config: dict[str, Any] = {
        "min_replicas": args.min_replicas * gang_size,
        "max_replicas": max(args.max_replicas, args.min_replicas) * gang_size,
        "initial_replicas": initial_replicas * gang_size,
        # Our policy applies the spec's delays (with hysteresis); Serve's would add to them.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "look_back_period_s": args.look_back_period_s,
        "policy": AutoscalingPolicy(
            policy_function=POLICY_FUNCTION,
            policy_kwargs={
                "target_queue_depth": args.target_queue_depth,
                "upscale_delay_s": args.upscale_delay_s,
                "downscale_delay_s": args.downscale_delay_s,
                "capacity_per_replica": capacity_per_replica,
                "settle_s": args.look_back_period_s,
                "gang_size": gang_size,
            },
        ),
    }
    if args.metrics_interval_s != 10.0:  # Serve warns about the (deprecated) field when set
        config["metrics_interval_s"] = args.metrics_interval_s
    return config


def replica_count_options(
    args: Any, capacity_per_replica: int, gang_size: int = 1
) -> dict[str, Any]:
    """Serve deployment options for the replica count: fixed, or our autoscaling policy.

    `args` counts MoEDeployment replicas; with `gang_size` > 1 (one Serve replica per DP rank)
    Serve counts `gang_size` replicas for each, and the policy decides in whole gangs.
    """
    initial = args.initial_replicas
    if initial is None:
        initial = max(args.min_replicas, 1)
    if args.min_replicas == args.max_replicas and args.min_replicas > 0:
        return {"num_replicas": args.min_replicas * gang_size}
    initial = min(max(initial, args.min_replicas), max(args.max_replicas, args.min_replicas))
    return {
        "autoscaling_config": serve_autoscaling_config(
            args, capacity_per_replica, initial, gang_size
        )
    }

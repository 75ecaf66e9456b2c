"""When to recommend EPLB, from the observed expert imbalance (pure: no I/O, no clock).

`spec.parallelism.eplb.mode: auto` asks the operator to watch `status.expertImbalance` (the
worst engine's worst MoE layer: max / mean tokens over its EP ranks, over the replicas' last
minute) and to recommend vLLM's expert-parallel load balancer when the imbalance persists:

* start recommending when every reading for `sustain_s` was >= `threshold`;
* stop when every reading for `sustain_s` was <= `threshold - HYSTERESIS` (between the two
  bands nothing changes, so a value hovering at the threshold never flaps);
* never change state twice within `min_interval_s`;
* no reading (no EP traffic, the state unreadable) holds the current state and restarts the
  run of readings: only a continuous run counts.

The redundant-expert count comes from the observed load: the busiest rank carries
(imbalance - 1) x its fair share too much, so that many of its experts' worth of copies
(rounded up) spread over the other ranks, raised to the next count that makes
experts + redundant divide by EP (the planner's rule: every EP rank holds as many slots).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_operator.api import MoEDeploymentSpec

#: The band between starting and stopping a recommendation.
HYSTERESIS = 0.1


@dataclass(frozen=True)
class Settings:
    """One deployment's advisor inputs (from its spec and plan)."""

    threshold: float
    sustain_s: float
    min_interval_s: float
    num_experts: int
    ep: int  # expert-parallel size of one engine (1: nothing to balance)
    eplb_enabled: bool  # EPLB already on: nothing to recommend


@dataclass
class Tracker:
    """What the advisor remembers about one deployment between readings."""

    recommending: bool = False
    run_start: float | None = None  # start of the current run of readings past a band
    run_side: str | None = None  # "above" or "below"
    last_change: float | None = None
    worst_in_run: float = 0.0
    peak: float = 0.0  # the run's worst when the recommendation started
    recommended: int = 0  # its redundant-expert count


@dataclass(frozen=True)
class Advice:
    recommend: bool
    redundant_experts: int
    message: str


def redundant_for(imbalance: float, num_experts: int, ep: int) -> int:
    """Redundant experts for an observed max/mean imbalance (see the module's docstring)."""
    if ep <= 1 or imbalance <= 1.0:
        return 0
    per_rank = num_experts / ep
    n = max(1, math.ceil((imbalance - 1.0) * per_rank))
    while (num_experts + n) % ep:
        n += 1
    return n


def observe(tracker: Tracker, s: Settings, now: float, imbalance: float | None) -> Advice | None:
    """Feed one reading; the current advice, or None when the advisor does not apply."""
    if s.ep <= 1 or s.eplb_enabled:
        tracker.recommending = False
        return None
    if imbalance is None:
        tracker.run_start = tracker.run_side = None
    else:
        side = (
            "above"
            if imbalance >= s.threshold
            else "below"
            if imbalance <= s.threshold - HYSTERESIS
            else None
        )
        if side is None or side != tracker.run_side:
            tracker.run_side, tracker.run_start = side, (now if side else None)
            tracker.worst_in_run = 0.0
        if side == "above":
            tracker.worst_in_run = max(tracker.worst_in_run, imbalance)
        sustained = tracker.run_start is not None and now - tracker.run_start >= s.sustain_s
        quiet = tracker.last_change is None or now - tracker.last_change >= s.min_interval_s
        wants = side == "above"
        if sustained and quiet and wants != tracker.recommending:
            tracker.recommending = wants
            tracker.last_change = now
            tracker.peak = tracker.worst_in_run if wants else 0.0
            tracker.recommended = redundant_for(tracker.peak, s.num_experts, s.ep) if wants else 0
    if not tracker.recommending:
        return Advice(
            False,
            0,
            f"expert imbalance below {s.threshold:g} (or not sustained {s.sustain_s:.0f}s)",
        )
    n = tracker.recommended
    return Advice(
        True,
        n,
        f"worst-layer expert imbalance stayed >= {s.threshold:g} for {s.sustain_s:.0f}s "
        f"(peak {tracker.peak:.2f}): set spec.parallelism.eplb.enabled: true with "
        f"redundantExperts: {n} ({s.num_experts} + {n} experts divide by EP{s.ep})",
    )


# ----------------------------------------------------------------------------- applying it
# Under `apply`, the operator turns EPLB on itself. The decision lives in the status
# (`status.eplbApplied`), never in the spec the user wrote: the effective spec is the written one
# with EPLB on and the recorded redundant-expert count, so planning and rendering stay pure and
# every later pass (and a restarted operator) renders the same. It is never undone here: once on,
# EPLB evens the load out, and turning it off on a calm reading would bring the imbalance back.


def applies(spec: MoEDeploymentSpec) -> bool:
    """The spec lets the operator turn EPLB on (mode auto, apply, EPLB not already on)."""
    eplb = spec.parallelism.eplb
    return eplb.mode == "auto" and eplb.apply and not eplb.enabled


def applied(spec: MoEDeploymentSpec, status: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The recorded application, while the spec still allows it (else None: EPLB as written)."""
    record = (status or {}).get("eplbApplied")
    return dict(record) if applies(spec) and isinstance(record, Mapping) else None


def record(advice: Advice | None, imbalance: float | None, now: str) -> dict[str, Any] | None:
    """The status record of applying `advice` now (None unless it recommends)."""
    if advice is None or not advice.recommend:
        return None
    return {
        "redundantExperts": advice.redundant_experts,
        "imbalance": round(imbalance or 0.0, 2),
        "time": now,
    }


def effective(spec: MoEDeploymentSpec, record: Mapping[str, Any] | None) -> MoEDeploymentSpec:
    """The spec with the recorded EPLB on (the spec itself when nothing was applied)."""
    if record is None:
        return spec
    eplb = spec.parallelism.eplb.model_copy(
        update={"enabled": True, "redundant_experts": int(record["redundantExperts"])}
    )
    parallelism = spec.parallelism.model_copy(update={"eplb": eplb})
    return spec.model_copy(update={"parallelism": parallelism})

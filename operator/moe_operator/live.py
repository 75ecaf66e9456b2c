"""Live serving state -> status values (pure: no kopf, no client, no I/O).

The operator reads each ready MoEDeployment's `GET /v1/moe/state` (served by the Serve app's
ingress, see moe_serving.live_state) on a fixed interval. Two consecutive samples give the
output token rate and, with the plan's hourly price per replica, the live cost per million
output tokens. Values are rounded so that noise does not turn into status writes.

`peering_paused` applies kopf's peering rule to a peering object, so the poller (which kopf does
not pause: it is not a kopf handler) stays quiet while another operator is in charge.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moe_operator.eplb_advisor import Advice
from moe_operator.throughput import cost_per_million_tokens

#: Major version of the `/v1/moe/state` body this operator understands.
STATE_VERSION = 1


class BadState(ValueError):
    """The serving side answered something that is not a state body this operator reads."""


@dataclass(frozen=True)
class Sample:
    """One read of a Serve application's live state."""

    time: float  # seconds since the epoch, the serving side's clock
    running_replicas: int | None
    target_replicas: int | None
    reporting_replicas: int
    waiting: int
    running: int
    generated_tokens_total: int
    replica_ids: tuple[str, ...]
    #: optional features served without, (feature, reason) sorted; None: not reported (a
    #: serving image older than the report)
    unavailable: tuple[tuple[str, str], ...] | None = None
    #: worst engine's worst-layer max/mean over its EP ranks in the last window; None: none
    expert_imbalance: float | None = None


@dataclass(frozen=True)
class LiveStatus:
    """What goes into the MoEDeployment's status."""

    queue_depth: float
    desired_replicas: int | None
    serving_replicas: int
    output_tokens_per_second: float | None
    cost_per_million_tokens: float | None
    unavailable: tuple[tuple[str, str], ...] | None = None  # as in Sample
    expert_imbalance: float | None = None  # rounded to 2 decimals (written only on change)
    eplb_advice: Advice | None = None  # eplb.mode auto (eplb_advisor); None: not advising


def parse(body: Any) -> Sample:
    """A Sample from a `/v1/moe/state` body; BadState says what is wrong."""
    if not isinstance(body, Mapping):
        raise BadState(f"expected a JSON object, got {type(body).__name__}")
    if body.get("version") != STATE_VERSION:
        version = body.get("version")
        raise BadState(f"state version {version!r}; this operator reads {STATE_VERSION}")
    try:
        replicas = body["replicas"]
        load = body["load"]
        return Sample(
            time=float(body["time"]),
            running_replicas=_opt_int(replicas.get("running")),
            target_replicas=_opt_int(replicas.get("target")),
            reporting_replicas=int(load["reporting_replicas"]),
            waiting=int(load["waiting"]),
            running=int(load["running"]),
            generated_tokens_total=int(load["generated_tokens_total"]),
            replica_ids=tuple(str(r) for r in load.get("replica_ids") or ()),
            unavailable=_unavailable(body.get("unavailable")),
            expert_imbalance=_opt_float(load.get("expert_imbalance")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BadState(f"malformed state body: {err!r}") from err


def _unavailable(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BadState(f"unavailable: expected an object, got {type(value).__name__}")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _sig(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def token_rate(previous: Sample | None, current: Sample) -> float | None:
    """Output tokens per second between two samples of the same replicas; None when unknown
    (first sample, a replica came or went, or a counter restarted)."""
    if previous is None or previous.replica_ids != current.replica_ids:
        return None
    elapsed = current.time - previous.time
    produced = current.generated_tokens_total - previous.generated_tokens_total
    if elapsed <= 0 or produced < 0:
        return None
    return produced / elapsed


def summarize(
    previous: Sample | None, current: Sample, hourly_cost_per_replica: float
) -> LiveStatus:
    """Status values from the latest sample (and the one before it, for rates)."""
    serving = current.running_replicas
    if serving is None:
        serving = current.reporting_replicas
    rate = token_rate(previous, current)
    cost = None
    if rate is not None and rate > 0 and serving > 0:
        cost = cost_per_million_tokens(hourly_cost_per_replica * serving, rate)
    return LiveStatus(
        queue_depth=round(current.waiting / max(serving, 1), 1),
        desired_replicas=current.target_replicas,
        serving_replicas=serving,
        output_tokens_per_second=None if rate is None else _sig(rate),
        cost_per_million_tokens=None if cost is None else _sig(cost),
        unavailable=current.unavailable,
        expert_imbalance=(
            None if current.expert_imbalance is None else round(current.expert_imbalance, 2)
        ),
    )


def peering_paused(peers: Mapping[str, Any] | None, priority: int, now: datetime.datetime) -> bool:
    """kopf's rule on a peering object's `status` (peer id -> priority, lifetime, lastseen):
    paused when a live peer has a higher priority, or another live peer has the same one.

    Our own entry is among them, and kopf's ids are random per process, so "another peer of the
    same priority" is "more than one live peer of our priority".
    """
    same = 0
    for info in (peers or {}).values():
        if not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.datetime.fromisoformat(str(info["lastseen"]))
            lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
            peer_priority = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        if seen + lifetime <= now:
            continue  # dead
        if peer_priority > priority:
            return True
        if peer_priority == priority:
            same += 1
    return same > 1

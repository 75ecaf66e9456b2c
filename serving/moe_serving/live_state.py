"""Live state of one Serve application, for the operator's status: load, replicas, tokens.

A deployment handle reaches one replica, and Ray Serve has no broadcast to all replicas of a
deployment, so every engine replica pushes a small load report to a named actor of its
application (the board) every few seconds; the ingress's `GET /v1/moe/state` sums the fresh
reports and adds Ray Serve's replica counts (running and the autoscaler's target). A report
older than `STALE_AFTER_S` (its replica died or hangs) no longer counts.

`aggregate` and `state_body` are pure; `board` and `serve_replicas` need a Ray worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, cast

from moe_serving import imbalance

#: How often an engine replica reports.
REPORT_INTERVAL_S = 2.0
#: A report this old no longer counts (several missed intervals).
STALE_AFTER_S = 10.0
#: Version of the `/v1/moe/state` body; the operator refuses bodies of another major version.
STATE_VERSION = 1

Report = dict[str, Any]


def report(
    replica: str,
    depth: Mapping[str, int],
    generated_tokens: int,
    requests: int,
    node: str | None = None,
    dp_rank: int | None = None,
    unavailable: Mapping[str, str] | None = None,
    engine_group: str | None = None,
    expert_window: Mapping[str, int] | None = None,
) -> Report:
    """One engine replica's report: its queue depth and counters since it started, where it
    runs (node IP; DP rank when it is one rank of a data-parallel group), and the optional
    features its checkpoint cannot support (feature -> reason, moe_serving.parser_support); the
    engine it belongs to (`engine_group`: the DP group's gang id, else the replica) and its
    ranks' tokens per MoE layer in the last window (`expert_window`: "layer:rank" -> tokens)."""
    return {
        "replica": replica,
        "node": node,
        "dp_rank": dp_rank,
        "time": time.time(),
        "queued": int(depth.get("queued", 0)),
        "in_engine": int(depth.get("in_engine", 0)),
        "scheduler_waiting": int(depth.get("scheduler_waiting", 0)),
        "scheduler_running": int(depth.get("scheduler_running", 0)),
        "generated_tokens_total": int(generated_tokens),
        "requests_total": int(requests),
        "unavailable": dict(unavailable or {}),
        "engine_group": engine_group or replica,
        "expert_window": {str(k): int(v) for k, v in (expert_window or {}).items()},
    }


def aggregate(reports: Mapping[str, Report], now: float) -> dict[str, Any]:
    """Sum of the fresh reports (waiting = our queue + vLLM's waiting; running = vLLM's)."""
    fresh = [r for r in reports.values() if now - float(r.get("time", 0)) <= STALE_AFTER_S]
    waiting = sum(r["queued"] + max(r["in_engine"] - r["scheduler_running"], 0) for r in fresh)
    running = sum(min(r["scheduler_running"], r["in_engine"]) for r in fresh)
    return {
        "reporting_replicas": len(fresh),
        "waiting": waiting,
        "running": running,
        # Counters restart with a replica: the operator treats a drop as a restart.
        "generated_tokens_total": sum(r["generated_tokens_total"] for r in fresh),
        "requests_total": sum(r["requests_total"] for r in fresh),
        "replica_ids": sorted(str(r["replica"]) for r in fresh),
        "expert_imbalance": expert_imbalance(fresh),
    }


def expert_imbalance(fresh: list[Report]) -> float | None:
    """The worst engine's worst-layer max/mean over its EP ranks (moe_serving.imbalance), its
    ranks' window counts merged over the replicas of the engine (one per DP rank); None when no
    engine counted tokens on more than one rank."""
    groups: dict[str, dict[tuple[int, int], int]] = {}
    for r in fresh:
        merged = groups.setdefault(str(r.get("engine_group") or r["replica"]), {})
        for key, n in (r.get("expert_window") or {}).items():
            layer, rank = (int(x) for x in str(key).split(":"))
            merged[(layer, rank)] = merged.get((layer, rank), 0) + int(n)
    worst: float | None = None
    for counts in groups.values():
        if len({rank for _, rank in counts}) < 2:
            continue  # one EP rank: nothing to balance
        ratio, _ = imbalance.rank_imbalance(counts)
        if ratio is not None:
            worst = ratio if worst is None else max(worst, ratio)
    return worst


def unavailable(reports: Mapping[str, Report], now: float) -> dict[str, str]:
    """Optional features some fresh replica serves without (feature -> its reason)."""
    out: dict[str, str] = {}
    for r in sorted(reports.values(), key=lambda r: str(r.get("replica"))):
        if now - float(r.get("time", 0)) <= STALE_AFTER_S:
            for feature, reason in (r.get("unavailable") or {}).items():
                out.setdefault(str(feature), str(reason))
    return out


def engines(reports: Mapping[str, Report], now: float) -> list[dict[str, Any]]:
    """Where each engine replica with a fresh report runs (node IP, DP rank), by replica id."""
    fresh = [r for r in reports.values() if now - float(r.get("time", 0)) <= STALE_AFTER_S]
    return [
        {"replica": str(r["replica"]), "node": r.get("node"), "dp_rank": r.get("dp_rank")}
        for r in sorted(fresh, key=lambda r: str(r["replica"]))
    ]


def state_body(
    app: str,
    deployment: str,
    reports: Mapping[str, Report],
    running_replicas: int | None,
    target_replicas: int | None,
    now: float,
) -> dict[str, Any]:
    """The JSON body of `GET /v1/moe/state`."""
    load = aggregate(reports, now)
    return {
        "version": STATE_VERSION,
        "time": now,
        "application": app,
        "deployment": deployment,
        "replicas": {"running": running_replicas, "target": target_replicas},
        "load": load,
        "engines": engines(reports, now),
        # Optional features served without (e.g. tool calling when the tokenizer lacks the
        # parser's tokens); the operator turns it into conditions. Absent from older replicas.
        "unavailable": unavailable(reports, now),
    }


class RateWindow:
    """Output tokens per second of the whole application between two reads of its load (the
    ingress's /metrics scrapes); None until two comparable reads exist."""

    #: Reads closer than this keep the previous rate (a burst of scrapes is not a window).
    MIN_GAP_S = 1.0

    def __init__(self) -> None:
        self.last: tuple[float, int, tuple[str, ...]] | None = None
        self.rate: float | None = None

    def update(self, load: Mapping[str, Any], now: float) -> float | None:
        ids = tuple(str(r) for r in load.get("replica_ids") or ())
        total = int(load.get("generated_tokens_total", 0))
        if self.last is not None:
            then, before, ids_before = self.last
            if now - then < self.MIN_GAP_S:
                return self.rate
            # Another replica set, or a counter restarted: not comparable, no rate this time.
            comparable = ids == ids_before and total >= before
            self.rate = (total - before) / (now - then) if comparable else None
        self.last = (now, total, ids)
        return self.rate


def cost_per_million_tokens(hourly_usd: float | None, tokens_per_s: float | None) -> float | None:
    """USD per million output tokens at this rate; None when idle or without a price."""
    if hourly_usd is None or tokens_per_s is None or tokens_per_s <= 0:
        return None
    return hourly_usd / (tokens_per_s * 3600.0) * 1e6


# ---- Ray side ---------------------------------------------------------------------------------


class Board:
    """The latest report of every engine replica of one application (a tiny Ray actor)."""

    def __init__(self) -> None:
        self.reports: dict[str, Report] = {}
        self.metrics: dict[str, tuple[float, str]] = {}  # replica -> (time, Prometheus text)

    def put(self, item: Report) -> None:
        self.reports[str(item["replica"])] = item
        # Forget replicas gone for long (replica ids are never reused).
        cutoff = time.time() - 30 * STALE_AFTER_S
        for key in [k for k, r in self.reports.items() if float(r["time"]) < cutoff]:
            del self.reports[key]

    def drop(self, replica: str) -> None:
        self.reports.pop(replica, None)
        self.metrics.pop(replica, None)

    def get(self) -> dict[str, Report]:
        return dict(self.reports)

    def put_metrics(self, replica: str, text: str) -> None:
        now = time.time()
        self.metrics[replica] = (now, text)
        for key in [k for k, (t, _) in self.metrics.items() if now - t > STALE_AFTER_S]:
            del self.metrics[key]  # a replica that stopped reporting is gone from /metrics

    def get_metrics(self) -> dict[str, str]:
        """The latest Prometheus text of every replica that reported lately."""
        now = time.time()
        return {k: text for k, (t, text) in self.metrics.items() if now - t <= STALE_AFTER_S}


def board(app_name: str) -> Any:
    """The application's board actor, created by whichever replica asks first.

    Detached, so it outlives the replica that created it; it takes no CPU. It lives in Serve's
    namespace on the head node (Ray's `node:__internal_head__` resource), which lives as long as
    the cluster: on a worker node it would die with that node and take the live state with it.
    """
    import ray

    return (
        ray.remote(Board)
        .options(
            name=f"moe-live-state:{app_name}",
            namespace="serve",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        )
        .remote()
    )


def serve_details() -> dict[str, Any] | None:
    """The Serve controller's instance details (what the dashboard's Serve REST API returns);
    None when the controller cannot be asked."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return cast(
            dict[str, Any], ray.get(controller.get_serve_instance_details.remote(), timeout=10)
        )
    except Exception:  # controller restarting, or an older Ray
        return None


def deployment_status(details: Mapping[str, Any], app_name: str, deployment: str) -> str | None:
    """A deployment's Serve status (HEALTHY, UPDATING, UNHEALTHY, ...) from the details (pure)."""
    app = (details.get("applications") or {}).get(app_name) or {}
    dep = (app.get("deployments") or {}).get(deployment) or {}
    status = dep.get("status")
    # The controller's details hold Serve's enum members (str, Enum): compare their values.
    return str(getattr(status, "value", status)) if status is not None else None


def none_can_serve(
    details: Mapping[str, Any], app_name: str, deployment: str, gang_size: int = 1
) -> bool:
    """No whole replica runs and Serve calls the deployment UNHEALTHY (or failed): requests
    would wait for a replica that is not merely starting (pure). While replicas start (a
    rolling change, scale from zero) the deployment is UPDATING / UPSCALING instead."""
    running, _ = replica_counts(details, app_name, deployment, gang_size)
    status = deployment_status(details, app_name, deployment)
    return running == 0 and status in ("UNHEALTHY", "DEPLOY_FAILED")


class EngineAvailability:
    """Whether requests should be refused because no engine replica can serve them, from the
    Serve controller, read at most once a second (the ingress asks before every request).

    Serve's handle holds a request while no replica runs. That is right while replicas are
    starting (scale from zero, a rolling config change: they will run soon), but not when the
    deployment is UNHEALTHY with none running (a node of a multi-node replica was lost and
    its gang waits for nodes to be placed again): clients then get a prompt retryable refusal
    instead of a wait until their deadline."""

    TTL_S = 1.0

    def __init__(self, deployment: str, gang_size: int) -> None:
        self.deployment = deployment
        self.gang_size = gang_size
        self.checked = 0.0
        self.refuse = False

    def _read(self, app_name: str) -> bool:
        details = serve_details()
        return details is not None and none_can_serve(
            details, app_name, self.deployment, self.gang_size
        )

    async def none_can_serve(self, app_name: str) -> bool:
        now = time.monotonic()
        if now - self.checked > self.TTL_S:
            self.checked = now
            self.refuse = await asyncio.to_thread(self._read, app_name)
        return self.refuse


def serve_replicas(
    app_name: str, deployment: str, gang_size: int = 1
) -> tuple[int | None, int | None]:
    """(running, target) replicas of a deployment, from the Serve controller, in units of
    `gang_size` Serve replicas (one MoEDeployment replica is a gang of DP ranks).

    The controller's instance details are what the dashboard's Serve REST API
    (`GET /api/serve/applications/`) returns; the autoscaler's target is only there.
    (None, None) when the controller cannot be asked.
    """
    details = serve_details()
    if details is None:
        return None, None
    return replica_counts(details, app_name, deployment, gang_size)


def replica_counts(
    details: Mapping[str, Any], app_name: str, deployment: str, gang_size: int = 1
) -> tuple[int | None, int | None]:
    """(running, target) from a ServeInstanceDetails dict (pure). With `gang_size` > 1 whole
    gangs are counted (Serve's replica details name no gang; a gang that lost a rank is torn
    down and restarted whole, RESTART_GANG, so its survivors do not stay RUNNING for long)."""
    app = (details.get("applications") or {}).get(app_name) or {}
    dep = (app.get("deployments") or {}).get(deployment)
    if not dep:
        return None, None
    running = sum(1 for r in dep.get("replicas") or [] if r.get("state") == "RUNNING")
    target = dep.get("target_num_replicas")
    gang = max(gang_size, 1)
    return running // gang, int(target) // gang if target is not None else None

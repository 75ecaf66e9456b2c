"""Reads the live serving state of every ready MoEDeployment on an interval (I/O side of live.py).

One background task per operator run, started by a kopf startup handler: not a kopf timer,
which would put a finalizer on every MoEDeployment. Because kopf does not pause it, each round
first applies kopf's peering rule itself (live.peering_paused) and skips the round while
another operator is in charge. A changed value marks the owner for the usual reconcile, which
patches the status only when it differs: one HTTP read per ready deployment per interval, and
no API write while nothing changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from moe_operator import eplb_advisor, kube, live, settings

log = logging.getLogger("moe_operator.live")

Obj = dict[str, Any]
OwnerKey = tuple[str, str]

#: Reads in flight at once (many deployments, one slow one must not hold up the rest).
CONCURRENCY = 16


@dataclass(frozen=True)
class Peering:
    """kopf's peering, as the operator was started with it (None: standalone)."""

    name: str
    priority: int
    clusterwide: bool


@dataclass(frozen=True)
class Target:
    """A deployment to read: where, and its hourly price per replica for the cost."""

    key: OwnerKey
    url: str
    hourly_cost_per_replica: float
    eplb: eplb_advisor.Settings | None = None  # spec.parallelism.eplb.mode auto


@dataclass
class LivePoller:
    config: settings.OperatorConfig
    api: Callable[[], kube.Client]
    peering: Peering | None
    targets: Callable[[], list[Target]]
    changed: Callable[[OwnerKey], None]
    samples: dict[OwnerKey, live.Sample] = field(default_factory=dict)
    status: dict[OwnerKey, live.LiveStatus] = field(default_factory=dict)
    trackers: dict[OwnerKey, eplb_advisor.Tracker] = field(default_factory=dict)
    session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        """Read every interval until cancelled (a failed round is logged, never fatal)."""
        try:
            while True:
                await asyncio.sleep(self.config.live_state_interval)
                try:
                    await self.round()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("live-state round failed")
        finally:
            if self.session is not None:
                await self.session.close()
                self.session = None

    async def round(self) -> None:
        targets = self.targets()
        wanted = {t.key for t in targets}
        for key in [k for k in self.status if k not in wanted]:
            self._forget(key)  # not ready any more, or deleted
        if not targets or await self.paused({t.key[0] for t in targets}):
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.live_state_timeout)
            )
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(target: Target) -> None:
            async with gate:
                await self._read(target)

        await asyncio.gather(*(one(t) for t in targets))

    async def paused(self, namespaces: set[str]) -> bool:
        """kopf's peering rule on the peering object(s); False when standalone or absent."""
        if self.peering is None:
            return False
        now = datetime.datetime.now(datetime.UTC)
        if self.peering.clusterwide:
            where: list[tuple[kube.Resource, str | None]] = [(CLUSTER_PEERING, None)]
        else:
            where = [(PEERING, ns) for ns in sorted(namespaces)]
        for res, ns in where:
            try:
                obj = await self.api().get(res, ns, self.peering.name)
            except kube.ApiError as err:
                log.warning("cannot read the peering object (%s): skipping this round", err)
                return True  # unsure who is in charge: do nothing
            if obj is not None and live.peering_paused(
                obj.get("status"), self.peering.priority, now
            ):
                return True
        return False

    async def _read(self, target: Target) -> None:
        assert self.session is not None
        try:
            async with self.session.get(target.url) as rsp:
                if rsp.status != 200:
                    raise live.BadState(f"HTTP {rsp.status} from {target.url}")
                sample = live.parse(await rsp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            # Unreachable or not ours: show nothing rather than a stale value.
            log.debug("live state of %s/%s unavailable: %s", *target.key, err)
            self._forget(target.key)
            return
        value = live.summarize(self.samples.get(target.key), sample, target.hourly_cost_per_replica)
        if target.eplb is not None:
            tracker = self.trackers.setdefault(target.key, eplb_advisor.Tracker())
            advice = eplb_advisor.observe(tracker, target.eplb, sample.time, value.expert_imbalance)
            value = dataclasses.replace(value, eplb_advice=advice)
        self.samples[target.key] = sample
        if self.status.get(target.key) != value:
            self.status[target.key] = value
            self.changed(target.key)

    def _forget(self, key: OwnerKey) -> None:
        self.samples.pop(key, None)
        self.trackers.pop(key, None)
        if self.status.pop(key, None) is not None:
            self.changed(key)


PEERING = kube.Resource("kopf.dev", "v1", "kopfpeerings")
CLUSTER_PEERING = kube.Resource("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False)


def peering_of(peering_settings: Any) -> Peering | None:
    """From kopf's `settings.peering` (standalone: None)."""
    if getattr(peering_settings, "standalone", False):
        return None
    return Peering(
        name=str(peering_settings.name),
        priority=int(peering_settings.priority),
        clusterwide=bool(peering_settings.clusterwide),
    )


def url_for(config: settings.OperatorConfig, name: str, namespace: str, http_base: str) -> str:
    """The live-state URL of one deployment (template from settings, else its HTTP Service)."""
    if config.live_state_url:
        return config.live_state_url.format(name=name, namespace=namespace)
    return http_base.rstrip("/") + "/moe/state"


def is_ready(ray_service: Mapping[str, Any] | None) -> bool:
    from moe_operator.status import RayServiceView

    return RayServiceView.read(dict(ray_service) if ray_service else None).ready

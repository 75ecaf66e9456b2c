"""State of one operator run, kept in kopf's memo and shared by every handler.

Holds the API credentials kopf's login handed over, the operator's own client, the kopf indexes
(the in-memory caches of the MoEDeployments and their children), the work queue, the tracer and
the live-state reader. handlers.py makes it (`runtime(memo)`); reconcile.py reads it.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_operator import kube, live_poller, settings, tracing
from moe_operator.children import CHILDREN
from moe_operator.workqueue import OwnerKey, WorkQueue

Obj = dict[str, Any]

#: Id of the kopf index of the MoEDeployments (the children's ids are in children.py).
OWNER_INDEX = "moedeployment_owners"


@dataclass
class Runtime:
    """State of one operator run (kept in kopf's memo, shared by all handlers)."""

    config: settings.OperatorConfig
    queue: WorkQueue
    configuration: kube.Configuration | None = None  # the official client's, from login
    client: kube.Client | None = None
    indexes: Mapping[str, Any] = field(default_factory=dict)
    traces: tracing.Tracing | None = None
    poller: live_poller.LivePoller | None = None
    poller_task: asyncio.Task[None] | None = None

    def tracer(self) -> tracing.Tracer:
        """This run's tracer (tracing.py; a no-op one without an OTLP endpoint)."""
        if self.traces is None:
            self.traces = tracing.setup(self.config)
        return self.traces.tracer

    def api(self) -> kube.Client:
        if self.client is None:
            self.client = kube.Client(
                lambda: self.configuration,
                user_agent=settings.USER_AGENT,
                request_timeout=self.config.request_timeout,
                connect_timeout=self.config.connect_timeout,
                workers=self.config.api_workers,
                tracer=self.tracer(),
            )
        return self.client

    def remember(self, kwargs: Mapping[str, Any]) -> None:
        """Keep the kopf indexes (the same objects for the whole run) for the work queue."""
        ids = (OWNER_INDEX, *(c.index_id for c in CHILDREN))
        found = {k: kwargs[k] for k in ids if k in kwargs}
        if found:
            self.indexes = found
        if self.queue.context is None and "body" in kwargs:
            # An object handler's call: kopf.event() needs the context kopf sets up for those
            # (its event queue, kopf/_core/reactor/processing.py). A pass kicked by the
            # live-state reader (a task started at startup) runs in it, so its Events post too.
            self.queue.context = contextvars.copy_context()

    def cached(self, index_id: str, key: OwnerKey) -> list[Obj]:
        """What the kopf index `index_id` holds for the owner `key`."""
        return lookup(self.indexes.get(index_id), key)


def plain(body: Mapping[str, Any]) -> Obj:
    """A kopf body (or any mapping) as plain JSON-like dicts and lists."""
    out: Obj = json.loads(json.dumps(dict(body), default=dict))
    return out


def lookup(index: Any, key: OwnerKey) -> list[Obj]:
    if index is None or key not in index:
        return []
    return list(index[key])

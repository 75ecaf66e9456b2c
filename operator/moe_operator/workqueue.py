"""A small per-owner work queue: child events mark an owner dirty, one worker drains the marks.

`kick` never blocks (kopf's event handlers call it); each owner has at most one worker task,
which runs the reconcile while the owner is marked, under the owner's lock (the kopf owner
handlers take the same lock). A pass that ends in an API error is retried with exponential
backoff (or the server's Retry-After); a worker sleeping in backoff holds no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from moe_operator import kube

OwnerKey = tuple[str, str]  # (namespace, name)

log = logging.getLogger("moe_operator")

#: Longest backoff between two failed passes, in seconds.
MAX_BACKOFF = 300


class Result(Protocol):
    """What a pass reports to the queue: the API error that stopped it, if any."""

    @property
    def error(self) -> kube.ApiError | None: ...


#: One reconcile pass of an owner; None when the owner is gone (nothing left to do).
Pass = Callable[[OwnerKey], Awaitable[Result | None]]


@dataclass
class WorkQueue:
    """Owners marked for a reconcile, and one worker task per marked owner."""

    run: Pass
    retry_delay: float
    locks: dict[OwnerKey, asyncio.Lock] = field(default_factory=dict)
    dirty: set[OwnerKey] = field(default_factory=set)
    workers: dict[OwnerKey, asyncio.Task[None]] = field(default_factory=dict)
    failures: dict[OwnerKey, int] = field(default_factory=dict)
    #: Where the workers run (Runtime.remember: a kopf object handler's context); None: the
    #: caller's.
    context: contextvars.Context | None = None

    def lock(self, key: OwnerKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def exclusive(self, key: OwnerKey) -> AsyncIterator[None]:
        """Hold the owner's lock, its pending mark consumed (the caller's pass covers it)."""
        async with self.lock(key):
            self.dirty.discard(key)
            yield

    def kick(self, key: OwnerKey) -> None:
        """Mark an owner for reconciliation; one worker per owner drains the marks."""
        self.dirty.add(key)
        worker = self.workers.get(key)
        if worker is None or worker.done():
            self.workers[key] = asyncio.get_running_loop().create_task(
                self._work(key), name=f"moe-reconcile {key[0]}/{key[1]}", context=self.context
            )

    async def _work(self, key: OwnerKey) -> None:
        """Reconcile `key` while it is marked dirty; back off on API errors."""
        try:
            while key in self.dirty:
                async with self.lock(key):
                    if key not in self.dirty:
                        break
                    self.dirty.discard(key)
                    outcome = await self.run(key)
                    if outcome is None:
                        break  # deleted: its children go by garbage collection
                if outcome.error is not None:
                    failures = self.failures.get(key, 0) + 1
                    self.failures[key] = failures
                    err = outcome.error
                    delay = err.retry_after or min(
                        self.retry_delay * 2 ** (failures - 1), MAX_BACKOFF
                    )
                    log.warning(
                        "reconcile of %s/%s failed (%s); retrying in %.0fs", *key, err, delay
                    )
                    self.dirty.add(key)
                    await asyncio.sleep(delay)  # a background worker, not a kopf handler
                else:
                    self.failures.pop(key, None)
        finally:
            if self.workers.get(key) is asyncio.current_task():
                del self.workers[key]

    async def close(self) -> None:
        """Cancel the workers and wait for them to end."""
        for task in list(self.workers.values()):
            task.cancel()
        await asyncio.gather(*self.workers.values(), return_exceptions=True)
        self.workers.clear()

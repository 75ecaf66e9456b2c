"""Bounded admission in front of the engine: at most N requests run, at most M wait, rest refused.

A replica runs up to `max_ongoing` requests in vLLM at once; further requests wait here in FIFO
order, up to `max_queued` of them; beyond that a request is refused at once with `QueueFullError`
(HTTP 503 + Retry-After, gRPC RESOURCE_EXHAUSTED) instead of piling up without bound. A request
cancelled while it waits (client gone) leaves the queue without ever reaching the engine.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class QueueFullError(Exception):
    """The replica's waiting queue is full; the client should retry later."""

    def __init__(self, max_queued: int, retry_after_s: int) -> None:
        super().__init__(
            f"server busy: {max_queued} requests already waiting on this replica; "
            f"retry in about {retry_after_s}s"
        )
        self.retry_after_s = retry_after_s


class AdmissionQueue:
    """FIFO admission with a bound on running and on waiting requests (one event loop)."""

    def __init__(self, max_ongoing: int, max_queued: int, retry_after_s: int = 1) -> None:
        if max_ongoing < 1 or max_queued < 0:
            raise ValueError("max_ongoing must be >= 1 and max_queued >= 0")
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.rejected_total = 0

    @property
    def running(self) -> int:
        """Requests admitted and not yet finished."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the duration of the block (waits, or raises QueueFullError)."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._running < self.max_ongoing and not self._waiters:
            self._running += 1
            return
        if len(self._waiters) >= self.max_queued:
            self.rejected_total += 1
            raise QueueFullError(self.max_queued, self.retry_after_s)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self._release()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        # Hand the slot straight to the next live waiter, so that the count never dips and
        # a newcomer cannot overtake the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1

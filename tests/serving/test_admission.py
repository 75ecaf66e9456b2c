"""The bounded admission queue: N run, M wait in FIFO order, the rest are refused at once."""

from __future__ import annotations

import asyncio

import pytest

from moe_serving.admission import AdmissionQueue, QueueFullError


async def _hold(
    queue: AdmissionQueue, started: list[str], name: str, release: asyncio.Event
) -> None:
    async with queue.slot():
        started.append(name)
        await release.wait()


async def test_runs_n_queues_m_and_refuses_the_rest() -> None:
    queue = AdmissionQueue(max_ongoing=2, max_queued=1, retry_after_s=3)
    release = asyncio.Event()
    started: list[str] = []
    tasks = [asyncio.create_task(_hold(queue, started, n, release)) for n in "abc"]
    await asyncio.sleep(0)
    assert (queue.running, queue.waiting, started) == (2, 1, ["a", "b"])
    with pytest.raises(QueueFullError, match="1 requests already waiting") as info:
        async with queue.slot():
            pass
    assert info.value.retry_after_s == 3 and queue.rejected_total == 1
    release.set()
    await asyncio.gather(*tasks)
    assert started == ["a", "b", "c"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_waiters_are_served_in_arrival_order() -> None:
    queue = AdmissionQueue(max_ongoing=1, max_queued=5)
    gates = {n: asyncio.Event() for n in "abcd"}
    started: list[str] = []
    tasks = [asyncio.create_task(_hold(queue, started, n, gates[n])) for n in "abcd"]
    await asyncio.sleep(0)
    for name in "abcd":
        assert started[-1] == name
        gates[name].set()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert started == list("abcd")


async def test_cancelled_waiter_leaves_the_queue_without_running() -> None:
    queue = AdmissionQueue(max_ongoing=1, max_queued=2)
    release = asyncio.Event()
    started: list[str] = []
    first = asyncio.create_task(_hold(queue, started, "first", release))
    gone = asyncio.create_task(_hold(queue, started, "gone", release))
    last = asyncio.create_task(_hold(queue, started, "last", release))
    await asyncio.sleep(0)
    assert queue.waiting == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert queue.waiting == 1
    release.set()
    await asyncio.gather(first, last)
    assert started == ["first", "last"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_slot_is_released_when_the_holder_fails() -> None:
    queue = AdmissionQueue(max_ongoing=1, max_queued=0)
    with pytest.raises(RuntimeError):
        async with queue.slot():
            raise RuntimeError("boom")
    async with queue.slot():
        assert queue.running == 1
    assert queue.running == 0


def test_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        AdmissionQueue(max_ongoing=0, max_queued=1)

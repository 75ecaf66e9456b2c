"""Waiting with a bound: liveness checks (only a hang fails), not timing assertions.

`wait_until` polls a probe until its value is good and fails the test with the last value
after the bound; `poll_until` is the same wait that does not fail (the caller judges the last
value); `wait_for_items` waits for a list that client threads fill, and `change_under_load`
makes a change while they do; `eventually` is the asyncio twin of `wait_until` for tests whose
event loop must keep running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def poll_until(
    probe: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.2,
    *,
    ok: Callable[[T], object] = bool,
) -> T:
    """Call `probe` every `interval_s` until `ok(value)` holds (by default: the value is truthy)
    or `timeout_s` has passed; return the last value either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if ok(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def wait_until(
    probe: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.2,
    message: str | Callable[[Any], str] = "condition never held",
    *,
    ok: Callable[[T], object] = bool,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Call `probe` every `interval_s` until `ok(value)` holds (by default: the value is truthy)
    and return that value. After `timeout_s`, raise AssertionError with `message` and the last
    value (unless a plain True/False), or with `message(last)` when it is a function.
    Exceptions of the types in `ignore`, raised by `probe` or `ok`, count as a value that is not
    good yet (and are the last value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        last: Any
        try:
            value = probe()
            if ok(value):
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            if callable(message):
                raise AssertionError(message(last))
            raise AssertionError(message if isinstance(last, bool) else f"{message}: {last!r}")
        time.sleep(interval_s)


def wait_for_items(
    items: Sequence[Any], count: int, timeout_s: float, what: str, interval_s: float = 0.2
) -> None:
    """Wait until `items` (a list other threads append to) holds `count` entries; fail with the
    last five after `timeout_s`."""
    wait_until(
        lambda: len(items) >= count,
        timeout_s,
        interval_s,
        lambda _: f"{what}: {len(items)} of {count}, the last {list(items[-5:])}",
    )


def change_under_load(
    outcomes: Sequence[Any], change: Callable[[], object], timeout_s: float = 120
) -> tuple[int, float]:
    """With client threads appending to `outcomes`: wait for 4 outcomes, make the change, wait for
    4 more after it. Returns how many came in during the change and how long it took (s)."""
    wait_for_items(outcomes, 4, timeout_s, "load before the change")
    before, started = len(outcomes), time.monotonic()
    change()
    during, took = len(outcomes) - before, time.monotonic() - started
    wait_for_items(outcomes, len(outcomes) + 4, timeout_s, "load after the change")
    return during, took


async def eventually(
    check: Callable[[], Any], *, timeout: float = 30.0, message: str = "condition"
) -> Any:
    """Poll until `check()` is truthy (a liveness bound, not a timing assertion), yielding to
    the event loop in between; return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}; last value: {last!r}")

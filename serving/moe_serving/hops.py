"""Per-hop timestamps of requests, for `bench/profile_hops.py` (bench/PROFILE.md).

Off unless the environment variable `MOE_HOP_LOG` names a file prefix when the process starts
(Ray workers inherit it from `moectl up`): then each process appends lines
`<time.time_ns()> <hop> <n>` to `<prefix>.<pid>`. Call sites are guarded by `hops.ENABLED`, so
with it off a hop costs one attribute read. Requests are told apart by time: the profiler sends
them one at a time.
"""

from __future__ import annotations

import os
import time
from typing import IO

PREFIX = os.environ.get("MOE_HOP_LOG") or None
ENABLED = PREFIX is not None
_out: list[IO[str]] = []


def mark(hop: str, n: int = 0, at_ns: int | None = None) -> None:
    """Record that this request reached `hop` (its `n`-th time, e.g. chunk n) now or at `at_ns`."""
    if not _out:
        _out.append(open(f"{PREFIX}.{os.getpid()}", "a", buffering=1))  # noqa: SIM115
    _out[0].write(f"{time.time_ns() if at_ns is None else at_ns} {hop} {n}\n")

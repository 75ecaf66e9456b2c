"""Suite-wide guards: no leaked engine processes between modules, and a run that cannot exit
says why instead of stalling CI.

* vLLM's engine core and rank processes are not Ray workers: when Ray stopped a replica without
  letting it shut its engine down (`ray stop --force`), they were re-parented to init and kept
  ~3 GiB each. The moe_die_with_parent vLLM plugin now ends them with their replica (tested in
  tests/reliability); this guard stays as a backstop for anything else vLLM starts: after every
  module, such orphans started during that module are killed, so one module's leftovers never
  squeeze the next one's memory (they did: the raylet then OOM-killed the Serve controller).
* Once pytest has finished, the interpreter still joins non-daemon threads and runs atexit
  handlers; a leak there once kept a finished run alive until CI's time limit. If the process is
  still alive this long after pytest is done, every thread's stack is printed and the run exits
  non-zero.
"""

from __future__ import annotations

import faulthandler
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

EXIT_GRACE_S = 120
ENGINE_TITLE = "VLLM::"


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def orphaned_engine_processes(since: float) -> list[psutil.Process]:
    """Top vLLM processes created after `since` whose replica is gone: re-parented to init (or
    a subreaper), i.e. their parent is neither a Ray worker nor a Python process."""
    found = []
    for proc in psutil.process_iter(["create_time"]):
        if (proc.info["create_time"] or 0) < since or not _title(proc).startswith(ENGINE_TITLE):
            continue
        try:
            parent = proc.parent()
        except psutil.NoSuchProcess:
            continue
        owner = _title(parent) if parent is not None else ""
        if owner.startswith(ENGINE_TITLE) or owner.startswith("ray::") or "python" in owner:
            continue  # a rank of a live engine, or an engine of a live replica / program
        found.append(proc)
    return found


@pytest.fixture(scope="module", autouse=True)
def _no_orphaned_engines() -> Iterator[None]:
    started = time.time() - 1
    yield
    orphans = orphaned_engine_processes(started)
    for proc in orphans:
        # Their children (the ranks) are vLLM processes too and go in the same sweep.
        for child in proc.children(recursive=True):
            child.kill()
        proc.kill()
    psutil.wait_procs(orphans, timeout=10)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True, file=sys.__stderr__)

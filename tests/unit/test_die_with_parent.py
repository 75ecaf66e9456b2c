"""The vLLM plugin that makes vLLM's engine processes die with the replica that started them,
exercised on real processes: a parent spawns a child the way vLLM does inside a Ray actor
(`multiprocessing`, spawn), the parent is SIGKILLed, and the child must go too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from moe_serving import die_with_parent

PARENT = """
import multiprocessing as mp
import os
import sys
import time

from moe_serving import die_with_parent


def child(queue, arm):
    queue.put((die_with_parent.register() if arm else None, os.getpid()))
    time.sleep(300)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ctx.Process(target=child, args=(queue, sys.argv[1] == "arm"), daemon=False).start()
    armed, pid = queue.get(timeout=120)
    print(armed, pid, flush=True)
    time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("arm", [True, False], ids=["plugin", "without-plugin"])
def test_spawned_child_dies_with_its_killed_parent(tmp_path: Path, arm: bool) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), "arm" if arm else "no"], stdout=subprocess.PIPE, text=True
    )
    child: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        armed, pid = parent.stdout.readline().split()
        child = psutil.Process(int(pid))
        assert armed == ("True" if arm else "None")
        parent.kill()  # SIGKILL: no atexit, no multiprocessing cleanup, like `ray stop --force`
        parent.wait(30)
        _, alive = psutil.wait_procs([child], timeout=30 if arm else 3)
        # Without the plugin the child outlives its parent: the leak the plugin exists for.
        assert bool(alive) is not arm, f"child {pid} alive: {bool(alive)}"
    finally:
        parent.kill()
        if child is not None and child.is_running():
            child.kill()


def test_does_nothing_outside_a_multiprocessing_child() -> None:
    # The pytest process (like a Ray worker running a replica) was not started by
    # multiprocessing: its own lifetime must not be tied to its parent's.
    assert die_with_parent.register() is False

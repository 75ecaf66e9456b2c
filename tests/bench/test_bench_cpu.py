"""CPU accounting of a process tree (systems.CpuMeter) on a real tree: a shell forking children
that burn a known amount of CPU, some reaped by the shell, one orphaned and reaped outside."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.systems import CpuMeter, ProcessTree, read_proc_cpu
from tests.support.waiting import wait_until

#: Burns `seconds` of CPU, writes this process's whole CPU time (os.times) to `out`, then
#: sleeps `linger` seconds before exiting (so an orphan is still seen after its work).
BURNER = """
import os, sys, time
seconds, out, linger = float(sys.argv[1]), sys.argv[2], float(sys.argv[3])
end = time.process_time() + seconds
while time.process_time() < end:
    pass
t = os.times()
with open(out + ".tmp", "w") as f:
    f.write(str(t.user + t.system))
os.rename(out + ".tmp", out)
time.sleep(linger)
"""


def test_read_proc_cpu_of_this_process() -> None:
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    me = read_proc_cpu(os.getpid())
    assert me is not None
    assert me.pid == os.getpid() and me.ppid == os.getppid()
    assert me.own_s >= 0.05
    assert me.own_s <= sum(os.times()[:2]) + 0.02
    assert read_proc_cpu(2**22 + 12345) is None  # no such pid


def _wait_for(path: Path, meter: CpuMeter, timeout_s: float = 120.0) -> None:
    def appeared() -> bool:
        if path.exists():
            return True
        meter.sample()  # the tree is sampled while it works
        return False

    wait_until(appeared, timeout_s, 0.05, f"{path} did not appear")


def test_cpu_of_a_shell_and_its_children_reaped_inside_and_outside(tmp_path: Path) -> None:
    """Three children reaped by the shell (their time moves into its cutime), an orphan
    (re-parented outside the tree), and the shell itself, reaped by this test (the harness
    reaps a launched system's root the same way): all of it is counted, once."""
    burner = tmp_path / "burn.py"
    burner.write_text(BURNER)
    py = sys.executable
    script = f"""
        while [ ! -e {tmp_path}/go ]; do sleep 0.05; done
        for i in 1 2 3; do "{py}" {burner} 0.3 {tmp_path}/child$i 0 & done
        wait
        ( "{py}" {burner} 0.3 {tmp_path}/orphan 1.0 & )
        while [ ! -e {tmp_path}/orphan ]; do sleep 0.05; done
        sleep 1.5
        touch {tmp_path}/done
        sleep 0.3
    """
    # Its own session, like a launched system (the tree finds session members that left it).
    shell = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        tree = ProcessTree(psutil.Process(shell.pid))
        meter = CpuMeter(tree.pids)
        time.sleep(0.2)
        start = meter.sample()
        (tmp_path / "go").touch()
        _wait_for(tmp_path / "done", meter)
        before_exit = meter.sample()
        assert shell.wait(timeout=30) == 0  # reaped here, outside the tree
        used = meter.sample() - start
        naive_end = sum(i.total_s for p in tree.pids() if (i := read_proc_cpu(p)) is not None)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, 9)

    children = [float((tmp_path / f"child{i}").read_text()) for i in (1, 2, 3)]
    orphan = float((tmp_path / "orphan").read_text())
    truth = sum(children) + orphan  # what the burners measured themselves
    assert truth >= 1.2
    # The shell's own loops and its `sleep`s add a little; clock ticks are 10 ms.
    assert truth - 0.05 <= used <= truth + 0.5, (used, truth)
    assert used >= before_exit - start  # the shell's exit took nothing away
    # The live processes at the end no longer hold the shell or the children it reaped: the
    # last-seen time carried for a member reaped outside the tree is what keeps them.
    assert naive_end < sum(children) - 0.2, (naive_end, children)


def test_the_meter_is_monotonic_and_ignores_processes_outside_the_tree(tmp_path: Path) -> None:
    outsider = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass",
        ]
    )
    quiet = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        meter = CpuMeter(ProcessTree(psutil.Process(quiet.pid)).pids)
        start = meter.sample()
        samples = []
        while outsider.poll() is None:
            samples.append(meter.sample())
            time.sleep(0.05)
        samples.append(meter.sample())
        assert samples == sorted(samples)
        assert samples[-1] - start < 0.05  # `sleep` used nothing; the busy outsider is not ours
    finally:
        quiet.kill()
        quiet.wait()
        outsider.wait()


def test_a_member_missed_by_one_listing_is_not_counted_twice() -> None:
    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.4\n"
            "while time.process_time() < end: pass\ntime.sleep(30)",
        ]
    )
    try:
        listed = [True]
        meter = CpuMeter(lambda: [busy.pid] if listed[0] else [])
        while (info := read_proc_cpu(busy.pid)) is not None and info.own_s < 0.4:
            time.sleep(0.05)
        first = meter.sample()
        listed[0] = False
        assert meter.sample() == pytest.approx(first)  # vanished: its time is kept
        listed[0] = True
        again = meter.sample()
        assert again == pytest.approx(first, abs=0.05)  # back: counted once, not twice
        assert again == meter.total_s()
    finally:
        busy.kill()
        busy.wait()

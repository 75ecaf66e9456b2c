"""vLLM general plugin: vLLM's engine core and rank processes die with the process that started
them.

A replica starts vLLM's engine core (and the core starts one process per rank) with
`multiprocessing`. When Ray stops the replica's actor abruptly (`ray stop --force`, a node
agent killing workers), nothing tells those processes: they are re-parented to init and keep
their memory (~3 GiB each for the tiny CPU model; a GPU and its memory in a cluster). Linux's
parent-death signal ends them with their parent instead.

vLLM loads general plugins in every process it starts, so this runs in the engine core and in
each rank; in a process that `multiprocessing` did not start (the Ray worker of the replica,
a plain `python` driver) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies. False off Linux or
    if the call failed."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    return True


def register() -> bool:
    """The plugin entry point: True when this process now dies with its parent."""
    parent = multiprocessing.parent_process()
    if parent is None or not set_parent_death_signal():
        return False
    # The parent may have died before the signal was armed: then nobody will send it.
    if os.getppid() != parent.pid:
        os._exit(1)
    return True

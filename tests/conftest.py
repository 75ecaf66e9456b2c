"""Suite-wide guard: a test run that cannot exit says why instead of stalling CI.

Once pytest has finished, the interpreter still joins non-daemon threads and runs atexit
handlers (Ray's shutdown among them); a leak there once kept a finished run alive until CI's
time limit. If the process is still alive this long after pytest is done, every thread's
stack is printed and the run exits non-zero.
"""

from __future__ import annotations

import faulthandler
import sys

import pytest

EXIT_GRACE_S = 120


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True, file=sys.__stderr__)

"""A per-test time limit for pytest without plugins from outside (gpu_check.sh loads it with -p).

``NST_TEST_TIME_LIMIT`` seconds (default 120) per test: SIGALRM fails the test that runs past it
and the run goes on. A hang inside C code (a CUDA call that never returns) cannot be interrupted
this way; gpu_check.sh's ``timeout`` around the whole run and pytest's faulthandler_timeout (a
traceback of the hung test) cover that.
"""

from __future__ import annotations

import os
import signal

import pytest


class TimeLimitExceeded(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = int(float(os.environ.get("NST_TEST_TIME_LIMIT", "120")))

    def expired(signum, frame):
        raise TimeLimitExceeded(f"{item.nodeid} ran past {limit} s (NST_TEST_TIME_LIMIT)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

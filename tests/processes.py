"""Driving a server process the way a supervisor does, shared by the servers' tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def sigterm_until_exit(proc: subprocess.Popen, log: Callable[[], str],
                       timeout: float = 60.0) -> int:
    """An impatient supervisor: SIGTERM every 5 ms until ``proc`` exits; its exit code (the
    process's ``log()`` in the failure when it outlives ``timeout``)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert time.monotonic() < deadline, log()
        time.sleep(0.005)
    return proc.returncode

"""Feedback servers for the tests: in this process on a thread (with a clock the test moves),
or as the real ``python -m feedback serve`` process (what a user runs; killable)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from feedback.config import ServeConfig
from feedback.server import FeedbackServer

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A clock the test sets: ``clock.now += 10``."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class ThreadServer:
    """A FeedbackServer on its own event loop thread, bound to 127.0.0.1:0."""

    def __init__(self, store: str, clock=time.time, **fields):
        self.cfg = ServeConfig(store=store, port=0, metrics_port=0, **fields)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = FeedbackServer(self.cfg, clock)
        self._run(self.server.start())
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ProcessServer:
    """``python -m feedback serve --store STORE --port 0 ...`` in a subprocess."""

    def __init__(self, store: str, workdir: Path, *flags: str):
        self.port_file = workdir / f"port-{time.monotonic_ns()}.json"
        self.log_path = self.port_file.with_suffix(".log")
        cmd = [sys.executable, "-m", "feedback", "serve", "--store", store, "--port", "0",
               "--metrics-port", "0", "--port-file", str(self.port_file), *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log_path.open("w"),
                                     stderr=subprocess.STDOUT, env={**os.environ,
                                                                    "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"feedback server did not start:\n{self.log()}")
            time.sleep(0.05)
        info = json.loads(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{info['port']}"
        self.metrics_url = f"http://127.0.0.1:{info['metrics_port']}/metrics"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

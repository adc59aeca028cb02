"""``feedback-server serve``: the process. Opens the store, serves the API and the page on one
port and ``/metrics`` on another, expires leases and refreshes the store's gauges every
--refresh-seconds, and stops on SIGTERM / SIGINT (requests in flight get --grace-seconds).

Nothing here is lost on a kill: every acknowledged write was committed by the store before its
answer left (tests/feedback/test_crash.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feedback.config import ServeConfig
from feedback.http import FeedbackApi
from feedback.metrics import Metrics
from feedback.store import open_store

log = logging.getLogger("feedback")


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token


def redact(url: str) -> str:
    """A connection string fit for a log line: no password."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", re.sub(r"password=\S+", "password=***", url))


def bind(flag: str, host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"{flag} {port}: cannot bind {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class FeedbackServer:
    def __init__(self, cfg: ServeConfig, clock=time.time):
        self.cfg, self.clock = cfg, clock
        self.port = self.metrics_port = None
        self._runners: list[web.AppRunner] = []
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        cfg = self.cfg
        token = read_token(cfg.auth_token_file)
        self.store = open_store(cfg.store)
        self.metrics = Metrics()
        self.api = FeedbackApi(self.store, cfg, self.metrics, token, self.clock)
        sock = bind("--port", cfg.host, cfg.port)
        self.port = sock.getsockname()[1]
        await self._serve(self.api.app, sock)
        if cfg.metrics_port != -1:
            msock = bind("--metrics-port", cfg.metrics_host or cfg.host, cfg.metrics_port)
            self.metrics_port = msock.getsockname()[1]
            app = web.Application()
            app.router.add_get("/metrics", self._scrape)
            await self._serve(app, msock)
        await self.api.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())
        if cfg.port_file:
            tmp = Path(cfg.port_file + ".tmp")
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port,
                                       "pid": os.getpid()}))
            tmp.replace(cfg.port_file)

    async def _serve(self, app: web.Application, sock: socket.socket) -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.cfg.grace_seconds)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runners.append(runner)

    async def _scrape(self, request: web.Request) -> web.Response:
        with contextlib.suppress(Exception):  # a scrape shows the last gauges if the store fails
            await self.api.refresh()
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_seconds)
            try:
                await self.api.refresh()
            except Exception as e:  # the store is down: say so, keep serving what can be
                log.warning("refresh failed: %s", e)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.api.pool.shutdown(wait=True)
        self.store.close()


def serve(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before the port file says it is up
            loop.add_signal_handler(sig, stopping.set)
        server = FeedbackServer(cfg)
        await server.start()
        metrics = f", metrics on :{server.metrics_port}" if server.metrics_port else ""
        log.info("feedback server on http://%s:%d (store %s%s)", cfg.host, server.port,
                 redact(cfg.store), metrics)
        await stopping.wait()
        log.info("stopping")
        await server.stop()
        # Closing, the loop would put the default, fatal dispositions back: a supervisor's
        # second SIGTERM during the interpreter's teardown would turn this clean exit into a
        # kill (-15). Swapped here, inside the loop, the default stands only between two calls.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    asyncio.run(main())
    return 0

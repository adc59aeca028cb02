"""Start a real ``rm-server serve`` subprocess on loopback and wait until it is SERVING.

Used by the tests, the demo and the benchmarks (ports picked by the server, read back from
``--port-file``). It lives in the serving package, next to the command it starts, so that all
three drive the server the same way; the server itself never imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class ServerProc:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path
    health_port: int | None = None
    http_port: int | None = None  # the HTTP door's, when started with --http-port
    final_log: str | None = None  # the log, kept in memory once stop() removed its directory

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the server (see :func:`stop_process`) and remove its temporary directory; the
        log stays readable through :meth:`log`."""
        code = stop_process(self.proc, sig, timeout)
        if self.final_log is None:
            self.final_log = self.log()
            shutil.rmtree(self.log_path.parent, ignore_errors=True)
        return code


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send ``sig`` (graceful shutdown), wait up to ``timeout`` s, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def health_status(address: str, service: str = "", timeout: float = 1.0):
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def wait_serving(address: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if health_status(address) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout}s")


def start_server(model_dir, *args: str, wait: bool = True, timeout: float = 90.0,
                 env: dict | None = None, cpus: str | None = None) -> ServerProc:
    """``rm-server serve --model DIR --port 0 --metrics-port 0`` plus ``args``; ``cpus`` pins
    it with ``taskset -c`` (e.g. "1")."""
    tmp = Path(tempfile.mkdtemp(prefix="rmserver-"))
    port_file, log_path = tmp / "ports.json", tmp / "server.log"
    cmd = [*(["taskset", "-c", cpus] if cpus else []), sys.executable, "-m", "rm_server.cli",
           "serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "0",
           "--port-file", str(port_file), "--num-threads", "1", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    end = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > end:
            proc.kill()
            raise TimeoutError(f"server did not bind:\n{log_path.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    server = ServerProc(proc, ports["port"], ports["metrics_port"], log_path,
                        ports.get("health_port"), ports.get("http_port"))
    if wait:
        probe = f"127.0.0.1:{server.health_port}" if server.health_port else server.address
        try:
            wait_serving(probe, max(1.0, end - time.monotonic()), proc)
        except Exception:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"server never became SERVING:\n{server.log()}") from None
    return server

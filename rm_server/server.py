"""``rm-server serve``: the gRPC server (grpc.aio), health, reflection, metrics, the HTTP/JSON
door (rm_server/http.py, with --http-port), shutdown.

Lifecycle: bind the ports and answer health NOT_SERVING at once; load the checkpoint and run
a warm-up batch on the load thread; then SERVING. Later versions load through the admin API
(rm_server/admin.py, rm_server/versions.py) while the server keeps SERVING. On SIGTERM/SIGINT:
NOT_SERVING, wait ``drain_delay_seconds`` (endpoints update while traffic still arrives), stop
accepting RPCs, let in-flight calls (gRPC and HTTP) finish within ``grace_seconds``, stop the
batcher, exit 0.

Failing to start is one line on stderr and exit 1, checked before anything binds where it can
be: numbers out of range, a checkpoint that cannot be a reward model (rm_server/checkpoint.py),
a port another process holds (rm_server/ports.py: grpc's default SO_REUSEPORT is turned off).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import reward_pb2 as pb
from protos.service_name import SERVICE_NAME
from rm_server import __version__
from rm_server.admin import ADMIN_SERVICE, AdminServicer, add_admin_service
from rm_server.batcher import Batcher
from rm_server.checkpoint import ModelLoadError, check_source
from rm_server.config import ServeConfig, batch_policy, check_config, model_options
from rm_server.errors import LoadFailed, NoRoom
from rm_server.http import HttpDoor, ssl_context
from rm_server.interceptor import StatusInterceptor
from rm_server.metrics import Metrics, serve_metrics
from rm_server.model_time import ModelTimeEstimate
from rm_server.ports import add_grpc_port, bind_tcp, check_port_free, listed_ports
from rm_server.service import RewardServicer, versions_info
from rm_server.versions import CheckpointLoader, Versions

log = logging.getLogger("rm_server")


def server_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    return [
        # grpc's default SO_REUSEPORT lets a second server share a held port: refuse instead.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Keepalive agreed with the client library (rm_client/client.py): clients ping every
        # 30 s; allow pings every 10 s so no client earns a GOAWAY too_many_pings.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", cfg.min_ping_interval_ms),
        ("grpc.http2.min_time_between_pings_ms", cfg.min_ping_interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Balanced clients re-resolve when connections age out, so new replicas get traffic.
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 60_000),
    ]


def _credentials(cfg: ServeConfig):
    if not cfg.tls_cert:
        return None
    if not cfg.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token


def _add_reward_service(server: grpc.aio.Server, servicer: RewardServicer) -> list[str]:
    """Register with no request deserializer: the servicer parses bytes (DecodeError -> 400).
    Returns the method names."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, response_serializer=pb.ScoreResponse.SerializeToString),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream, response_serializer=pb.ScoreResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return list(handlers)


async def _set_health(health_servicer, status) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


class RewardServer:
    """The assembled server; ``run()`` serves until a stop signal, returns the exit code."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.metrics.queue_capacity.set(cfg.max_queue)
        self.health = health.aio.HealthServicer()
        self.servicer = RewardServicer(None, cfg.max_samples_per_request, self.metrics,
                                       cfg.stream_admission_timeout_ms / 1000)
        self.admin = AdminServicer()
        self._default = None  # the default version's hash, to see it change
        self.stop_event = asyncio.Event()
        self.servers: list[grpc.aio.Server] = []
        self.port = self.metrics_port = self.health_port = self.http_port = None
        self._httpd = None
        self.http: HttpDoor | None = None
        self.serving = False  # what grpc.health.v1 answers, for the HTTP door's /healthz

    async def start(self) -> None:
        cfg = self.cfg
        token = _read_token(cfg.auth_token_file)
        self.admin_token = _read_token(cfg.admin_token_file)
        creds = _credentials(cfg)
        for flag, host, port in listed_ports(cfg):
            check_port_free(flag, host, port)
        try:
            await self._bind(token, creds)
        except BaseException:  # stop what started, or grpc's finalizers print tracebacks
            await self._close()
            raise

    async def _bind(self, token: str | None, creds) -> None:
        cfg = self.cfg
        interceptor = StatusInterceptor(self.metrics, token, self.admin_token)
        server = grpc.aio.server(interceptors=[interceptor], options=server_options(cfg),
                                 maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        self.metrics.init_methods(_add_reward_service(server, self.servicer))
        services = [SERVICE_NAME]
        if self.admin_token:  # no admin token: no admin service at all
            self.metrics.init_methods(add_admin_service(server, self.admin))
            services.append(ADMIN_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            from grpc_reflection.v1alpha import reflection
            reflection.enable_server_reflection(
                (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
        self.servers.append(server)
        self.port = add_grpc_port(server, "--port", f"{cfg.host}:{cfg.port}", creds)
        if cfg.health_port is not None:  # plaintext, health only: Kubernetes probes speak no TLS
            hs = grpc.aio.server(options=server_options(cfg))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            self.servers.append(hs)
            self.health_port = add_grpc_port(hs, "--health-port", f"{cfg.host}:{cfg.health_port}")
        if cfg.metrics_port is not None and cfg.metrics_port >= 0:
            host = cfg.metrics_host or cfg.host
            try:
                self._httpd = serve_metrics(self.metrics.registry, host, cfg.metrics_port)
            except OSError as e:
                raise OSError(f"--metrics-port {cfg.metrics_port}: cannot bind "
                              f"{host}:{cfg.metrics_port} ({e.strerror or e})") from None
            self.metrics_port = self._httpd.server_port
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        for s in self.servers:
            await s.start()
        if cfg.http_port is not None:
            await self._start_http(token)
        log.info("listening on %s:%s (metrics %s, http %s)", cfg.host, self.port,
                 self.metrics_port, self.http_port)
        if cfg.port_file:
            tmp = Path(cfg.port_file + ".tmp")  # atomic: readers never see half a file
            tmp.write_text(json.dumps(
                {"port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid(),
                 "health_port": self.health_port, "http_port": self.http_port}))
            os.replace(tmp, cfg.port_file)

    async def _start_http(self, token: str | None) -> None:
        """The HTTP/JSON door (rm_server/http.py) on the same loop, servicer and metrics."""
        cfg = self.cfg
        tls = ssl_context(cfg)
        sock = bind_tcp("--http-port", cfg.http_host or cfg.host, cfg.http_port)
        self.http_port = sock.getsockname()[1]
        admin = self.admin if self.admin_token else None
        self.http = HttpDoor(self.servicer, self.metrics, cfg, token, lambda: self.serving,
                             admin, self.admin_token)
        self.metrics.init_methods(self.http.methods)
        await self.http.start(sock, tls)

    async def load(self) -> None:
        """Load and warm up the first version on the load thread: health keeps answering."""
        cfg = self.cfg
        if cfg.num_threads:
            import torch
            torch.set_num_threads(cfg.num_threads)
        versions = Versions(CheckpointLoader(model_options(cfg)), cfg.max_versions,
                            self.metrics, self._version_changed)
        policy = batch_policy(cfg, cfg.device.split(":")[0])
        batcher = Batcher(versions.run_batch, policy, cfg.max_queue, self.metrics,
                          rebind=versions.rebind)
        batcher.start()
        self.servicer.batcher, self.servicer.versions = batcher, versions
        try:
            await versions.load(cfg.model, cfg.version_label or "", True, cfg.revision)
        except (LoadFailed, NoRoom) as e:  # the start's one line, as before any version
            raise ModelLoadError(e.message.removeprefix(f"load {cfg.model}: ")) from None
        self.admin.versions = versions
        model = versions.default.model
        self.metrics.ready.set(1)
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        mode = f" ({model.forward_mode})" if model.forward_mode not in (None, "batch") else ""
        log.info("serving %s (%s, %s, %s path%s%s, version %s)", model.name, model.architecture,
                 cfg.dtype, model.scoring_path, mode, ", compiled" if model.compiled else "",
                 versions.default.describe())

    def _version_changed(self) -> None:
        """After a load, a default change or an unload: what the servicer, the HTTP door and
        rm_build_info report follows the default."""
        versions = self.servicer.versions
        default = versions.default
        if default is None:
            return
        self.servicer.model = default.model
        self.servicer.info = versions_info(default, versions, self.cfg.max_samples_per_request,
                                           __version__)
        if default.hash != self._default:
            self._default = default.hash
            self.metrics.build_info.clear()
            self.metrics.build_info.labels(__version__, default.model.name).set(1)
            # model time differs between versions: measure the new default afresh
            self.servicer.batcher.model_time = ModelTimeEstimate()

    async def shutdown(self) -> None:
        cfg = self.cfg
        log.info("draining: NOT_SERVING, grace %.1fs", cfg.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.serving = False
        self.metrics.ready.set(0)
        if cfg.drain_delay_seconds > 0:
            await asyncio.sleep(cfg.drain_delay_seconds)
        await asyncio.gather(*(s.stop(cfg.grace_seconds) for s in self.servers),
                             self._stop_http())
        if self.servicer.batcher:
            await self.servicer.batcher.stop()
        if self.servicer.versions:
            self.servicer.versions.close()
        self.servicer.close()
        await self._close()
        log.info("stopped")

    async def _close(self, grace: float | None = 0) -> None:
        """Stop the gRPC servers now (a no-op on stopped ones), the HTTP door and the metrics
        server."""
        await asyncio.gather(*(s.stop(grace) for s in self.servers), self._stop_http())
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    async def _stop_http(self) -> None:
        """Stop accepting HTTP; requests in flight get --grace-seconds (a no-op once stopped)."""
        if self.http is not None:
            await self.http.stop()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.start()
        loader = asyncio.ensure_future(self.load())
        stopper = asyncio.ensure_future(self.stop_event.wait())
        await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done() and loader.exception() is not None:
            stopper.cancel()
            await self._close()
            raise loader.exception()
        await stopper
        loader.cancel()
        await self.shutdown()
        ignore_late_stop_signals(loop)
        return 0


def ignore_late_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """After the shutdown, a SIGTERM or SIGINT more (a supervisor asking again) changes nothing.
    Left to asyncio, closing the loop puts their default, fatal dispositions back, and the
    interpreter's teardown (model, gRPC and executor threads) takes a while: a signal there
    turned a clean exit 0 into a kill (-15). Swapped here, inside the loop, the fatal default
    stands only between two calls."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def serve(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        check_config(cfg)
        # before binding: a bad --model (or an unreachable hub) is the one line on stderr
        check_source(cfg.model, cfg.revision, cfg.tokenizer, cfg.trust_remote_code)
        return asyncio.run(RewardServer(cfg).run())
    except (ModelLoadError, OSError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library wrote
        print(f"rm-server serve: error: {message}", file=sys.stderr)
        return 1

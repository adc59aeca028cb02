"""``rm-server serve``: the gRPC server (grpc.aio), health, reflection, metrics, shutdown.

Lifecycle: bind the ports and answer health NOT_SERVING at once; load the checkpoint and run
a warm-up batch on the model thread; then SERVING. On SIGTERM/SIGINT: NOT_SERVING, wait
``drain_delay_seconds`` (endpoints update while traffic still arrives), stop accepting RPCs,
let in-flight calls finish within ``grace_seconds``, stop the batcher, exit 0.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import reward_pb2 as pb
from rm_server import __version__
from rm_server.batcher import Batcher, BatchPolicy
from rm_server.checkpoint import ModelLoadError, check_checkpoint
from rm_server.interceptor import StatusInterceptor
from rm_server.metrics import Metrics, serve_metrics
from rm_server.ports import add_grpc_port, check_port_free, check_ports, listed_ports
from rm_server.service import SERVICE_NAME, RewardServicer, model_info

log = logging.getLogger("rm_server")


@dataclass
class ServeConfig:
    model: str
    """Reward-model checkpoint directory (any HF *ForSequenceClassification with num_labels=1)."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 unless told otherwise (use 0.0.0.0 in a container)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (see --port-file)."""
    metrics_port: int | None = 50053
    """Prometheus /metrics port; 0 picks a free one; --metrics-port -1 disables it. Not 9090:
    that is Prometheus's own port (9091-9094: pushgateway, alertmanager), and the exporter
    range 9100-9999 is fully allocated in Prometheus's default port allocations (node exporter
    9100, NVIDIA DCGM 9400 on GPU nodes, ...). 50053 sits next to the server's other ports
    (gRPC 50051, health 50052 in the image)."""
    metrics_host: str | None = None
    """Address for /metrics (default: same as --host)."""
    port_file: str | None = None
    """Write {"port", "metrics_port", "pid"} as JSON here once bound (for tests and scripts)."""
    model_name: str | None = None
    """Name reported by GetModelInfo and rm_build_info (default: the directory's name)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N."""
    num_threads: int | None = None
    """torch.set_num_threads for the model thread (default: torch's choice)."""
    max_length: int | None = None
    """Longest input in tokens (default: the model's position limit / tokenizer max)."""
    truncation: Literal["left", "error"] = "left"
    """Over-long inputs: left = drop tokens from the start, keep the scored end (truncated=true); error = INVALID_ARGUMENT."""
    prefix_sharing: bool = True
    """Samples of a batch that share a token prefix (k responses to one prompt) run the prefix once (decoder RMs)."""
    compile: bool = False
    """torch.compile the model (inductor, dynamic shapes): a 7M RM served 1.1-1.15x faster on CPU (bench/RESULTS.md). Needs a C++ compiler (CPU) or Triton (CUDA); compiles before SERVING (about a minute for a small model on one core, seconds on a restart: inductor's on-disk cache)."""
    max_batch_size: int | None = None
    """A batch closes at this many samples (default: 32 on CUDA, 16 on CPU)."""
    max_batch_tokens: int | None = None
    """A batch closes at this padded cost, longest length x samples (default: 8192 on CUDA, 1024
    on CPU, where larger batches gain nothing and pad more: bench/RESULTS.md)."""
    max_wait_ms: float = 5.0
    """A batch closes when its oldest sample has waited this long (model idle); not waited at
    all while calls arrive further apart than this on average (no company to wait for)."""
    max_queue: int = 4096
    """Queued samples at most; a request that does not fit is refused with UNAVAILABLE."""
    max_samples_per_request: int = 1024
    """Samples one ScoreRequest may carry."""
    stream_admission_timeout_ms: float = 10_000
    """On a stream, how long a request waits for room in a full queue (backpressure) before the stream ends UNAVAILABLE; unary calls are refused at once."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message received or sent (RESOURCE_EXHAUSTED above it)."""
    max_concurrent_rpcs: int | None = 1024
    """RPCs handled at once; grpc answers RESOURCE_EXHAUSTED above it."""
    reflection: bool = True
    """Serve gRPC server reflection (--no-reflection to turn it off)."""
    grace_seconds: float = 30.0
    """On shutdown, how long in-flight calls may take to finish."""
    drain_delay_seconds: float = 0.0
    """On shutdown, how long to keep serving after NOT_SERVING before refusing new calls."""
    auth_token_file: str | None = None
    """File holding a bearer token; when set, RewardService calls need 'authorization: Bearer <token>' (health is exempt)."""
    tls_cert: str | None = None
    """PEM server certificate chain: serve TLS on the main port."""
    tls_key: str | None = None
    """PEM private key of --tls-cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle: require client certificates signed by it (mTLS)."""
    health_port: int | None = None
    """Extra plaintext port serving only grpc.health.v1 (for Kubernetes probes when TLS is on)."""
    min_ping_interval_ms: int = 10_000
    """Shortest client keepalive ping interval accepted (faster pings earn GOAWAY too_many_pings); the client library pings every 30 s."""
    log_level: str = "info"
    """Logging level: debug, info, warning, error."""


def server_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    return [
        # grpc's default SO_REUSEPORT lets a second server share a held port: refuse instead.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Keepalive agreed with the client library (rm_server/client.py): clients ping every
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


# device type -> (max_batch_size, max_batch_tokens) when not given. On 2 CPU cores a 30M Llama
# peaks at batch 8-16 (64 tokens) and the padding of larger length-grouped batches costs more
# than they gain (bench/RESULTS.md "Serving"); a GPU wants big batches.
BATCH_DEFAULTS = {"cuda": (32, 8192), "cpu": (16, 1024)}


def batch_policy(cfg: ServeConfig, device_type: str) -> BatchPolicy:
    size, tokens = BATCH_DEFAULTS.get(device_type, BATCH_DEFAULTS["cuda"])
    return BatchPolicy(cfg.max_batch_size or size, cfg.max_batch_tokens or tokens,
                       cfg.max_wait_ms / 1000)


def check_config(cfg: ServeConfig) -> None:
    """Reject nonsensical numbers before anything loads (one line, exit 1)."""
    for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if cfg.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0 (got {cfg.max_wait_ms})")
    check_ports(cfg)


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
        self.stop_event = asyncio.Event()
        self.servers: list[grpc.aio.Server] = []
        self.port = self.metrics_port = self.health_port = None
        self._httpd = None

    async def start(self) -> None:
        cfg = self.cfg
        token = _read_token(cfg.auth_token_file)
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
        server = grpc.aio.server(interceptors=[StatusInterceptor(self.metrics, token)],
                                 options=server_options(cfg),
                                 maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        self.metrics.init_methods(_add_reward_service(server, self.servicer))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            from grpc_reflection.v1alpha import reflection
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
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
        log.info("listening on %s:%s (metrics %s)", cfg.host, self.port, self.metrics_port)
        if cfg.port_file:
            tmp = Path(cfg.port_file + ".tmp")  # atomic: readers never see half a file
            tmp.write_text(json.dumps(
                {"port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid(),
                 "health_port": self.health_port}))
            os.replace(tmp, cfg.port_file)

    async def load(self) -> None:
        """Load and warm up on a worker thread: health keeps answering meanwhile."""
        from rm_server.model import RewardModel

        cfg = self.cfg
        if cfg.num_threads:
            import torch
            torch.set_num_threads(cfg.num_threads)
        model = await asyncio.to_thread(RewardModel, cfg.model, cfg.dtype, cfg.device,
                                        cfg.max_length, cfg.truncation, cfg.model_name,
                                        prefix_sharing=cfg.prefix_sharing, compile=cfg.compile)
        await asyncio.to_thread(model.warmup)
        policy = batch_policy(cfg, model.device.type)
        batcher = Batcher(model.score, policy, cfg.max_queue, self.metrics)
        batcher.start()
        self.servicer.batcher = batcher
        self.servicer.info = model_info(model, cfg.max_samples_per_request, __version__)
        self.servicer.model = model
        self.metrics.build_info.labels(__version__, model.name).set(1)
        self.metrics.ready.set(1)
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        mode = f" ({model.forward_mode})" if model.forward_mode not in (None, "batch") else ""
        log.info("serving %s (%s, %s, %s path%s%s, version %s)", model.name, model.architecture,
                 cfg.dtype, model.scoring_path, mode, ", compiled" if model.compiled else "",
                 model.version)

    async def shutdown(self) -> None:
        cfg = self.cfg
        log.info("draining: NOT_SERVING, grace %.1fs", cfg.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        if cfg.drain_delay_seconds > 0:
            await asyncio.sleep(cfg.drain_delay_seconds)
        await asyncio.gather(*(s.stop(cfg.grace_seconds) for s in self.servers))
        if self.servicer.batcher:
            await self.servicer.batcher.stop()
        self.servicer.close()
        await self._close()
        log.info("stopped")

    async def _close(self, grace: float | None = 0) -> None:
        """Stop the gRPC servers now (a no-op on stopped ones) and the metrics server."""
        await asyncio.gather(*(s.stop(grace) for s in self.servers))
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

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
        return 0


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
        check_checkpoint(cfg.model)  # before binding: a bad --model is the one line on stderr
        return asyncio.run(RewardServer(cfg).run())
    except (ModelLoadError, OSError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library wrote
        print(f"rm-server serve: error: {message}", file=sys.stderr)
        return 1

"""Prometheus metrics of the reward server (prefix ``rm_``).

Histograms in base units (seconds, samples, tokens), counters ending in ``_total``, bounded
labels only (method names, status codes, a fixed set of rejection reasons). Each server owns a
registry, so tests can run several servers in one process; it carries the standard process and
Python collectors (``process_*``, ``python_*``) as every prometheus-client exporter does.

Model versions (rm_server/versions.py): ``rm_version_info{version,label,default}`` is 1 for each
resident version (the weights hash as ``version``), ``rm_version_samples_total{version}`` counts
the samples each scored; both carry resident versions only (an unloaded version's series are
removed), so their labels stay bounded by ``--max-versions``. Loads, unloads, default changes
and the load duration are counted without a version label.

Requests of the HTTP door (rm_server/http.py) are counted as RPCs are, with the route as the
method label (``/get_reward``, ``/pooling``, ...): a fixed set, like the RPC names.

Labelled series known at start (rejections per reason; requests with code OK and latency per
method, :meth:`Metrics.init_methods`) exist from the first scrape at zero: ``rate()`` cannot see
the first burst of a series that appears with a non-zero value, so a burst shorter than the
scrape interval would never show, and ``histogram_quantile`` over an absent histogram is NaN.

:func:`serve_metrics` serves ``/metrics`` and answers 404 elsewhere (prometheus-client's own
server answers the metrics on any path).
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
RATIO_BUCKETS = (.05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0)
LOAD_BUCKETS = (.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("rm_requests", "RPCs finished, by method and status code",
                                ["method", "code"], registry=r)
        self.samples = Counter("rm_samples", "Samples scored by the model", registry=r)
        self.tokens = Counter("rm_tokens", "Tokens scored by the model (unpadded)", registry=r)
        self.truncated = Counter("rm_truncated_samples", "Samples cut by the truncation policy",
                                 registry=r)
        self.request_duration = Histogram("rm_request_duration_seconds",
                                          "RPC duration, by method", ["method"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("rm_queue_wait_seconds",
                                    "Time a sample waited in the queue before its batch ran",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("rm_inference_duration_seconds",
                                   "Model time per batch", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rm_batch_size", "Samples per batch", buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("rm_batch_tokens", "Padded tokens per batch (max_len x n)",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.shared_prefix_tokens = Counter("rm_shared_prefix_tokens", "Tokens not recomputed "
                                            "because samples of a batch shared a prefix",
                                            registry=r)
        self.padding_ratio = Histogram("rm_padding_ratio", "Fraction of a batch that is padding",
                                       buckets=RATIO_BUCKETS, registry=r)
        self.queue_depth = Gauge("rm_queue_depth", "Samples waiting in the queue", registry=r)
        self.queue_capacity = Gauge("rm_queue_capacity", "Samples the queue holds at most "
                                    "(--max-queue); past it requests are refused with UNAVAILABLE",
                                    registry=r)
        self.inflight = Gauge("rm_inflight_requests", "RPCs being handled", registry=r)
        self.rejected = Counter("rm_rejected", "Refused or dropped before the model, by reason "
                                "(queue_full, deadline, cancelled: samples; others: requests; "
                                "too_large, concurrency: HTTP door requests)",
                                ["reason"], registry=r)
        self.internal_errors = Counter("rm_internal_errors", "Unexpected exceptions (INTERNAL)",
                                       registry=r)
        self.ready = Gauge("rm_model_ready", "1 when the model is loaded and warmed up", registry=r)
        self.build_info = Gauge("rm_build_info", "Server version and served model",
                                ["version", "model"], registry=r)
        self.version_info = Gauge("rm_version_info", "1 for each resident model version "
                                  "(version: weights hash; label: the operator's; default: 1 "
                                  "for the default)", ["version", "label", "default"], registry=r)
        self.version_samples = Counter("rm_version_samples", "Samples scored, by model version "
                                       "(resident versions only)", ["version"], registry=r)
        self.version_loads = Counter("rm_version_loads", "Model version loads, by result (ok, "
                                     "failed)", ["result"], registry=r)
        self.version_unloads = Counter("rm_version_unloads", "Model versions unloaded (by an "
                                       "admin call, or to keep --max-versions)", registry=r)
        self.version_load_seconds = Histogram("rm_version_load_duration_seconds",
                                              "Load and warm-up time of a model version",
                                              buckets=LOAD_BUCKETS, registry=r)
        self.default_changes = Counter("rm_version_default_changes", "Times the default "
                                       "version changed (roll-forwards, rollbacks)", registry=r)
        for result in ("ok", "failed"):
            self.version_loads.labels(result)
        for reason in ("invalid", "queue_full", "not_ready", "deadline", "cancelled",
                       "unauthenticated", "internal", "too_large", "concurrency", "version",
                       "load_failed"):
            self.rejected.labels(reason)  # expose zeros so rate() works from the start
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def init_methods(self, methods: list[str]) -> None:
        """Zero series for each RPC method: requests with code OK, and its latency histogram."""
        for method in methods:
            self.requests.labels(method, "OK")
            self.request_duration.labels(method)

    def observe_batch(self, lengths: list[int], seconds: float, shared: int = 0) -> None:
        """A batch that ran: its samples' lengths, its model time, and the tokens it did not
        recompute thanks to shared prefixes."""
        n, longest = len(lengths), max(lengths)
        self.shared_prefix_tokens.inc(shared)
        padded = n * longest
        self.samples.inc(n)
        self.tokens.inc(sum(lengths))
        self.batch_size.observe(n)
        self.batch_tokens.observe(padded)
        self.padding_ratio.observe(1.0 - sum(lengths) / padded)
        self.inference.observe(seconds)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds up the process's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - a log line per scrape is noise
        pass


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``GET /metrics`` on ``host:port`` from a daemon thread; 404 on any other path.

    Raises OSError if the port cannot be bound. Stop with ``shutdown()`` and ``server_close()``;
    the bound port is ``server_port``.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"404 not found: the metrics are at /metrics\n"]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
    httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd

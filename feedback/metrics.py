"""Prometheus metrics of the feedback service (prefix ``feedback_``), served on their own port.

Counters (this process, since it started): requests by route and status code, pairs offered
by outcome (queued / duplicate / refused), leases handed out, judgments by labeler and choice,
lease expiries. Gauges read from the store (every --refresh-seconds and at each scrape, so
they are the database's truth whichever replica wrote): queue depth, open leases, done pairs,
agreement between labelers on doubly-labeled pairs (ratio and pairs compared).

Labels stay bounded: routes and codes are fixed sets; labeler names are checked at the door
(feedback/pairs.py) and the first ``MAX_LABELERS`` seen get their own series, later ones are
counted as "other". Known label combinations start at zero (a series born non-zero hides its
first burst from ``rate()``).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from feedback.pairs import CHOICES
from feedback.store import Stats

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
MAX_LABELERS = 100
PAIR_RESULTS = ("queued", "duplicate", "refused")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self.requests = Counter("feedback_requests", "API requests by route and status code",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("feedback_request_duration_seconds",
                                          "API request duration by route", ["method"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.pairs = Counter("feedback_pairs", "Pairs offered for labeling, by outcome",
                             ["result"], registry=r)
        self.leases = Counter("feedback_leases", "Leases handed to labelers", registry=r)
        self.judgments = Counter("feedback_judgments", "Judgments recorded, by labeler and choice",
                                 ["labeler", "choice"], registry=r)
        self.lease_expiries = Counter("feedback_lease_expiries",
                                      "Leases that expired unanswered (their pair requeued)",
                                      registry=r)
        self.queue_depth = Gauge("feedback_queue_depth", "Pairs that still want a label",
                                 registry=r)
        self.leases_open = Gauge("feedback_leases_open", "Leases not yet answered or expired",
                                 registry=r)
        self.pairs_done = Gauge("feedback_pairs_done", "Pairs with all their labels", registry=r)
        self.agreement_ratio = Gauge("feedback_agreement_ratio",
                                     "Share of doubly-labeled pairs whose two labelers agree "
                                     "(NaN before any)", registry=r)
        self.agreement_pairs = Gauge("feedback_agreement_pairs",
                                     "Doubly-labeled pairs compared (two non-skip answers)",
                                     registry=r)
        self.agreement_ratio.set(float("nan"))
        for result in PAIR_RESULTS:
            self.pairs.labels(result)
        self._labelers: set[str] = set()

    def init_methods(self, methods: list[str]) -> None:
        for method in methods:
            self.requests.labels(method, "OK")
            self.request_duration.labels(method)

    def labeler(self, name: str) -> str:
        """The label value for a labeler: its name, or "other" past MAX_LABELERS names."""
        if name not in self._labelers:
            if len(self._labelers) >= MAX_LABELERS:
                return "other"
            self._labelers.add(name)
            for choice in CHOICES:
                self.judgments.labels(name, choice)
        return name

    def observe(self, stats: Stats) -> None:
        self.queue_depth.set(stats.queue_depth)
        self.leases_open.set(stats.leased)
        self.pairs_done.set(stats.done)
        ratio = stats.agreement.ratio
        self.agreement_ratio.set(float("nan") if ratio is None else ratio)
        self.agreement_pairs.set(stats.agreement.pairs)

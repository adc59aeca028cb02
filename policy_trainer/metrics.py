"""The PPO trainer's Prometheus metrics (prefix ``ppo_``) and the step-time split they report.

Every PPO step produces one flat record (``ppo_loop``), written to the run's logs
(``runlog.StepLog``: JSONL and TensorBoard). ``PPOMetrics`` exposes the latest values as
gauges and the step-time split, RM latency, retries and failed samples as histograms and
counters on an optional ``--metrics-port``: histograms in base units (seconds), counters end
in ``_total``, label values bounded (the four phases). Only rank 0 serves them.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("generate", "score", "reference", "train")
SECONDS_BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# record key -> (gauge name, help)
GAUGES = {
    "step": ("ppo_step", "PPO steps completed"),
    "score": ("ppo_score_mean", "Mean RM score of the step's scored rollouts (before penalties)"),
    "kl": ("ppo_kl", "Mean per-sequence KL(pi || pi_ref) with the penalty's estimator (nats)"),
    "kl_coef": ("ppo_kl_coef", "KL coefficient beta used this step"),
    "approx_kl": ("ppo_approx_kl", "Mean approx KL(pi_old || pi) over the PPO epochs"),
    "clipfrac": ("ppo_clipfrac", "Fraction of tokens where the policy ratio was clipped"),
    "entropy": ("ppo_entropy", "Mean per-token policy entropy (nats)"),
    "explained_variance": ("ppo_explained_variance", "1 - Var[R - V] / Var[R] of the critic"),
    "response_length": ("ppo_response_length_tokens", "Mean response length in tokens"),
    "member_std": ("ppo_reward_member_std", "An ensemble RM: mean over the step's rollouts of the "
                   "std of its members' scores (their disagreement)"),
    "member_mean": ("ppo_reward_member_mean", "An ensemble RM: mean of its members' scores"),
    "lr": ("ppo_learning_rate", "Policy learning rate this step"),
}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class PPOMetrics:
    """Prometheus metrics of one trainer; its own registry (tests run several in a process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.gauges = {k: Gauge(name, doc, registry=r) for k, (name, doc) in GAUGES.items()}
        self.phase = Histogram("ppo_step_phase_seconds",
                               "Time per PPO step in each phase (generate, score = waiting on "
                               "the RM, reference = no-grad forwards, train)", ["phase"],
                               buckets=SECONDS_BUCKETS, registry=r)
        self.step_seconds = Histogram("ppo_step_seconds", "Wall time of a PPO step",
                                      buckets=SECONDS_BUCKETS, registry=r)
        self.rm_latency = Histogram("ppo_rm_latency_seconds",
                                    "RM round trip of one generation chunk (submit to last score)",
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.rollouts = Counter("ppo_rollouts", "Rollouts generated", registry=r)
        self.scored = Counter("ppo_scored_samples", "Rollouts scored by the RM", registry=r)
        self.failed = Counter("ppo_failed_samples",
                              "Rollouts the RM finally failed to score: masked out of the update",
                              registry=r)
        self.retries = Counter("ppo_rm_retries", "RM calls / streams retried after a transient "
                               "failure", registry=r)
        for p in PHASES:
            self.phase.labels(p)  # expose zeros from the start
        self._httpd = None

    def serve(self, port: int, host: str) -> int:
        """Start /metrics on ``host:port`` (0 picks a free port); returns the bound port."""
        from prometheus_client import start_http_server
        self._httpd, _ = start_http_server(port, host, registry=self.registry)
        return self._httpd.server_port

    def observe(self, record: dict, latencies: list[float], new_retries: int) -> None:
        for key, gauge in self.gauges.items():
            if _finite(record.get(key)):
                gauge.set(record[key])
        for p in PHASES:
            self.phase.labels(p).observe(record[f"time/{p}"])
        self.step_seconds.observe(record["time/step"])
        for s in latencies:
            self.rm_latency.observe(s)
        self.rollouts.inc(record["rollouts"])
        self.scored.inc(record["scored"])
        self.failed.inc(record["failed_samples"])
        self.retries.inc(max(0, new_retries))

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


class PhaseTimer:
    """Seconds per phase of a step; syncs CUDA so a phase is charged for its own kernels."""

    def __init__(self, device: torch.device):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.sync()  # CPU-GPU sync: the phase's kernels finish inside its timing
        self.seconds[phase] += time.perf_counter() - t0

"""The RM round trip: rollouts out on ScoreStreams while the trainer keeps working.

An asyncio event loop on a background thread runs ``AsyncRewardClient``. ``submit(samples)``
hands a generation chunk to it and returns at once: the chunk goes out on its own
``ScoreStream`` (several addresses are balanced round-robin, one call per chunk), so the server
scores chunk k while the trainer generates chunk k+1 and computes reference log-probs.
``collect()`` blocks until every submitted chunk is answered or has finally failed.

Failure handling is the client library's (every attempt has a deadline, and every call a total
one, ``chunk_timeout``, that bounds a hung RM; transient codes retry with backoff, one warning
per retry round on the trainer's log; a broken stream resubmits exactly the ids not answered
yet). What still fails comes back here as ``ScoringError``: those ids are returned as *failed*,
for the loop to mask out of the update and count. They are never given a made-up reward.

Input form: at start the trainer compares its tokenizer's fingerprint with the server's
``ModelInfo.tokenizer_fingerprint``. Equal: token ids go on the wire as generated (no decode /
re-encode round trip, which is not always the identity). Different: text pairs (or chat
messages with ``chat``), tokenized by the server, so an RM with another tokenizer still works.

RM versions: each result names the version that scored it. ``version`` (``--rm-version``) pins
every call of the run to one (its model info included); :class:`RMVersionLog` counts the
versions behind each step's rewards and reports a change of version as an event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc

from protos import reward_pb2 as pb
from protos.encoding import tokenizer_fingerprint
from rm_client import (
    AsyncRewardClient,
    ScoreResult,
    ScoringError,
    chat_sample,
    text_sample,
    token_sample,
)

log = logging.getLogger("policy_trainer.scoring")

INPUT_MODES = ("auto", "tokens", "text", "chat")


class RMError(Exception):
    """The RM cannot be used: unreachable at start, an incompatible input form, or too many
    samples failing. The CLI reports it in one line and exits 1."""


def choose_input_mode(requested: str, info: pb.ModelInfo, tokenizer) -> str:
    """"tokens" when the fingerprints agree (and "auto"), else "text"; explicit modes checked."""
    same = info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    if requested == "auto":
        return "tokens" if same else "text"
    if requested == "tokens" and not same:
        raise RMError(
            f"--rm-input tokens, but the server's tokenizer (fingerprint "
            f"{info.tokenizer_fingerprint}) differs from the policy's "
            f"({tokenizer_fingerprint(tokenizer)}): use --rm-input auto or text")
    if requested == "chat" and not info.has_chat_template:
        raise RMError("--rm-input chat, but the server's tokenizer has no chat template")
    return requested


def make_sample(mode: str, sample_id: str, prompt_ids: list[int], response_ids: list[int],
                prompt_text: str, tokenizer) -> pb.Sample:
    """One RM input. ``response_ids`` exclude a final EOS: the RM was trained on prompt +
    response text without one (protos.encoding), and a stop token that is not EOS stays."""
    if mode == "tokens":
        return token_sample(sample_id, prompt_ids + response_ids, len(prompt_ids))
    response = tokenizer.decode(response_ids, skip_special_tokens=False)
    if mode == "chat":
        return chat_sample(sample_id, [("user", prompt_text), ("assistant", response)])
    return text_sample(sample_id, prompt_text, response)


@dataclass
class ChunkOutcome:
    results: dict[str, ScoreResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason
    seconds: float = 0.0  # submit to last answer: the RM round trip of the chunk


@dataclass
class Collected:
    results: dict[str, ScoreResult]
    failed: dict[str, str]
    latencies: list[float]  # per chunk
    ids: list[str] = field(default_factory=list)  # the rollouts' sample ids, in rollout order

    def versions(self) -> list[str | None]:
        """The RM version behind each rollout's reward, in rollout order (None: failed)."""
        return [r.version if (r := self.results.get(i)) else None for i in self.ids]

    def merge(self, other: Collected) -> None:
        self.results.update(other.results)
        self.failed.update(other.failed)
        self.latencies += other.latencies


class RMScorer:
    """Background-thread client of the reward service (one per trainer process)."""

    def __init__(self, targets: str, *, token: str | None, timeout: float, max_attempts: int,
                 backoff_max: float, client_id: str | None, chunk_size: int,
                 chunk_timeout: float | None = None, version: str | None = None):
        self.chunk_size = chunk_size
        self.version = version  # every call pinned to this RM version (None: the default)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rm-scorer",
                                        daemon=True)
        self._thread.start()
        self._pending: list[Future] = []

        async def make() -> AsyncRewardClient:  # grpc.aio channels belong to their loop
            # timeout: each attempt; chunk_timeout: a chunk's stream (or the start's model info)
            # in all, so a hung RM fails a chunk's samples after it, not attempts x timeout.
            return AsyncRewardClient(targets, token=token, timeout=timeout,
                                     stream_timeout=timeout, max_attempts=max_attempts,
                                     backoff_max=backoff_max, client_id=client_id,
                                     total_timeout=chunk_timeout, logger=log)

        self._client = self._run(make())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def retries(self) -> int:
        """Transient failures retried so far (calls and resubmitted streams)."""
        return self._client.retries

    def model_info(self) -> pb.ModelInfo:
        """The pinned version's info (the default's without a pin)."""
        where = ",".join(self._client.targets)
        try:
            return self._run(self._client.model_info(version=self.version))
        except ScoringError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise RMError(f"--rm-version {self.version}: the reward model at {where} does "
                              f"not hold it: {str(e).split(': ', 2)[-1]}") from None
            raise RMError(f"cannot reach the reward model at {where}: {e}") from None

    def submit(self, samples: list[pb.Sample]) -> None:
        """Start scoring ``samples`` now; returns at once."""
        self._pending.append(asyncio.run_coroutine_threadsafe(self._score(samples), self._loop))

    async def _score(self, samples: list[pb.Sample]) -> ChunkOutcome:
        out, t0 = ChunkOutcome(), time.perf_counter()
        try:
            async for r in self._client.score_stream(samples, self.chunk_size,
                                                     version=self.version):
                out.results[r.id] = r
        except ScoringError as e:
            # Whatever is unanswered failed (the error names only ids already sent).
            reason = e.code.name if e.code is not None else "retries exhausted"
            out.failed = {s.id: reason for s in samples if s.id not in out.results}
            log.warning("RM: %d of %d samples failed after retries: %s", len(out.failed),
                        len(samples), e)
        out.seconds = time.perf_counter() - t0
        return out

    def collect(self) -> Collected:
        """Wait for every chunk submitted since the last collect."""
        pending, self._pending = self._pending, []
        got = Collected({}, {}, [])
        for fut in pending:
            outcome: ChunkOutcome = fut.result()  # an unexpected exception propagates
            got.results.update(outcome.results)
            got.failed.update(outcome.failed)
            got.latencies.append(outcome.seconds)
        return got

    def close(self) -> None:
        if not self._loop.is_running():
            return
        for fut in self._pending:
            fut.cancel()
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


class RMVersionLog:
    """The RM versions behind a run's rewards: counts per step, a change of version as an event
    (``{"event": "rm_version_change", ...}`` in the step log) and as metrics:
    ``ppo_rm_version_changes_total`` and ``ppo_rm_version_info{version,label}`` (1 for the
    current version only: one series at a time)."""

    def __init__(self, registry=None):
        self.current: str | None = None
        self.counts: dict[str, int] = {}  # the last step's rewards per version
        self._changes = self._info = None
        if registry is not None:
            from prometheus_client import Counter as PromCounter
            from prometheus_client import Gauge

            self._changes = PromCounter("ppo_rm_version_changes", "Changes of the RM version "
                                        "behind the rewards (a swap or rollback on the server)",
                                        registry=registry)
            self._info = Gauge("ppo_rm_version_info", "1 for the RM version behind the latest "
                               "rewards (version: weights hash; label: the operator's)",
                               ["version", "label"], registry=registry)

    def observe(self, step: int, results) -> list[dict]:
        """Count the step's results per version; the change events to log (a version other
        than the current one scored some of them: the first step's version is no change)."""
        results = list(results)
        self.counts = dict(Counter(r.version for r in results))
        labels = {r.version: r.version_label for r in results}
        new = [v for v in self.counts if v != self.current]
        if not new:
            return []
        previous, self.current = self.current, max(new, key=self.counts.__getitem__)
        if self._info is not None:
            self._info.clear()
            self._info.labels(self.current, labels[self.current]).set(1)
        if previous is None:
            return []
        if self._changes is not None:
            self._changes.inc()
        log.warning("step %d: the RM version behind the rewards changed from %s to %s (%s)",
                    step, previous, self.current, labels[self.current] or "no label")
        return [{"event": "rm_version_change", "step": step, "from": previous,
                 "to": self.current, "label": labels[self.current], "versions": self.counts}]

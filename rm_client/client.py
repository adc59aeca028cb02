"""The asyncio client of the reward service: deadlines, retries with backoff, replicas, streams.

    from rm_client import AsyncRewardClient, text_sample
    async with AsyncRewardClient(["10.0.0.5:50051", "10.0.0.6:50051"], token="...") as rm:
        scores = await rm.score([text_sample("a", "Q: 2+2?", " 4")])     # unary
        async for r in rm.score_stream(many_samples, chunk_size=64): ... # as batches finish

The same without an event loop: :class:`rm_client.sync.RewardClient`. Guarantees the trainer
relies on:
- a malformed address fails at construction (:func:`parse_targets`), not as a silent retry loop;
- every attempt has a deadline (``timeout``, default 60 s; streams ``stream_timeout``), and
  ``total_timeout`` bounds a whole call, every attempt and backoff included (a hung server,
  alive but not answering, otherwise costs attempts x deadline);
- transient failures (UNAVAILABLE: overloaded, restarting, unreachable; RESOURCE_EXHAUSTED
  except "message too large"; DEADLINE_EXCEEDED) are retried with exponential backoff and
  full jitter, honouring the server's ``retry-after-ms``; scoring is idempotent, so a retry
  is always safe;
- several addresses are balanced round-robin, and a failed attempt moves to the next one;
- a broken stream is resumed on a new stream with exactly the samples not answered yet, so
  every id is answered once; a sample that still fails raises :class:`ScoringError` naming it,
  never a made-up reward;
- while the server cannot be reached, one warning per retry round ("waiting for the reward
  model at ..., attempt n of N") goes to ``logger``, however many calls are waiting;
- ``version=`` pins a call to one model version (weights hash or label, ``ScoreRequest.version``);
  each result names the version that scored it (``ScoreResult.version``, ``version_label``).
  A version that is not resident is FAILED_PRECONDITION: not retried.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from rm_client.samples import ScoreResult
from rm_client.targets import parse_targets

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TLSConfig:
    """PEM file paths. ``ca_cert`` verifies the server; client cert/key for mTLS."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None  # override the name checked against the certificate


class ScoringError(Exception):
    """Samples that could not be scored after all retries (with the last status)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 sample_ids: Sequence[str] = ()):
        super().__init__(message)
        self.code = code
        self.sample_ids = list(sample_ids)


def is_retryable(err: grpc.RpcError) -> bool:
    code = err.code()
    if code == grpc.StatusCode.INTERNAL and err.details() == "Internal error from Core":
        return True  # grpc.aio lost the status of a stream the server ended while we wrote
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in (err.details() or ""):
        return False  # message size: retrying cannot help
    return code in RETRYABLE


def _retry_after(err) -> float:
    try:
        for key, value in err.trailing_metadata() or ():
            if key == "retry-after-ms":
                return int(value) / 1000
    except Exception:  # trailing metadata is unavailable for some transport errors
        pass
    return 0.0


def channel_options() -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Agreed with the server (rm_server/server.py): it allows pings every 10 s.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # gRPC core waits this long for a ping's ack (default 60 s)
        ("grpc.http2.ping_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.enable_retries", 0),  # retries are ours: they resubmit streams too
        # Reconnect soon after an outage: the default backoff grows to 120 s, so a channel can
        # keep failing for minutes after the server is back.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class AsyncRewardClient:
    def __init__(self, targets: str | Sequence[str], *, token: str | None = None,
                 tls: TLSConfig | None = None, timeout: float = 60.0,
                 stream_timeout: float = 600.0, max_attempts: int = 10,
                 backoff_base: float = 0.1, backoff_max: float = 4.0,
                 client_id: str | None = None, keepalive_time_ms: int | None = None,
                 keepalive_timeout_ms: int | None = None, total_timeout: float | None = None,
                 logger: logging.Logger | None = None):
        self.targets = parse_targets(targets)
        self.timeout, self.stream_timeout = timeout, stream_timeout
        self.total_timeout = total_timeout  # one call, all attempts and backoff (None: no bound)
        self.max_attempts = max_attempts
        self.log = logger or logging.getLogger("rm_client.client")
        self._waiting_round = 0  # highest retry round announced since the last answer
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.metadata = []
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))
        if client_id:
            self.metadata.append(("x-client-id", client_id))
        options = channel_options()
        for key, value in (("grpc.keepalive_time_ms", keepalive_time_ms),
                           ("grpc.http2.min_sent_ping_interval_without_data_ms", keepalive_time_ms),
                           ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
                           ("grpc.http2.ping_timeout_ms", keepalive_timeout_ms)):
            if value:  # a faster ping must stay above the server's min ping interval (10 s)
                options = [o for o in options if o[0] != key] + [(key, value)]
        creds = _channel_credentials(tls)
        if tls and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._channels = [grpc.aio.secure_channel(t, creds, options) if creds
                          else grpc.aio.insecure_channel(t, options) for t in self.targets]
        self._stubs = [pb_grpc.RewardServiceStub(c) for c in self._channels]
        self._next = itertools.count(random.randrange(len(self._stubs)))
        self.retries = 0  # transient failures retried so far (for the trainer's metrics)

    def _stub(self) -> pb_grpc.RewardServiceStub:
        return self._stubs[next(self._next) % len(self._stubs)]

    def _deadline(self) -> float:
        return time.monotonic() + self.total_timeout if self.total_timeout else math.inf

    def _gives_up(self, err, attempt: int, deadline: float) -> bool:
        """No retry: a permanent error, the last attempt, or the call's total deadline passed."""
        return ((err is not None and not is_retryable(err)) or attempt == self.max_attempts - 1
                or time.monotonic() >= deadline)

    def _failure(self, method: str, err, attempt: int, deadline: float,
                 ids: Sequence[str] = ()) -> ScoringError:
        self._waiting_round = 0  # the next outage is announced from its first round
        last = f"{err.code().name}: {err.details()}" if err is not None else "stream ended early"
        if time.monotonic() >= deadline:
            last += f"; the call's total deadline ({self.total_timeout:g} s) passed"
        return ScoringError(f"{method} failed after {attempt + 1} attempt(s): {last}",
                            err.code() if err is not None else None, ids)

    async def _backoff(self, attempt: int, err, deadline: float = math.inf) -> None:
        self.retries += 1
        delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))
        delay = min(max(delay, _retry_after(err)), max(0.0, deadline - time.monotonic()))
        if attempt + 1 > self._waiting_round:  # one line per round, however many calls wait
            self._waiting_round = attempt + 1
            self.log.warning("waiting for the reward model at %s, attempt %d of %d in %.1f s "
                             "(%s)", ",".join(self.targets), attempt + 2, self.max_attempts,
                             delay, err.code().name if err is not None else "stream ended")
        await asyncio.sleep(delay)

    async def _unary(self, method: str, request, timeout: float | None):
        deadline = self._deadline()
        for attempt in range(self.max_attempts):
            per_try = min(timeout or self.timeout, max(deadline - time.monotonic(), 0.001))
            try:
                response = await getattr(self._stub(), method)(
                    request, timeout=per_try, metadata=self.metadata)
                self._waiting_round = 0
                return response
            except grpc.aio.AioRpcError as err:
                if self._gives_up(err, attempt, deadline):
                    raise self._failure(method, err, attempt, deadline) from err
                await self._backoff(attempt, err, deadline)
        raise AssertionError("unreachable: the last attempt raises")

    async def model_info(self, timeout: float | None = None,
                         version: str | None = None) -> pb.ModelInfo:
        """The default version's info (or ``version``'s), with the resident versions listed."""
        return await self._unary("GetModelInfo", pb.GetModelInfoRequest(version=version or ""),
                                 timeout)

    async def score(self, samples: Sequence[pb.Sample], timeout: float | None = None,
                    version: str | None = None) -> list[ScoreResult]:
        """Unary Score; results in the order of ``samples``; ``version``: pin one."""
        request = pb.ScoreRequest(samples=samples, version=version or "")
        try:
            response = await self._unary("Score", request, timeout)
        except ScoringError as e:
            e.sample_ids = [s.id for s in samples]
            raise
        by_id = {r.id: r for r in response.results}
        return [ScoreResult.from_message(by_id[s.id]) for s in samples]

    async def score_stream(self, samples: Iterable[pb.Sample], chunk_size: int = 64,
                           timeout: float | None = None, version: str | None = None
                           ) -> AsyncIterator[ScoreResult]:
        """Stream samples in chunks; yield results as batches finish (any order); ``version``:
        pin every request of the stream to one model version.

        On a transient failure the unanswered samples are resubmitted on a new stream (the
        next address), so each id is yielded exactly once.
        """
        outbox = _Outbox(samples, chunk_size, version or "")
        deadline = self._deadline()
        for attempt in range(self.max_attempts):
            per_try = min(timeout or self.stream_timeout,
                          max(deadline - time.monotonic(), 0.001))
            call = self._stub().ScoreStream(outbox.requests(), timeout=per_try,
                                            metadata=self.metadata)
            try:
                async for response in call:
                    self._waiting_round = 0
                    for r in response.results:
                        if outbox.unanswered.pop(r.id, None) is not None:
                            yield ScoreResult.from_message(r)
                if outbox.exhausted and not outbox.unanswered:
                    return
                err = None  # the server closed early: resubmit what is left
            except grpc.aio.AioRpcError as e:
                err = e
            finally:
                call.cancel()
            if self._gives_up(err, attempt, deadline):
                raise self._failure("ScoreStream", err, attempt, deadline,
                                    list(outbox.unanswered)) from err
            await self._backoff(attempt, err, deadline)
        raise AssertionError("unreachable: the last attempt raises")

    async def score_all(self, samples: Sequence[pb.Sample], chunk_size: int = 64,
                        timeout: float | None = None, version: str | None = None
                        ) -> list[ScoreResult]:
        """Score many samples over one stream; results in the order of ``samples``."""
        by_id = {}
        async for r in self.score_stream(samples, chunk_size, timeout, version):
            by_id[r.id] = r
        return [by_id[s.id] for s in samples]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class _Outbox:
    """A stream's samples across attempts: those sent and not answered yet (resent first on
    the next stream), then those not sent yet, drawn from the caller's iterable in chunks."""

    def __init__(self, samples: Iterable[pb.Sample], chunk_size: int, version: str = ""):
        self.source = iter(samples)
        self.chunk_size = chunk_size
        self.version = version
        self.unanswered: dict[str, pb.Sample] = {}
        self.exhausted = False  # the caller's iterable has no more samples

    def requests(self) -> AsyncIterator[pb.ScoreRequest]:
        """The requests of one stream (one attempt): the samples unanswered as it starts."""
        return self._requests(list(self.unanswered.values()))

    async def _requests(self, resend: list[pb.Sample]) -> AsyncIterator[pb.ScoreRequest]:
        for i in range(0, len(resend), self.chunk_size):
            yield pb.ScoreRequest(samples=resend[i: i + self.chunk_size], version=self.version)
        while not self.exhausted:
            chunk = list(itertools.islice(self.source, self.chunk_size))
            if not chunk:
                self.exhausted = True
                return
            for s in chunk:
                self.unanswered[s.id] = s
            yield pb.ScoreRequest(samples=chunk, version=self.version)


def _channel_credentials(tls: TLSConfig | None):
    if tls is None:
        return None
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(tls.ca_cert), read(tls.client_key),
                                        read(tls.client_cert))

"""The client library for the reward service: asyncio and sync APIs.

    from rm_server.client import RewardClient, text_sample
    with RewardClient(["10.0.0.5:50051", "10.0.0.6:50051"], token="...") as rm:
        scores = rm.score([text_sample("a", "Q: 2+2?", " 4")])           # unary
        for r in rm.score_stream(many_samples, chunk_size=64): ...       # as batches finish

Guarantees the trainer relies on:
- every call has a deadline (``timeout``, default 60 s; streams ``stream_timeout``);
- transient failures (UNAVAILABLE: overloaded, restarting, unreachable; RESOURCE_EXHAUSTED
  except "message too large"; DEADLINE_EXCEEDED) are retried with exponential backoff and
  full jitter, honouring the server's ``retry-after-ms``; scoring is idempotent, so a retry
  is always safe;
- several addresses are balanced round-robin, and a failed attempt moves to the next one;
- a broken stream is resumed on a new stream with exactly the samples not answered yet, so
  every id is answered once; a sample that still fails raises :class:`ScoringError` naming it,
  never a made-up reward.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator, Sequence

import grpc

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ScoreResult:
    id: str
    reward: float
    num_tokens: int
    truncated: bool


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


def text_sample(sample_id: str, prompt: str, response: str) -> pb.Sample:
    return pb.Sample(id=sample_id, text=pb.TextPair(prompt=prompt, response=response))


def chat_sample(sample_id: str, messages: Sequence[dict | tuple[str, str]]) -> pb.Sample:
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) if isinstance(m, dict)
            else pb.ChatMessage(role=m[0], content=m[1]) for m in messages]
    return pb.Sample(id=sample_id, conversation=pb.Conversation(messages=msgs))


def token_sample(sample_id: str, ids: Sequence[int], prompt_length: int = 0) -> pb.Sample:
    return pb.Sample(id=sample_id, tokens=pb.TokenIds(ids=list(ids), prompt_length=prompt_length))


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
        ("grpc.http2.ping_timeout_ms", 10_000),  # gRPC core waits for a ping ack this long (default 60 s)
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
                 keepalive_timeout_ms: int | None = None):
        if isinstance(targets, str):
            targets = [t for t in targets.split(",") if t]
        if not targets:
            raise ValueError("at least one target address is needed")
        self.targets = list(targets)
        self.timeout, self.stream_timeout = timeout, stream_timeout
        self.max_attempts = max_attempts
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

    async def _backoff(self, attempt: int, err) -> None:
        self.retries += 1
        delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))
        await asyncio.sleep(max(delay, _retry_after(err)))

    async def _unary(self, method: str, request, timeout: float | None):
        last = None
        for attempt in range(self.max_attempts):
            try:
                return await getattr(self._stub(), method)(
                    request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                if not is_retryable(err) or attempt == self.max_attempts - 1:
                    raise ScoringError(f"{method} failed: {err.code().name}: {err.details()}",
                                       err.code()) from err
                last = err
                await self._backoff(attempt, err)
        raise ScoringError(f"{method} failed", last.code() if last else None)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout)

    async def score(self, samples: Sequence[pb.Sample], timeout: float | None = None
                    ) -> list[ScoreResult]:
        """Unary Score; results in the order of ``samples``."""
        try:
            response = await self._unary("Score", pb.ScoreRequest(samples=samples), timeout)
        except ScoringError as e:
            e.sample_ids = [s.id for s in samples]
            raise
        by_id = {r.id: r for r in response.results}
        return [_result(by_id[s.id]) for s in samples]

    async def score_stream(self, samples: Iterable[pb.Sample], chunk_size: int = 64,
                           timeout: float | None = None) -> AsyncIterator[ScoreResult]:
        """Stream samples in chunks; yield results as batches finish (any order).

        On a transient failure the unanswered samples are resubmitted on a new stream (the
        next address), so each id is yielded exactly once.
        """
        source = iter(samples)
        unanswered: dict[str, pb.Sample] = {}
        exhausted = False
        for attempt in range(self.max_attempts):
            resend = list(unanswered.values())

            async def requests():
                nonlocal exhausted
                for i in range(0, len(resend), chunk_size):
                    yield pb.ScoreRequest(samples=resend[i: i + chunk_size])
                while not exhausted:
                    chunk = list(itertools.islice(source, chunk_size))
                    if not chunk:
                        exhausted = True
                        return
                    for s in chunk:
                        unanswered[s.id] = s
                    yield pb.ScoreRequest(samples=chunk)

            call = self._stub().ScoreStream(requests(), timeout=timeout or self.stream_timeout,
                                            metadata=self.metadata)
            try:
                async for response in call:
                    for r in response.results:
                        if unanswered.pop(r.id, None) is not None:
                            yield _result(r)
                if exhausted and not unanswered:
                    return
                err = None  # the server closed early: resubmit what is left
            except grpc.aio.AioRpcError as e:
                err = e
                if not is_retryable(e) or attempt == self.max_attempts - 1:
                    raise ScoringError(f"ScoreStream failed: {e.code().name}: {e.details()}",
                                       e.code(), list(unanswered)) from e
            finally:
                call.cancel()
            await self._backoff(attempt, err)
        raise ScoringError("ScoreStream: retries exhausted", None, list(unanswered))

    async def score_all(self, samples: Sequence[pb.Sample], chunk_size: int = 64,
                        timeout: float | None = None) -> list[ScoreResult]:
        """Score many samples over one stream; results in the order of ``samples``."""
        by_id = {}
        async for r in self.score_stream(samples, chunk_size, timeout):
            by_id[r.id] = r
        return [by_id[s.id] for s in samples]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class RewardClient:
    """Synchronous facade: the async client runs on a private event-loop thread."""

    def __init__(self, targets: str | Sequence[str], **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rm-client",
                                        daemon=True)
        self._thread.start()
        self._client: AsyncRewardClient = self._call(_make_async(targets, kwargs))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def retries(self) -> int:
        return self._client.retries

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._call(self._client.model_info(timeout))

    def score(self, samples: Sequence[pb.Sample], timeout: float | None = None) -> list[ScoreResult]:
        return self._call(self._client.score(samples, timeout))

    def score_all(self, samples: Sequence[pb.Sample], chunk_size: int = 64,
                  timeout: float | None = None) -> list[ScoreResult]:
        return self._call(self._client.score_all(samples, chunk_size, timeout))

    def score_stream(self, samples: Iterable[pb.Sample], chunk_size: int = 64,
                     timeout: float | None = None) -> Iterator[ScoreResult]:
        import queue

        out: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for r in self._client.score_stream(samples, chunk_size, timeout):
                    out.put(r)
            except BaseException as e:  # handed to the caller's thread
                out.put(e)
            out.put(done)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def _make_async(targets, kwargs) -> AsyncRewardClient:
    return AsyncRewardClient(targets, **kwargs)


def _result(r: pb.ScoreResult) -> ScoreResult:
    return ScoreResult(r.id, r.reward, r.num_tokens, r.truncated)


def _channel_credentials(tls: TLSConfig | None):
    if tls is None:
        return None
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(tls.ca_cert), read(tls.client_key),
                                        read(tls.client_cert))

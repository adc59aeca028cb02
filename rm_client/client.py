"""The client library for the reward service: asyncio and sync APIs.

    from rm_client import RewardClient, text_sample
    with RewardClient(["10.0.0.5:50051", "10.0.0.6:50051"], token="...") as rm:
        scores = rm.score([text_sample("a", "Q: 2+2?", " 4")])           # unary
        for r in rm.score_stream(many_samples, chunk_size=64): ...       # as batches finish

Guarantees the trainer relies on:
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
  model at ..., attempt n of N") goes to ``logger``, however many calls are waiting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import math
import random
import re
import threading
import time
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


class AddressError(ValueError):
    """A reward-service address that cannot be right, refused before any connection."""


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")  # a DNS name or IPv4 address


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """Check reward-service addresses (a list, or one comma-separated string); return them.

    Accepted: ``HOST:PORT``, ``[IPV6]:PORT`` and gRPC's own target forms ``dns:[//AUTH/]HOST:PORT``,
    ``ipv4:ADDR:PORT``, ``ipv6:[ADDR]:PORT``, ``unix:PATH``, ``unix-abstract:NAME``. Refused with
    :class:`AddressError`: a URL scheme (``http://h:1``: gRPC would look up a host named
    "http"), a missing port (gRPC dials 443 then: ``localhost`` quietly meant localhost:443),
    a port that is not a number in 1..65535, a bare IPv6 address (ambiguous without brackets).
    """
    if isinstance(targets, str):
        targets = targets.split(",")
    out = [_check_target(t.strip()) for t in targets if t.strip()]
    if not out:
        raise AddressError("no reward-model address given (expected HOST:PORT)")
    return out


def _check_target(address: str) -> str:
    if address.startswith(("unix:", "unix-abstract:")):
        if not address.partition(":")[2].strip("/"):
            raise AddressError(f"reward-model address {address!r}: no socket path")
        return address
    rest = address
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            rest = address[len(scheme):]
            if scheme == "dns:" and rest.startswith("//"):
                rest = rest[2:].partition("/")[2]  # dns://[AUTHORITY]/HOST:PORT
            break
    else:
        if "://" in address:
            scheme, _, after = address.partition("://")
            hint = after.rstrip("/") or "host"
            raise AddressError(f"reward-model address {address!r}: gRPC takes no {scheme}:// "
                               f"scheme; write HOST:PORT, e.g. "
                               f"{hint if ':' in hint else hint + ':50051'}")
    _check_host_port(rest, address)
    return address


def _check_host_port(hp: str, address: str) -> None:
    def bad(why: str) -> AddressError:
        return AddressError(f"reward-model address {address!r}: {why}")

    if hp.startswith("["):
        host, _, after = hp[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
        if not after:
            raise bad(f"no port (gRPC would dial 443): write [{host}]:PORT")
        port = after[1:] if after.startswith(":") else after
    else:
        host, sep, port = hp.rpartition(":")
        if not sep:
            raise bad(f"no port (gRPC would dial 443): write HOST:PORT, e.g. {hp}:50051")
        if ":" in host:
            raise bad("an IPv6 address goes in brackets: [ADDR]:PORT")
        if not _HOST.fullmatch(host):
            raise bad(f"{host!r} is not a host name or address")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise bad(f"port {port!r} is not a number in 1..65535")


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
        deadline = self._deadline()
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

            per_try = min(timeout or self.stream_timeout,
                          max(deadline - time.monotonic(), 0.001))
            call = self._stub().ScoreStream(requests(), timeout=per_try, metadata=self.metadata)
            try:
                async for response in call:
                    self._waiting_round = 0
                    for r in response.results:
                        if unanswered.pop(r.id, None) is not None:
                            yield _result(r)
                if exhausted and not unanswered:
                    return
                err = None  # the server closed early: resubmit what is left
            except grpc.aio.AioRpcError as e:
                err = e
            finally:
                call.cancel()
            if self._gives_up(err, attempt, deadline):
                raise self._failure("ScoreStream", err, attempt, deadline,
                                    list(unanswered)) from err
            await self._backoff(attempt, err, deadline)
        raise AssertionError("unreachable: the last attempt raises")

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
        targets = parse_targets(targets)  # a bad address fails here, before a thread starts
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

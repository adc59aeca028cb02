"""The one interceptor: auth, exception -> status code mapping, and per-RPC metrics.

RPC bodies never wrap themselves in try/except. A :class:`ServiceError` becomes its status
code (with trailing metadata such as ``retry-after-ms``); any other exception is logged,
counted in ``rm_internal_errors_total`` and answered INTERNAL, never UNKNOWN. Health and
reflection pass through untouched (health must answer Kubernetes probes without a token).
RewardService calls need the scoring token (``--auth-token-file``), AdminService calls the
admin token (``--admin-token-file``; rm_server/admin.py): one never opens the other.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import grpc

from protos.service_name import METHOD_PREFIX
from rm_server.admin import ADMIN_PREFIX
from rm_server.errors import ServiceError, Unauthenticated

log = logging.getLogger("rm_server")


class StatusInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics, auth_token: str | None = None, admin_token: str | None = None):
        self.metrics = metrics
        # method prefix -> the authorization it needs (None: none); the admin service always
        # needs its token (the server does not serve it without one)
        self._expected = {METHOD_PREFIX: _bearer(auth_token), ADMIN_PREFIX: _bearer(admin_token)}
        # Hot path: the wrapped handler of each method is built once (metadata is read from
        # the call's context), and labelled metric children are looked up once.
        self._handlers: dict[str, tuple[object, object]] = {}
        self._durations: dict[str, object] = {}
        self._counts: dict[tuple[str, str], object] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        prefix = next((p for p in self._expected if details.method.startswith(p)), None)
        if handler is None or prefix is None:
            return handler
        cached = self._handlers.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        method, expected = details.method[len(prefix):], self._expected[prefix]
        wrapped = handler
        if handler.unary_unary:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, expected),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        elif handler.stream_stream:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, expected),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        self._handlers[details.method] = (handler, wrapped)
        return wrapped

    def _check_auth(self, context, expected: bytes | None) -> None:
        if expected is None:
            return
        got = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value  # the last one wins, as dict(metadata) did
        got = got.encode() if isinstance(got, str) else got
        if not hmac.compare_digest(got, expected):  # constant time
            raise Unauthenticated("missing or wrong bearer token")

    def _wrap_unary(self, behavior, method, expected):
        async def wrapped(request, context):
            start = time.perf_counter()
            self.metrics.inflight.inc()
            code = grpc.StatusCode.OK
            try:
                self._check_auth(context, expected)
                return await behavior(request, context)
            except BaseException as exc:
                code = status_of(exc, context)
                await self._raise(exc, code, context, method)
            finally:
                self._finish(method, code, start)
        return wrapped

    def _wrap_stream(self, behavior, method, expected):
        async def wrapped(request_iterator, context):
            start = time.perf_counter()
            self.metrics.inflight.inc()
            code = grpc.StatusCode.OK
            try:
                self._check_auth(context, expected)
                async for response in behavior(request_iterator, context):
                    yield response
            except BaseException as exc:
                code = status_of(exc, context)
                await self._raise(exc, code, context, method)
            finally:
                self._finish(method, code, start)
        return wrapped

    async def _raise(self, exc: BaseException, code, context, method: str) -> None:
        """Abort the call with ``code`` (cancellation and grpc's own aborts propagate as they
        are)."""
        if isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError)):
            raise exc
        if isinstance(exc, ServiceError):
            if not exc.counted_by_batcher:
                self.metrics.rejected.labels(exc.reason).inc()
            if exc.trailing:
                context.set_trailing_metadata(exc.trailing)
            await context.abort(code, exc.message)
        self.metrics.internal_errors.inc()
        log.exception("internal error in %s", method)
        await context.abort(code, f"internal error: {type(exc).__name__}")

    def _finish(self, method: str, code: grpc.StatusCode, start: float) -> None:
        self.metrics.inflight.dec()
        count = self._counts.get((method, code.name))
        if count is None:  # bounded: methods x status codes
            count = self._counts[(method, code.name)] = self.metrics.requests.labels(
                method, code.name)
        count.inc()
        duration = self._durations.get(method)
        if duration is None:
            duration = self._durations[method] = self.metrics.request_duration.labels(method)
        duration.observe(time.perf_counter() - start)


def _bearer(token: str | None) -> bytes | None:
    return f"Bearer {token}".encode() if token else None


def status_of(exc: BaseException, context) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code() if hasattr(context, "code") else None
        return code or grpc.StatusCode.UNKNOWN
    if isinstance(exc, ServiceError):
        return exc.code
    return grpc.StatusCode.INTERNAL

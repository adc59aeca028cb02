"""The HTTP/JSON door: the reward service over HTTP/1.1, beside gRPC, on the same event loop.

    POST /get_reward        OpenRLHF's remote reward model (--remote_rm_url)
    POST /pooling           vLLM's pooling API shape
    POST /classify          vLLM's classify API shape (raw scores: see http_protocols.py)
    POST /v1/score          our Score, in the proto's JSON mapping
    GET  /v1/model_info     GetModelInfo, in the proto's JSON mapping
    GET  /v1/models         the served model, as OpenAI-style clients list it
    GET  /healthz, /health  200 {"status": "SERVING"} when grpc.health.v1 says SERVING, else 503
    POST /v1/admin/load, /v1/admin/default, /v1/admin/unload   model versions (rm_server/admin.py)

A scoring request pins a model version with the ``X-RM-Version`` header (a weights hash or
label; /v1/score also takes the ScoreRequest's ``version``); every scoring response names the
versions that scored it in its ``X-RM-Version`` header (and /v1/score in each result). The admin
routes need the admin token (--admin-token-file), not the scoring one; without the flag they
answer 404.

Behind every scoring route is the path of a gRPC ``Score``: the JSON becomes ``(sample id,
input)`` pairs (rm_server/http_protocols.py), :class:`Admission` checks and encodes them, the
one :class:`Batcher` scores them with everyone else's samples, a :class:`UnarySink` collects the
results, returned in request order. One middleware does what the gRPC interceptor does: the
bearer token (health exempt), the limits (body size = --max-message-bytes, requests at once =
--max-concurrent-rpcs), per-route metrics (``rm_requests_total{method="/get_reward", code}``,
``rm_request_duration_seconds``, ``rm_inflight_requests``) and every error as JSON carrying the
gRPC status name, ``{"error": {"code", "message", "retry_after_ms"?}}``:

| code               | HTTP | when                                                        |
|--------------------|------|-------------------------------------------------------------|
| INVALID_ARGUMENT   | 400  | bad JSON, a missing or mistyped field (named), a bad sample  |
| FAILED_PRECONDITION| 400  | a pinned version (X-RM-Version) that is not resident         |
| UNAUTHENTICATED    | 401  | the token is missing or wrong                                |
| NOT_FOUND          | 404  | no such route, or ``model`` names another model              |
| UNIMPLEMENTED      | 405  | the route exists, the HTTP method does not                   |
| RESOURCE_EXHAUSTED | 413  | body over --max-message-bytes (retrying cannot help)         |
| RESOURCE_EXHAUSTED | 429  | over --max-concurrent-rpcs requests at once (Retry-After)    |
| UNAVAILABLE        | 503  | queue full, model loading, server draining (Retry-After)     |
| DEADLINE_EXCEEDED  | 504  | the ``X-Timeout-Ms`` budget passed; queued samples dropped   |
| INTERNAL           | 500  | an unexpected fault: logged, counted                         |

503 for overload, as gRPC's UNAVAILABLE: the status that HTTP retry machinery retries (urllib3's
Retry, the OpenAI client, Envoy and ingress-nginx's next-upstream); OpenRLHF retries any error.
A client that disconnects cancels its request: its queued samples are dropped (CANCELLED).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable

import grpc
from aiohttp import web

from rm_server import http_protocols as shapes
from rm_server.admin import HTTP_PREFIX, from_json
from rm_server.admission import Caller
from rm_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotReady,
    ServiceError,
    Unauthenticated,
)
from rm_server.http_caller import bearer_token, caller_of
from rm_server.sinks import UnarySink

log = logging.getLogger("rm_server")

Code = grpc.StatusCode
HTTP_STATUS = {  # google.rpc's mapping of status codes onto HTTP
    Code.OK: 200, Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.NOT_FOUND: 404,
    Code.UNIMPLEMENTED: 405, Code.RESOURCE_EXHAUSTED: 429, Code.CANCELLED: 499,
    Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
    Code.FAILED_PRECONDITION: 400}
HEALTH_PATHS = ("/healthz", "/health")


class NotFound(ServiceError):
    code = Code.NOT_FOUND
    reason = "invalid"


class MethodNotAllowed(ServiceError):
    code = Code.UNIMPLEMENTED
    reason = "invalid"


class TooLarge(ServiceError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "too_large"
    http_status = 413


class Busy(ServiceError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "concurrency"


class HttpDoor:
    """The aiohttp application over the servicer's model, admission and batcher."""

    def __init__(self, servicer, metrics, cfg, token: str | None, ready: Callable[[], bool],
                 admin=None, admin_token: str | None = None):
        self.servicer = servicer  # model, admission, batcher and info: set once loaded
        self.admin = admin  # rm_server.admin.AdminServicer; None: no admin API
        self.metrics = metrics
        self.ready = ready
        self.max_body = cfg.max_message_bytes
        self.max_active = cfg.max_concurrent_rpcs
        self.grace = cfg.grace_seconds
        self.created = int(time.time())
        self._token = token.encode() if token else None
        self._admin_token = admin_token.encode() if admin_token else None
        self._active = 0
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body)
        routes = {"/get_reward": self.get_reward, "/pooling": self.pooling,
                  "/classify": self.classify, "/v1/score": self.score_json}
        for path, handler in routes.items():
            self.app.router.add_post(path, handler)
        for path, handler in {"/v1/model_info": self.model_info, "/v1/models": self.models,
                              **dict.fromkeys(HEALTH_PATHS, self.health)}.items():
            self.app.router.add_get(path, handler, allow_head=False)
        self.methods = [*routes, "/v1/model_info", "/v1/models"]  # metric label values
        for path in ("load", "default", "unload"):
            self.app.router.add_post(HTTP_PREFIX + path, self.admin_call)
            self.methods += [HTTP_PREFIX + path] if admin else []

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """Serve on a bound socket; in-flight requests get ``grace`` seconds on :meth:`stop`."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.grace)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace``), close."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- routes ------------------------------------------------------------------------------
    async def get_reward(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = self._model(request)
        results = await self._score(shapes.openrlhf_samples(body), request)
        return _json(shapes.openrlhf_response(results, model.heads.names), results)

    async def pooling(self, request: web.Request) -> web.Response:
        return await self._vllm(request, "pooling")

    async def classify(self, request: web.Request) -> web.Response:
        return await self._vllm(request, "classify")

    async def _vllm(self, request: web.Request, kind: str) -> web.Response:
        body = await self._json(request)
        model = self._model(request)
        asked = body.get("model")
        if asked is not None and asked != model.name:
            raise NotFound(f"model: {asked!r} is not served here (this server serves "
                           f"{model.name!r}; GET /v1/models)")
        activation = shapes.use_activation(body)
        results = await self._score(shapes.vllm_samples(body, model.encoder.recipe), request)
        return _json(shapes.vllm_response(kind, model.name, results, activation,
                                          model.heads.names), results)

    async def score_json(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        samples, pin, asked = shapes.score_samples(body)
        how = self.servicer.aggregation(asked, pin or request.headers.get("X-RM-Version", ""))
        results = await self._score(samples, request, pin, how)
        return _json(shapes.score_response(results), results)

    async def model_info(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.json_response(shapes.model_info_json(self.servicer.info))

    async def models(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.json_response(shapes.models_json(self.servicer.info, self.created))

    async def admin_call(self, request: web.Request) -> web.Response:
        """The admin routes: a request message in the proto's JSON mapping, the answer too."""
        if self.admin is None:
            raise NotFound(f"{request.path}: the admin API is off (start the server with "
                           "--admin-token-file)")
        message_cls, call = self.admin.http_routes()[request.path]
        answer = await call(from_json(await self._json(request), message_cls))
        return web.json_response(shapes.proto_json(answer))

    async def health(self, request: web.Request) -> web.Response:
        serving = self.ready()
        return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"},
                                 status=200 if serving else 503)

    # -- the path of a unary Score -----------------------------------------------------------
    def _model(self, request: web.Request):
        """The model of the version the request pins (``X-RM-Version``), else the default's."""
        if self.servicer.model is None:
            raise NotReady("model is not loaded yet (or the server is draining)")
        version = self.servicer.resolve(request.headers.get("X-RM-Version", ""))
        return version.model if version is not None else self.servicer.model

    async def _score(self, samples: shapes.Samples, request: web.Request,
                     pin: str = "", how=None) -> shapes.Results:
        caller = caller_of(request)
        pin = pin or request.headers.get("X-RM-Version", "")
        if caller.time_remaining is None:
            return await self._admit_and_wait(samples, caller, pin, how)
        try:
            return await asyncio.wait_for(self._admit_and_wait(samples, caller, pin, how),
                                          caller.time_remaining)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"X-Timeout-Ms: {caller.time_remaining * 1000:.0f} ms "
                                   "passed; the request's queued samples were dropped") from None

    async def _admit_and_wait(self, samples: shapes.Samples, caller: Caller,
                              pin: str, how=None) -> shapes.Results:
        batcher, sink = self.servicer.batcher, UnarySink(len(samples))
        items = await self.servicer.admit(samples, sink, caller, (), pin)
        for p in items:
            p.aggregation = how  # /v1/score's own (ScoreRequest.aggregation)
        batcher.submit(items)  # full queue: refuse (503)
        try:
            results = await sink.future
        except asyncio.CancelledError:  # client gone, or X-Timeout-Ms: drop queued samples
            batcher.cancel(sink)
            raise
        position = {id(p): i for i, p in enumerate(items)}
        return sorted(results, key=lambda r: position[id(r[0])])

    async def _json(self, request: web.Request) -> dict:
        """The body as a JSON object, whatever its Content-Type (curl -d sends a form type)."""
        if (request.content_length or 0) > self.max_body:
            raise TooLarge(f"request body: {request.content_length} bytes is over the "
                           f"{self.max_body}-byte limit (--max-message-bytes)")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:  # chunked bodies: counted while read
            raise TooLarge(f"request body: over the {self.max_body}-byte limit "
                           "(--max-message-bytes)") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"request body: not JSON ({e})") from None
        if not isinstance(body, dict):
            raise InvalidArgument(f"request body: expected a JSON object, got "
                                  f"{type(body).__name__}")
        return body

    # -- the interceptor's work --------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        routing_error = request.match_info.http_exception
        if routing_error is not None:  # no route of ours ran: not counted, as grpc's unknowns
            error = (MethodNotAllowed(f"{request.method} {request.path}: not allowed here")
                     if routing_error.status == 405 else
                     NotFound(f"{request.path}: no such route (see GET /v1/models, "
                              "POST /v1/score, /get_reward, /pooling, /classify)"))
            return error_response(error)
        method = request.match_info.route.resource.canonical
        if method in HEALTH_PATHS:  # probes: no token, no metrics (as grpc.health.v1)
            return await handler(request)
        start = time.perf_counter()
        self.metrics.inflight.inc()
        self._active += 1
        code = Code.OK
        try:
            self._check_limits(request)
            return await handler(request)
        except asyncio.CancelledError:  # the client went away
            code = Code.CANCELLED
            raise
        except ServiceError as exc:
            code = exc.code
            if not exc.counted_by_batcher:
                self.metrics.rejected.labels(exc.reason).inc()
            return error_response(exc)
        except Exception as exc:
            code = Code.INTERNAL
            self.metrics.internal_errors.inc()
            log.exception("internal error in HTTP %s", method)
            return error_response(ServiceError(f"internal error: {type(exc).__name__}"))
        finally:
            self._active -= 1
            self.metrics.inflight.dec()
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.request_duration.labels(method).observe(time.perf_counter() - start)

    def _check_limits(self, request: web.Request) -> None:
        if self.max_active and self._active > self.max_active:
            raise Busy(f"too many requests at once (--max-concurrent-rpcs {self.max_active})")
        admin = self.admin is not None and request.path.startswith(HTTP_PREFIX)
        expected = self._admin_token if admin else self._token  # admin: never the scoring one
        if expected is not None and not hmac.compare_digest(bearer_token(request), expected):
            raise Unauthenticated("missing or wrong bearer token" + (" (admin)" if admin else ""))


def _json(body: dict, results: shapes.Results) -> web.Response:
    """A scoring response, the versions that scored it in ``X-RM-Version``."""
    tags = dict.fromkeys(r.version.hash for _, r in results if r.version is not None)
    return web.json_response(body, headers={"X-RM-Version": ",".join(tags)} if tags else None)


def error_response(exc: ServiceError) -> web.Response:
    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(exc.code, 500)
    retry_ms = getattr(exc, "retry_after_ms", None)
    headers = {}
    if status in (429, 503):
        retry_ms = retry_ms if retry_ms is not None else 1000
        headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rm-server"'
    return web.json_response(shapes.error_json(exc.code.name, exc.message, retry_ms),
                             status=status, headers=headers)


def ssl_context(cfg) -> ssl.SSLContext | None:
    """The gRPC port's TLS settings for the HTTP door: the same certificate, and with
    --tls-client-ca the same client-certificate requirement."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca:
        ctx.load_verify_locations(cfg.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx

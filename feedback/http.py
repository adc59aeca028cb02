"""The feedback service's HTTP API and labeling page (aiohttp), over a store.

    GET  /                  the labeling page (static, no data: it calls the routes below)
    GET  /healthz           {"status": "SERVING"} (no token)
    POST /v1/pairs          enqueue   {"pairs": [{id?, prompt, response_a, response_b, reward_a?,
                                       reward_b?, rm_version?, policy_step?, priority?, source?}]}
                            -> {"queued": [ids], "duplicates": [ids], "queue_depth"}
    POST /v1/leases         lease     {"labeler", "count"?: 1, "lease_seconds"?}
                            -> {"leases": [{lease_id, pair_id, prompt, left, right, expires_at}],
                                "queue_depth", "labeler_judgments"}
    POST /v1/judgments      submit    {"lease_id", "choice": "left" | "right" | "tie" | "skip"}
                            -> {"judgment": {seq, lease_id, pair_id, labeler, left, choice,
                                winner, judged_at}, "duplicate": bool}
    GET  /v1/judgments      export    ?after=SEQ&limit=N -> {"judgments": [{..., "pair": {...}}],
                                      "last_seq"}
    GET  /v1/stats          {"queue_depth", "leased", "done", "lease_expiries", "judgments":
                             {labeler: n}, "agreement": {"pairs", "agreed", "ratio"}}

Errors are JSON ``{"error": {"code", "reason", "message"}}`` with the HTTP statuses of
feedback/errors.py. One middleware checks the bearer token on /v1 routes, maps errors and
counts every request. Store calls are blocking: they run one at a time on one worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import json
import logging
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from feedback import page, queue
from feedback.errors import (
    FeedbackError,
    InvalidArgument,
    LeaseExpired,
    MethodNotAllowed,
    NotFound,
    QueueFull,
    TooLarge,
    Unauthenticated,
    error_json,
)
from feedback.pairs import check_choice, check_labeler, pair_from_json

log = logging.getLogger("feedback")
MAX_LEASES_PER_CALL = 100
MAX_EXPORT_PAGE = 10_000


class FeedbackApi:
    def __init__(self, store, cfg, metrics, token: str | None, clock=time.time):
        self.store, self.cfg, self.metrics, self.clock = store, cfg, metrics, clock
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="feedback-store")
        self.rng = random.Random(cfg.seed)  # used on the store thread only
        self._token = token.encode() if token else None
        self.app = web.Application(middlewares=[self._middleware],
                                   client_max_size=cfg.max_body_bytes)
        router = self.app.router
        router.add_get("/", self.page)
        router.add_get("/healthz", self.health)
        router.add_post("/v1/pairs", self.enqueue)
        router.add_post("/v1/leases", self.lease)
        router.add_post("/v1/judgments", self.submit)
        router.add_get("/v1/judgments", self.judgments, allow_head=False)
        router.add_get("/v1/stats", self.stats, allow_head=False)
        metrics.init_methods(["POST /v1/pairs", "POST /v1/leases", "POST /v1/judgments",
                              "GET /v1/judgments", "GET /v1/stats"])

    async def call(self, fn, *args):
        """``fn(*args)`` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args))

    async def refresh(self) -> None:
        """Expire leases past their time; set the store's gauges."""
        now = self.clock()
        self.metrics.lease_expiries.inc(await self.call(self.store.expire, now))
        self.metrics.observe(await self.call(self.store.stats, now))

    # -- routes ------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=page.HTML, content_type="text/html",
                            headers={"Content-Security-Policy": page.CSP,
                                     "Cache-Control": "no-store"})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "SERVING"})

    async def enqueue(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        items = body.get("pairs")
        if not isinstance(items, list) or not items:
            raise InvalidArgument("pairs: expected a non-empty list of pairs")
        if len(items) > self.cfg.max_pairs_per_request:
            raise InvalidArgument(f"pairs: {len(items)} is over --max-pairs-per-request "
                                  f"{self.cfg.max_pairs_per_request}")
        pairs = [pair_from_json(item, i) for i, item in enumerate(items)]
        try:
            done = await self.call(self.store.enqueue, pairs, self.cfg.max_queue,
                                   self.cfg.double_label_fraction, self.clock())
        except QueueFull:
            self.metrics.pairs.labels("refused").inc(len(pairs))
            raise
        self.metrics.pairs.labels("queued").inc(len(done.queued))
        self.metrics.pairs.labels("duplicate").inc(len(done.duplicates))
        self.metrics.queue_depth.set(done.queue_depth)
        return web.json_response({"queued": done.queued, "duplicates": done.duplicates,
                                  "queue_depth": done.queue_depth})

    async def lease(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        labeler = check_labeler(body.get("labeler"))
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not (
                1 <= count <= MAX_LEASES_PER_CALL):
            raise InvalidArgument(f"count: an integer in 1-{MAX_LEASES_PER_CALL} (got {count!r})")
        asked = body.get("lease_seconds")
        if asked is not None and (isinstance(asked, bool) or not isinstance(asked, (int, float))
                                  or not asked > 0):
            raise InvalidArgument(f"lease_seconds: a positive number (got {asked!r})")
        seconds = queue.lease_seconds(asked, self.cfg.lease_seconds, self.cfg.max_lease_seconds)
        now = self.clock()
        leases, expired = await self.call(self.store.lease, labeler, count, seconds, now,
                                          lambda: queue.draw_left(self.rng),
                                          lambda: uuid.uuid4().hex)
        depth, mine = await self.call(self.store.progress, labeler)
        self.metrics.lease_expiries.inc(expired)
        self.metrics.leases.inc(sum(1 for x in leases if x.leased_at == now))  # new ones
        return web.json_response({"leases": [x.to_json() for x in leases],
                                  "queue_depth": depth, "labeler_judgments": mine})

    async def submit(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        lease_id = body.get("lease_id")
        if not isinstance(lease_id, str) or not lease_id:
            raise InvalidArgument("lease_id: expected the lease's id (a string)")
        choice = check_choice(body.get("choice"))
        try:
            done = await self.call(self.store.submit, lease_id, choice, self.clock())
        except LeaseExpired as e:
            self.metrics.lease_expiries.inc(int(getattr(e, "marked", False)))
            raise
        if not done.duplicate:
            j = done.judgment
            self.metrics.judgments.labels(self.metrics.labeler(j.labeler), j.choice).inc()
        return web.json_response({"judgment": done.judgment.to_json(),
                                  "duplicate": done.duplicate})

    async def judgments(self, request: web.Request) -> web.Response:
        after = _int_param(request, "after", 0)
        limit = min(_int_param(request, "limit", 1000), MAX_EXPORT_PAGE)
        rows = await self.call(lambda: list(self.store.labeled(after, limit)))
        return web.json_response({
            "judgments": [{**x.judgment.to_json(), "pair": x.pair.to_json()} for x in rows],
            "last_seq": rows[-1].judgment.seq if rows else after})

    async def stats(self, request: web.Request) -> web.Response:
        stats = await self.call(self.store.stats, self.clock())
        self.metrics.observe(stats)
        return web.json_response(stats.to_json())

    async def _json(self, request: web.Request) -> dict:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(f"request body over --max-body-bytes {self.cfg.max_body_bytes}") \
                from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"request body: not JSON ({e})") from None
        if not isinstance(body, dict):
            raise InvalidArgument(f"request body: expected a JSON object, got "
                                  f"{type(body).__name__}")
        return body

    # -- the one middleware ------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        routing_error = request.match_info.http_exception
        if routing_error is not None:
            return error_response(MethodNotAllowed(f"{request.method} {request.path}: not "
                                                   "allowed") if routing_error.status == 405
                                  else NotFound(f"{request.path}: no such route"))
        path = request.match_info.route.resource.canonical
        if not path.startswith("/v1/"):  # the page and health: public, not counted
            return await handler(request)
        method, start, code = f"{request.method} {path}", time.perf_counter(), "OK"
        try:
            if self._token is not None and not hmac.compare_digest(bearer_token(request),
                                                                   self._token):
                raise Unauthenticated("missing or wrong bearer token")
            return await handler(request)
        except FeedbackError as exc:
            code = exc.code
            return error_response(exc)
        except Exception as exc:
            code = "INTERNAL"
            log.exception("internal error in %s", method)
            return error_response(FeedbackError(f"internal error: {type(exc).__name__}"))
        finally:
            self.metrics.requests.labels(method, code).inc()
            self.metrics.request_duration.labels(method).observe(time.perf_counter() - start)


def _int_param(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise InvalidArgument(f"{name}: expected a non-negative integer (got {value!r})")
    return number


def error_response(exc: FeedbackError) -> web.Response:
    headers = {}
    if exc.http_status in (429, 503):
        headers["Retry-After"] = "5"
    elif exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="feedback"'
    return web.json_response(error_json(exc), status=exc.http_status, headers=headers)


def bearer_token(request: web.Request) -> bytes:
    """``Authorization: Bearer <token>``, or Basic with the token as the password."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return b""
    return b""

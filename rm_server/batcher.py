"""Dynamic batching across all requests and clients.

Samples from every RPC wait in one bounded queue. :class:`BatchPolicy` (pure, no clock, no
sockets; ``batch_policy.py``) decides when a batch closes and which samples it takes;
:class:`Batcher` runs it on the event loop and hands batches to one model thread, so the loop
keeps answering (health included) during a long batch.

While the model runs a batch, the next one is due as soon as a full batch is queued, but it
takes its samples only when the model frees up (late binding): by then the queue holds
everything that arrived meanwhile, so the length grouping picks from more samples and pads
less. The hand-off starts the next batch before the finished batch's callers resume. A
partial batch waits for the model to free up (more samples may arrive meanwhile, at no cost
in latency). The anchor of each batch is the oldest sample of the fairness key served least
recently, so keys take turns (bench/RESULTS.md has the measurements behind these choices).

Model versions: every queued sample is bound to the version that will score it, and a batch
takes one version's samples (:meth:`BatchPolicy.select`); before a batch forms, ``rebind``
(rm_server/versions.py) may move unpinned samples to a new default. ``score_fn`` runs a batch
on the model thread and returns one :class:`Scored` per sample (reward, heads, version).

Work nobody can receive is not computed: a cancelled call's samples, samples whose deadline
passed, samples whose deadline passes before their batch could finish (a lower bound on the
model time: :mod:`rm_server.model_time`), and the other samples of a call that already failed
are dropped here, before the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from rm_server.batch_policy import BatchPolicy, Pending, Scored, Sink
from rm_server.errors import DeadlineExceeded, Overloaded
from rm_server.model_time import ModelTimeEstimate

GAP_EMA = 0.25  # weight of the newest gap in the running mean of gaps between calls


class Batcher:
    """Runs :class:`BatchPolicy` over a bounded queue and feeds one model thread."""

    def __init__(self, score_fn: Callable[[list[Pending]], list[Scored]], policy: BatchPolicy,
                 max_queue: int = 4096, metrics=None, clock: Callable[[], float] = time.monotonic,
                 rebind: Callable[[list[Pending]], None] | None = None):
        self.score_fn = score_fn
        self.rebind = rebind
        self.policy = policy
        self.max_queue = max_queue
        self.stream_limit = max(1, max_queue // 2)  # streams' share of the queue (backpressure)
        self.metrics = metrics
        self.clock = clock
        self.pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set when the queue has room (wakes waiting streams)
        self._in_flight: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-model")
        self._task: asyncio.Task | None = None
        self._model_slot = asyncio.Lock()
        self._served_at: dict[Hashable, int] = {}  # fairness key -> last batch that served it
        self._batch_no = 0
        self._ema_batch_seconds = 0.0
        self.model_time = ModelTimeEstimate()  # refuses only work that cannot finish
        self._mean_gap = 0.0  # running mean of the seconds between calls (BatchPolicy.ready)
        self._last_arrival: float | None = None

    # -- admission (event loop) --------------------------------------------------------------
    def submit(self, items: list[Pending]) -> None:
        """Queue all of a request's samples, or none: refuse at once when the queue is full."""
        if len(self.pending) + len(items) > self.max_queue:
            self._count_rejected("queue_full", len(items))
            retry_ms = max(10, int(1000 * self._ema_batch_seconds))
            raise Overloaded(f"overloaded: queue holds {len(self.pending)} of {self.max_queue} "
                             f"samples; retry after {retry_ms} ms", retry_ms)
        self.pending.extend(items)
        self._note_arrival()
        self._set_depth()
        self._wake.set()

    def _note_arrival(self) -> None:
        """Update the mean gap between calls (capped, so one quiet spell is forgotten within
        a few calls of the next busy one)."""
        now = self.clock()
        if self._last_arrival is not None:
            gap = min(now - self._last_arrival, 8 * self.policy.max_wait)
            self._mean_gap += GAP_EMA * (gap - self._mean_gap)
        self._last_arrival = now

    async def submit_when_room(self, items: list[Pending], timeout: float) -> None:
        """Backpressure for streams: wait (up to ``timeout``) for room in the queue.

        While a stream's reader waits here it reads no further requests, so HTTP/2 flow
        control slows the sender down instead of the whole stream failing and resubmitting.
        Streams may fill only half of the queue (``stream_limit``): waiting streams refill
        every slot the moment it frees, and without headroom a unary caller would be refused
        again and again. Half a queue is still many full batches of work.
        """
        limit = self.stream_limit if len(items) <= self.stream_limit else self.max_queue
        end = self.clock() + timeout
        while len(self.pending) + len(items) > limit and self.clock() < end:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), max(0.0, end - self.clock()))
            except asyncio.TimeoutError:
                break
        self.submit(items)

    def cancel(self, sink: Sink) -> int:
        """Drop a call's queued samples (client cancelled, deadline passed, or the call already
        failed); samples of it already in a formed batch are skipped (:meth:`_still_wanted`)."""
        sink.cancelled = True
        gone = [p for p in self.pending if p.sink is sink]
        if gone:
            self.pending = [p for p in self.pending if p.sink is not sink]
            _release(gone)
            self._count_rejected("cancelled", len(gone))
            self._set_depth()
        return len(gone)

    # -- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rm-batcher")

    async def stop(self) -> None:
        """Finish the batches in flight, then stop the loop and the model thread."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def drain(self, timeout: float) -> None:
        """Wait until the queue is empty and no batch runs (bounded by ``timeout``)."""
        end = self.clock() + timeout
        while (self.pending or self._in_flight) and self.clock() < end:
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        while True:
            self._drop_expired()
            now = self.clock()
            if self.policy.ready(self.pending, now, len(self._in_flight), self._mean_gap):
                # the model is free: take the batch now; busy: the batch takes its samples
                # when the model frees up, from the queue as it is then (late binding)
                batch = None if self._in_flight else self._take()
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._batch_done)
                continue
            self._wake.clear()
            timeout = None
            if self.pending and not self._in_flight:
                oldest = min(p.enqueued for p in self.pending)
                timeout = max(0.0, oldest + self.policy.max_wait - now)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _batch_done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    def _take(self) -> list[Pending]:
        """Select a batch (:meth:`BatchPolicy.select`) and take it off the queue."""
        if not self.pending:
            return []
        if self.rebind is not None:
            self.rebind(self.pending)
        keys = self.policy.fair_keys(self.pending)
        for key in set(keys.values()):  # a key first seen now queues behind those served
            self._served_at.setdefault(key, self._batch_no)
        anchor = min(self.pending, key=lambda p: (self._served_at[keys[id(p)]], p.enqueued))
        batch = self.policy.select(self.pending, anchor, keys)
        self._batch_no += 1
        for p in batch:
            self._served_at[keys[id(p)]] = self._batch_no
        if len(self._served_at) > 4 * self.max_queue:  # one key per peer and id: prune
            live = set(keys.values())
            self._served_at = {k: n for k, n in self._served_at.items() if k in live}
        taken = set(map(id, batch))
        self.pending = [p for p in self.pending if id(p) not in taken]
        self._set_depth()
        return batch

    async def _run_batch(self, batch: list[Pending] | None) -> None:
        """Run one batch on the model thread; ``None``: take it once the model is free."""
        async with self._model_slot:  # a batch due early waits here, not in the thread pool
            if batch is None:
                batch = self._take()
            batch = self._still_wanted(batch) if batch else []
            if not batch:
                return
            scored = await self._forward(batch)
        # the slot is free: the next batch starts before these results go out
        if scored is not None:
            self._deliver(batch, scored)

    def _still_wanted(self, batch: list[Pending]) -> list[Pending]:
        """Drop samples whose call ended while their batch waited, and samples whose deadline
        passes before this batch could finish (a lower bound on its model time, so that only
        work that cannot finish is refused): a result nobody can receive is not computed."""
        live = [p for p in batch if not p.dropped]
        if live:
            now = self.clock()
            finish = now + self.model_time.lower_bound(*self._shape(live), now)
            self._expire([p for p in live if p.deadline is not None and p.deadline <= finish])
        _release([p for p in batch if p.dropped])  # an expired sample ended its call
        return [p for p in batch if not p.dropped]

    async def _forward(self, batch: list[Pending]) -> list[Scored] | None:
        """The batch's results from the model thread; on a model fault its calls fail and
        the result is None."""
        start = self.clock()
        if self.metrics:
            for p in batch:
                self.metrics.queue_wait.observe(start - p.enqueued)
        loop = asyncio.get_running_loop()
        t0 = self.clock()
        try:
            scored = await loop.run_in_executor(self._executor, self.score_fn, batch)
        except Exception as exc:  # a model fault fails this batch's calls, not the server
            for sink, items in _by_sink(batch).items():
                self._fail(sink, exc, items)
            return None
        seconds = self.clock() - t0
        self._ema_batch_seconds = 0.8 * self._ema_batch_seconds + 0.2 * seconds
        lengths = [p.length for p in batch]
        self.model_time.observe(*self._shape(batch), seconds, self.clock())
        if self.metrics:
            self.metrics.observe_batch(lengths, seconds, self.policy.shared_tokens(batch))
        return scored

    def _shape(self, batch: list[Pending]) -> tuple[float, int]:
        """The batch as (rows, length) for the model-time estimate: its token cost (a shared
        prefix once, as the policy charges it) over its longest sample."""
        longest = max(p.length for p in batch)
        return self.policy.batch_cost(batch) / longest, longest

    def _deliver(self, batch: list[Pending], scored: list[Scored]) -> None:
        by_sink: dict[int, tuple[Sink, list]] = {}
        for p, r in zip(batch, scored):
            by_sink.setdefault(id(p.sink), (p.sink, []))[1].append((p, r))
        _release(batch)
        for sink, results in by_sink.values():
            if not sink.cancelled:
                sink.deliver(results)

    def _drop_expired(self) -> None:
        now = self.clock()
        expired = [p for p in self.pending if p.deadline is not None and p.deadline <= now]
        if not expired:
            return
        gone = set(map(id, expired))
        self.pending = [p for p in self.pending if id(p) not in gone]
        self._set_depth()
        self._expire(expired)

    def _expire(self, expired: list[Pending]) -> None:
        if not expired:
            return
        self._count_rejected("deadline", len(expired))
        for sink, items in _by_sink(expired).items():
            self._fail(sink, DeadlineExceeded(f"{len(items)} sample(s) expired in the queue"),
                       items)

    def _fail(self, sink: Sink, exc: BaseException, items: list[Pending]) -> None:
        """End a call with ``exc`` and drop its other queued samples: once a call has failed,
        nobody receives its other results (a unary call answers all or nothing; a stream ends
        at its first error)."""
        _release(items)
        if not sink.cancelled:
            sink.fail(exc, items)
            self.cancel(sink)

    def _set_depth(self) -> None:
        if len(self.pending) < self.stream_limit:
            self._room.set()
        if self.metrics:
            self.metrics.queue_depth.set(len(self.pending))

    def _count_rejected(self, reason: str, n: int) -> None:
        if self.metrics:
            self.metrics.rejected.labels(reason).inc(n)


def _release(items: list[Pending]) -> None:
    """Finished samples let go of their model version: a unary call's results and its sink
    refer to each other (sink -> results -> Pending -> sink), a cycle that only a full garbage
    collection frees, and an unloaded version's memory would wait for it."""
    for p in items:
        p.version = None


def _by_sink(items: list[Pending]) -> dict[Sink, list[Pending]]:
    out: dict = {}
    for p in items:
        out.setdefault(p.sink, []).append(p)
    return out


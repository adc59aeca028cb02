"""Where a call's results go: one sink per RPC, filled by the batcher as batches finish.

:class:`UnarySink` resolves a future once every sample of a ``Score`` call is answered;
:class:`StreamSink` queues a ``ScoreStream``'s results batch by batch and ends the stream once
its input is closed and no sample is left unanswered. Both follow the :class:`Sink` protocol of
``rm_server/batch_policy.py``; the batcher sets ``cancelled`` when the call ends early.
"""

from __future__ import annotations

import asyncio

from rm_server.batch_policy import Pending, Scored


class UnarySink:
    """Collects a unary call's results; the future resolves when every sample is answered
    (in the order batches finished: the servicer restores request order)."""

    def __init__(self, n: int):
        self.cancelled = False
        self.results: list[tuple[Pending, Scored]] = []
        self.n = n
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def deliver(self, results: list[tuple[Pending, Scored]]) -> None:
        self.results.extend(results)
        if len(self.results) == self.n and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, exc: BaseException, items: list[Pending]) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class StreamSink:
    """Queues a stream's results as batches finish; tracks ids not answered yet."""

    END = object()

    def __init__(self):
        self.cancelled = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outstanding: set[str] = set()
        self.input_closed = False

    def deliver(self, results: list[tuple[Pending, Scored]]) -> None:
        for p, _ in results:
            self.outstanding.discard(p.sample_id)
        self.queue.put_nowait(results)
        self._maybe_end()

    def fail(self, exc: BaseException, items: list[Pending]) -> None:
        self.queue.put_nowait(exc)

    def close_input(self) -> None:
        self.input_closed = True
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self.input_closed and not self.outstanding:
            self.queue.put_nowait(self.END)

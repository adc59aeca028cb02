"""Pairs to the feedback service without ever holding up a training step.

``PairSender.offer(pairs)`` appends to a bounded local buffer and returns at once; a daemon
thread sends the buffer in batches through :class:`FeedbackClient` (each call bounded by the
client's timeout). Nothing is retried: a pair that cannot be delivered (service down, queue
full) is dropped and counted, since the next step brings fresher pairs from a newer policy.

    sender = PairSender(FeedbackClient(url, token_file=...), max_buffer=1000)
    sender.offer(pairs)            # in the training loop: never blocks
    sender.counts()                # {"sent", "duplicates", "refused", "failed", "dropped"}
    sender.close()                 # at the end: deliver what is left (bounded wait)

Counts: ``sent`` queued by the service, ``duplicates`` it already had, ``refused`` turned away
by a full queue (429), ``failed`` lost to errors (unreachable, timeouts, 5xx, bad input),
``dropped`` never sent because the local buffer was full. Failures are logged once per streak.
"""

from __future__ import annotations

import collections
import logging
import threading

from feedback.client import FeedbackClient
from feedback.errors import QueueFull
from feedback.pairs import Pair

log = logging.getLogger("feedback.sender")
COUNTS = ("sent", "duplicates", "refused", "failed", "dropped")


class PairSender:
    def __init__(self, client: FeedbackClient, max_buffer: int = 1000, batch: int = 64):
        self.client, self.max_buffer, self.batch = client, max_buffer, batch
        self._buffer: collections.deque[Pair | dict] = collections.deque()
        self._cond = threading.Condition()
        self._counts = dict.fromkeys(COUNTS, 0)
        self._in_flight = 0
        self._closed = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="feedback-sender", daemon=True)
        self._thread.start()

    def offer(self, pairs: list[Pair | dict]) -> int:
        """Buffer pairs for sending; returns how many fit (the rest are counted dropped)."""
        with self._cond:
            room = 0 if self._closed else max(0, self.max_buffer - len(self._buffer))
            taken = list(pairs)[:room]
            self._buffer.extend(taken)
            self._counts["dropped"] += len(pairs) - len(taken)
            self._cond.notify()
        return len(taken)

    def counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counts)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the buffer is sent; False when time ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buffer and not self._in_flight,
                                       timeout)

    def close(self, timeout: float = 5.0) -> dict[str, int]:
        """Send what is buffered (up to ``timeout`` s), stop the thread; the final counts."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._counts["dropped"] += len(self._buffer)
            self._buffer.clear()
            self._cond.notify_all()
        self._thread.join(timeout=self.client.timeout + 1)
        return self.counts()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._buffer or self._closed)
                if self._closed:
                    return
                batch = [self._buffer.popleft() for _ in range(min(self.batch,
                                                                   len(self._buffer)))]
                self._in_flight = len(batch)
            outcome = self._send(batch)
            with self._cond:
                for key, n in outcome.items():
                    self._counts[key] += n
                self._in_flight = 0
                self._cond.notify_all()

    def _send(self, batch: list) -> dict[str, int]:
        try:
            done = self.client.enqueue(batch)
        except QueueFull:
            return {"refused": len(batch)}
        except Exception as e:  # noqa: BLE001 (a background sender must not die; counted)
            if not self._failing:
                log.warning("feedback service: %d pairs lost (%s); counting further losses "
                            "quietly until a send succeeds", len(batch), e)
            self._failing = True
            return {"failed": len(batch)}
        if self._failing:
            log.info("feedback service reachable again")
        self._failing = False
        return {"sent": len(done.queued), "duplicates": len(done.duplicates)}

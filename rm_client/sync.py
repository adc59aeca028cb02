"""The synchronous client: :class:`AsyncRewardClient` run on a private event-loop thread.

For code without an event loop (a training script, a notebook); the guarantees are the async
client's (rm_client/client.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

from protos import reward_pb2 as pb
from rm_client.client import AsyncRewardClient
from rm_client.samples import ScoreResult
from rm_client.targets import parse_targets


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

    def model_info(self, timeout: float | None = None,
                   version: str | None = None) -> pb.ModelInfo:
        return self._call(self._client.model_info(timeout, version))

    def score(self, samples: Sequence[pb.Sample], timeout: float | None = None,
              version: str | None = None) -> list[ScoreResult]:
        return self._call(self._client.score(samples, timeout, version))

    def score_all(self, samples: Sequence[pb.Sample], chunk_size: int = 64,
                  timeout: float | None = None, version: str | None = None
                  ) -> list[ScoreResult]:
        return self._call(self._client.score_all(samples, chunk_size, timeout, version))

    def score_stream(self, samples: Iterable[pb.Sample], chunk_size: int = 64,
                     timeout: float | None = None, version: str | None = None
                     ) -> Iterator[ScoreResult]:
        out: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for r in self._client.score_stream(samples, chunk_size, timeout,
                                                         version):
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

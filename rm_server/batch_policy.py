"""The batching policy: when a batch closes and which queued samples it takes (pure: no clock,
no sockets; the batcher passes the time and the queue).

A batch closes when it is full (``max_batch_size`` samples, or ``max_batch_tokens`` of padded
cost ``max_len * n``) or when its oldest sample has waited ``max_wait``; and at once when calls
arrive further apart than ``max_wait`` on average: then waiting would bring no company and only
add latency. Samples are grouped by length around an anchor (which is always taken, so nothing
starves): first-come batches of a mix of short and long samples are mostly padding, and on a
CPU they can run slower than the samples one by one. Batch slots are shared fairly among the
callers with queued samples (:meth:`BatchPolicy.fair_keys`, :meth:`BatchPolicy.quotas`).
Batches never mix model versions: a batch takes only samples bound to its anchor's version
(``Pending.version``; rm_server/versions.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol


class Sink(Protocol):
    """Where a call's results go: one per RPC (unary future or stream queue)."""

    cancelled: bool

    def deliver(self, results: list[tuple[Pending, Scored]]) -> None: ...

    def fail(self, exc: BaseException, items: list[Pending]) -> None:
        """End the call with ``exc`` (the batcher then drops the call's other samples)."""


@dataclass(eq=False)
class Pending:
    """One sample waiting for the model."""

    sample_id: str
    ids: list[int]
    sink: Sink
    enqueued: float
    deadline: float | None = None  # time.monotonic() after which the result is useless
    client: str = ""  # the caller's self-declared x-client-id
    truncated: bool = False
    peer: str = ""  # who the caller is for fairness: its verified identity or its address
    token_type_ids: list[int] | None = None  # one per id, for models with token types
    version: object = None  # the model version that will score it (rm_server/versions.py)
    pinned: bool = False  # the request named ``version``: never moved to another one
    aggregation: object = None  # the request's own aggregation of the heads (heads.py)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def dropped(self) -> bool:
        return self.sink.cancelled


@dataclass(frozen=True, slots=True)
class Scored:
    """One sample's result from the model: the reward, every head's score (empty for a model
    with one head) and the version that scored it (a ``VersionTag``; None without versions)."""

    reward: float
    heads: tuple[float, ...] = ()
    version: object = None


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_wait: float = 0.005
    max_ids_per_peer: int = 8
    """Distinct x-client-id values one peer holds among queued samples (:meth:`fair_keys`)."""

    def cost(self, lengths: list[int]) -> int:
        return max(lengths) * len(lengths) if lengths else 0

    def is_full(self, pending: list[Pending]) -> bool:
        """Would a batch formed now be closed by size or token budget?"""
        if len(pending) >= self.max_batch_size:
            return True
        return self.cost([p.length for p in pending]) >= self.max_batch_tokens

    def ready(self, pending: list[Pending], now: float, batches_in_flight: int,
              mean_gap: float = 0.0) -> bool:
        """Close a batch now? ``mean_gap``: the running mean of the seconds between calls; when
        it exceeds ``max_wait`` no company is expected within the wait, so an idle model
        takes what is queued at once."""
        if not pending or batches_in_flight >= 2:
            return False
        if self.is_full(pending):
            return True
        if batches_in_flight:
            return False
        return mean_gap > self.max_wait or now - min(p.enqueued for p in pending) >= self.max_wait

    def fair_keys(self, pending: list[Pending]) -> dict[int, Hashable]:
        """Each queued sample's fairness key, by ``id(sample)``: ``(peer, client id)``.

        The client id is self-declared: a caller that put a fresh one on every request would
        take one share per request. So each peer holds at most ``max_ids_per_peer`` ids among
        the queued samples (the first to enter the queue); its samples under any further id
        share one key, ``(peer, None)``. Inventing ids gains a peer at most
        ``max_ids_per_peer + 1`` shares, and the keys (and what the batcher keeps per key)
        stay bounded per peer. What a peer is (a verified identity, else an address) is the
        servicer's decision: :func:`rm_server.service.caller_peer`.
        """
        held: dict[str, set[str]] = {}
        keys: dict[int, Hashable] = {}
        for p in pending:  # queue order: the ids that came first keep their own key
            ids = held.setdefault(p.peer, set())
            if p.client in ids or len(ids) < self.max_ids_per_peer:
                ids.add(p.client)
                keys[id(p)] = (p.peer, p.client)
            else:
                keys[id(p)] = (p.peer, None)
        return keys

    def quotas(self, demand: dict[Hashable, int], first: Hashable) -> dict[Hashable, int]:
        """Max-min fair split of a batch's slots among keys with ``demand`` queued samples.

        Water-filling: a key that wants less than an equal share takes what it wants; the
        others split what is left, the slots that do not divide evenly going to ``first`` (the
        anchor's) and then to keys in ``demand``'s order. The quotas sum to at most
        ``max_batch_size``, so keys met early in the length walk cannot take the share of a
        key met late.
        """
        slots, quota = self.max_batch_size, {}
        left = sorted(demand, key=demand.__getitem__)  # stable: ties keep demand's order
        while left and demand[left[0]] <= slots // len(left):
            k = left.pop(0)
            quota[k] = demand[k]
            slots -= demand[k]
        share, extra = divmod(slots, len(left)) if left else (0, 0)
        rest = set(left)
        order = sorted((k for k in demand if k in rest), key=lambda k: k != first)
        for i, k in enumerate(order):
            quota[k] = share + (i < extra)
        return quota

    def select(self, pending: list[Pending], anchor: Pending | None = None,
               keys: dict[int, Hashable] | None = None) -> list[Pending]:
        """Take ``anchor`` (default: the oldest sample) and its nearest neighbours by length.

        Greedy: from the anchor, walk outwards in length order, each step taking the neighbour
        that adds the least padding (a shorter one pads itself up to the longest; a longer one
        pads every sample already taken), while size and token budget allow. Fairness: in this
        walk each key (``keys``, default :meth:`fair_keys`) fills at most its :meth:`quotas`
        share of the slots; slots still free afterwards go to anyone (work-conserving). Only
        samples bound to the anchor's model version are candidates: batches never mix versions.
        """
        keys = self.fair_keys(pending) if keys is None else keys
        anchor = anchor or min(pending, key=lambda p: p.enqueued)
        pending = [p for p in pending if p.version is anchor.version]
        order = sorted(pending, key=lambda p: (p.length, p.enqueued))
        demand = Counter(keys[id(p)] for p in pending)  # in queue order
        quota = self.quotas(demand, keys[id(anchor)])
        taken = self._walk(order, order.index(anchor), keys, quota)
        if len(demand) > 1 and len(taken) < self.max_batch_size:
            chosen = set(map(id, taken))
            if len(chosen) < len(pending):  # second pass without quotas, around the longest
                longest = max(taken, key=lambda p: p.length)
                taken = self._walk(order, order.index(longest), keys, None, must=taken)
        return taken

    def _walk(self, order: list[Pending], start: int, keys: dict[int, Hashable],
              quota: dict[Hashable, int] | None, must: list[Pending] | None = None
              ) -> list[Pending]:
        taken = list(must) if must else [order[start]]
        per_key = Counter(keys[id(p)] for p in taken)
        longest = max(p.length for p in taken)
        chosen = set(map(id, taken))
        lo, hi = start - 1, start + 1
        while len(taken) < self.max_batch_size:
            while lo >= 0 and id(order[lo]) in chosen:
                lo -= 1
            while hi < len(order) and id(order[hi]) in chosen:
                hi += 1
            n = len(taken)
            options = []  # (added padding, new cost, side)
            if lo >= 0:
                options.append((max(0, longest - order[lo].length),
                                (n + 1) * max(longest, order[lo].length), -1))
            if hi < len(order):
                nxt = order[hi].length
                options.append((max(0, nxt - longest) * n, (n + 1) * max(longest, nxt), 1))
            options = [o for o in options if o[1] <= self.max_batch_tokens]
            if not options:
                break
            _, _, side = min(options)
            i = lo if side < 0 else hi
            if side < 0:
                lo -= 1
            else:
                hi += 1
            p = order[i]
            key = keys[id(p)]
            if quota is not None and per_key[key] >= quota[key]:
                continue  # this key has its share: skip, keep walking
            per_key[key] += 1
            taken.append(p)
            chosen.add(id(p))
            longest = max(longest, p.length)
        return taken

"""The batching policy: when a batch closes and which queued samples it takes (pure: no clock,
no sockets; the batcher passes the time and the queue).

A batch closes when it is full (``max_batch_size`` samples, or ``max_batch_tokens`` of token
cost: padded, ``max_len * n``, a prefix that samples share counted once:
rm_server/prefix_plan.py) or when its oldest sample has waited ``max_wait``; and at once when
calls arrive further apart than ``max_wait`` on average: then waiting would bring no company
and only add latency. Samples are grouped by length around an anchor (which is always taken,
so nothing starves): first-come batches of a mix of short and long samples are mostly
padding, and on a CPU they can run slower than the samples one by one. Samples sharing a
prefix (k responses to one prompt, from one request or several) are kept in one batch, so
the model runs the prefix once (:meth:`BatchPolicy.select`). Batch slots are shared fairly
among the callers with queued samples (:meth:`BatchPolicy.fair_keys`, :meth:`BatchPolicy.quotas`).
Batches never mix model versions: a batch takes only samples bound to its anchor's version
(``Pending.version``; rm_server/versions.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from rm_server import prefix_plan as plan


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

    prefix_sharing: bool = True
    """Charge a shared prefix once (rm_server/prefix_plan.py); False: the padded cost."""
    min_shared_prefix: int = 16
    """Leading tokens samples must share to form a group (the model's rule)."""

    def cost(self, lengths: list[int]) -> int:
        """The padded cost, longest x n: what a batch costs when nothing in it is shared."""
        return plan.padded_cost(lengths)

    def shares(self, pending: list[Pending]) -> bool:
        """Does this policy charge shared prefixes once for these samples' model? A version
        whose model runs no shared prefix (an encoder) says so: ``Version.shares_prefix``."""
        return (self.prefix_sharing and bool(pending)
                and getattr(pending[0].version, "shares_prefix", True))

    def batch_cost(self, pending: list[Pending]) -> int:
        """The token cost of running ``pending`` as one batch (shared prefixes once)."""
        if not self.shares(pending):
            return self.cost([p.length for p in pending])
        return plan.batch_cost([p.ids for p in pending], self.min_shared_prefix)

    def shared_tokens(self, batch: list[Pending]) -> int:
        """Tokens of ``batch`` not recomputed thanks to its shared prefixes."""
        if not self.shares(batch):
            return 0
        return plan.shared_tokens([p.ids for p in batch], self.min_shared_prefix)

    def is_full(self, pending: list[Pending]) -> bool:
        """Would a batch formed now be closed by size or token budget?"""
        if len(pending) >= self.max_batch_size:
            return True
        if self.cost([p.length for p in pending]) < self.max_batch_tokens:
            return False  # sharing only lowers the cost
        return self.batch_cost(pending) >= self.max_batch_tokens

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
        pads every sample already taken), while size and token budget allow. Samples sharing a
        prefix (:mod:`rm_server.prefix_plan`) move as one unit: a group is taken whole or not
        at all, charged its prefix once; only the anchor's group, when it alone exceeds a
        budget, is cut (its oldest members first). With nothing shared every unit is one
        sample and the walk is the padded one. Fairness: in this walk each key (``keys``,
        default :meth:`fair_keys`) fills at most its :meth:`quotas` share of the slots (the
        anchor's unit aside: it is that key's turn); slots still free afterwards go to anyone
        (work-conserving). Only samples bound to the anchor's model version are candidates:
        batches never mix versions.
        """
        keys = self.fair_keys(pending) if keys is None else keys
        anchor = anchor or min(pending, key=lambda p: p.enqueued)
        pending = [p for p in pending if p.version is anchor.version]
        order = sorted(self._units(pending), key=lambda u: (u.length, u.enqueued))
        demand = Counter(keys[id(p)] for p in pending)  # in queue order
        quota = self.quotas(demand, keys[id(anchor)])
        start = next(i for i, u in enumerate(order) if anchor in u.members)
        taken = self._walk(order, [(start, self._fit(order[start], anchor))], keys, quota)
        if len(demand) > 1 and sum(len(u.members) for _, u in taken) < self.max_batch_size:
            if sum(len(u.members) for _, u in taken) < len(pending):  # again without quotas,
                longest = max((p for _, u in taken for p in u.members),  # around the longest
                              key=lambda p: p.length)
                at = next(i for i, u in enumerate(order) if longest in u.members)
                taken = self._walk(order, taken, keys, None, start=at)
        return [p for _, u in taken for p in u.members]

    def _units(self, pending: list[Pending]) -> list[Unit]:
        """The queue as units: a group sharing a prefix (members in queue order), or one sample."""
        if not self.shares(pending):
            return [Unit([p]) for p in pending]
        groups, rest = plan.group_by_prefix([p.ids for p in pending], self.min_shared_prefix)
        return ([Unit([pending[i] for i in m], prefix) for prefix, m in groups]
                + [Unit([pending[i]]) for i in rest])

    def _fit(self, unit: Unit, anchor: Pending) -> Unit:
        """The anchor's unit, cut to its oldest members (anchor first) if it alone exceeds the
        size or token budget: the anchor itself is always taken, so nothing starves."""
        if (len(unit.members) <= self.max_batch_size
                and unit.cost() <= self.max_batch_tokens) or len(unit.members) == 1:
            return unit
        members = [anchor] + sorted((p for p in unit.members if p is not anchor),
                                    key=lambda p: p.enqueued)
        k = 1
        while (k < min(len(members), self.max_batch_size)
               and Unit(members[:k + 1], unit.prefix).cost() <= self.max_batch_tokens):
            k += 1
        return Unit(members[:k], unit.prefix if k > 1 else 0)

    def _walk(self, order: list[Unit], must: list[tuple[int, Unit]], keys: dict[int, Hashable],
              quota: dict[Hashable, int] | None, start: int | None = None
              ) -> list[tuple[int, Unit]]:
        taken = list(must)
        start = must[0][0] if start is None else start
        per_key = Counter(keys[id(p)] for _, u in taken for p in u.members)
        cost = Cost.of([u for _, u in taken])
        chosen = {i for i, _ in taken}
        lo, hi = start - 1, start + 1
        while cost.n < self.max_batch_size:
            while lo >= 0 and lo in chosen:
                lo -= 1
            while hi < len(order) and hi in chosen:
                hi += 1
            options = []  # (added padding, new cost, side)
            now = cost.total
            for i, side in ((lo, -1), (hi, 1)):
                if 0 <= i < len(order) and cost.n + order[i].n <= self.max_batch_size:
                    total = cost.total_with(order[i])
                    options.append((total - now - order[i].tokens, total, side))
            options = [o for o in options if o[1] <= self.max_batch_tokens]
            if not options:
                break
            _, _, side = min(options)
            i = lo if side < 0 else hi
            if side < 0:
                lo -= 1
            else:
                hi += 1
            unit = order[i]
            wants = Counter(keys[id(p)] for p in unit.members)
            if quota is not None and any(per_key[k] + n > quota[k] for k, n in wants.items()):
                continue  # a key would exceed its share: skip, keep walking
            per_key.update(wants)
            taken.append((i, unit))
            chosen.add(i)
            cost = cost.add(unit)
        return taken


class Unit:
    """Queued samples that go into a batch together: a group sharing ``prefix`` tokens (k >= 2)
    or one sample (``prefix`` 0). Its figures are computed once: the walk reads them often."""

    __slots__ = ("members", "prefix", "length", "enqueued", "tokens", "n", "_group_cost")

    def __init__(self, members: list[Pending], prefix: int = 0):
        self.members, self.prefix, self.n = members, prefix, len(members)
        if self.n == 1 and not prefix:  # the common case, a sample alone: no lists
            self.length = self.tokens = len(members[0].ids)
            self.enqueued, self._group_cost = members[0].enqueued, 0
            return
        lengths = [len(p.ids) for p in members]
        self.length = max(lengths)
        self.enqueued = min(p.enqueued for p in members)
        self.tokens = prefix + sum(lengths) - prefix * len(members)  # its prefix once
        self._group_cost = plan.group_cost(prefix, lengths) if prefix else 0

    def cost(self) -> int:
        return self._group_cost if self.prefix else self.length * self.n


class Cost:
    """A forming batch's cost (prefix_plan's formula): its groups' costs plus its single
    samples padded to their longest."""

    __slots__ = ("groups", "singles", "longest", "n")

    def __init__(self, groups: int = 0, singles: int = 0, longest: int = 0, n: int = 0):
        self.groups, self.singles, self.longest = groups, singles, longest  # longest single
        self.n = n  # samples

    @property
    def total(self) -> int:
        return self.groups + self.singles * self.longest

    def total_with(self, unit: Unit) -> int:
        """``self.add(unit).total`` without building it (the walk's inner loop)."""
        if unit.prefix:
            return self.groups + unit._group_cost + self.singles * self.longest
        return self.groups + (self.singles + unit.n) * max(self.longest, unit.length)

    def add(self, unit: Unit) -> Cost:
        n = self.n + unit.n
        if unit.prefix:
            return Cost(self.groups + unit._group_cost, self.singles, self.longest, n)
        return Cost(self.groups, self.singles + unit.n, max(self.longest, unit.length), n)

    @classmethod
    def of(cls, units: list[Unit]) -> Cost:
        cost = cls()
        for u in units:
            cost = cost.add(u)
        return cost

"""The store interface: the comparison queue and the judgments, behind one API with two
backends, SQLite (embedded, the default: feedback/sqlite_store.py) and PostgreSQL (production:
feedback/postgres_store.py). Both run the same statements (feedback/sql.py) under the rules of
feedback/queue.py, and the same tests (tests/feedback/test_store.py, parametrized).

Every write is one transaction, and writes are serialized per store (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: a transaction-level advisory lock), so several server processes may
share one database; judgment sequence numbers are in commit order, so an exporter that reads
``after=seq`` never skips one committed later with a smaller number.

Time is an argument (``now``, Unix seconds): the server passes the clock, tests pass numbers.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field

from feedback.pairs import Judgment, Lease, Pair
from feedback.queue import Agreement


@dataclass(frozen=True)
class Enqueued:
    queued: list[str]
    """Ids of the pairs this call added."""
    duplicates: list[str]
    """Ids already in the store (from an earlier call, or twice in this one): nothing written."""
    queue_depth: int
    """Pending pairs after the call."""


@dataclass(frozen=True)
class Submitted:
    judgment: Judgment
    duplicate: bool
    """True when this lease was already answered with the same choice (nothing written)."""


@dataclass(frozen=True)
class Stats:
    queue_depth: int
    """Pairs that still want a label (leased or not)."""
    leased: int
    """Open leases."""
    done: int
    """Pairs with all their labels."""
    lease_expiries: int
    """Leases that expired unanswered, ever."""
    judgments: dict[str, int] = field(default_factory=dict)
    """Judgments per labeler."""
    agreement: Agreement = Agreement(0, 0)

    def to_json(self) -> dict:
        return {"queue_depth": self.queue_depth, "leased": self.leased, "done": self.done,
                "lease_expiries": self.lease_expiries, "judgments": self.judgments,
                "agreement": {"pairs": self.agreement.pairs, "agreed": self.agreement.agreed,
                              "ratio": self.agreement.ratio}}


@dataclass(frozen=True)
class Labeled:
    """A judgment with its pair, as export reads it."""

    judgment: Judgment
    pair: Pair


class Store(abc.ABC):
    """The queue and the judgments. Methods are blocking; the server calls them from one
    worker thread."""

    @abc.abstractmethod
    def enqueue(self, pairs: list[Pair], max_queue: int, double_label_fraction: float,
                now: float) -> Enqueued:
        """Add the pairs whose id is new, all or none: ``QueueFull`` when the pending pairs
        plus the new ones would exceed ``max_queue`` (duplicates need no room)."""

    @abc.abstractmethod
    def lease(self, labeler: str, count: int, seconds: float, now: float,
              draw_left, new_id) -> tuple[list[Lease], int]:
        """Up to ``count`` leases for ``labeler`` (its open ones first), and the leases that
        expired in passing. ``draw_left()`` gives each new lease's left side ('a'/'b'),
        ``new_id()`` its id."""

    @abc.abstractmethod
    def submit(self, lease_id: str, choice: str, now: float) -> Submitted:
        """Record the answer to a lease once (feedback/queue.py ``decide_submit``); raises
        NotFound, AlreadyAnswered or LeaseExpired."""

    @abc.abstractmethod
    def expire(self, now: float) -> int:
        """Mark open leases past their time expired; the number marked."""

    @abc.abstractmethod
    def stats(self, now: float) -> Stats:
        """Queue depth, open leases, judgments per labeler, agreement."""

    @abc.abstractmethod
    def progress(self, labeler: str) -> tuple[int, int]:
        """(queue depth, judgments this labeler has given): what the labeling page shows."""

    @abc.abstractmethod
    def labeled(self, after: int = 0, limit: int | None = None) -> Iterator[Labeled]:
        """Judgments with ``seq > after`` in sequence order, each with its pair."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_store(url: str) -> Store:
    """A store from its location: ``postgresql://...`` / ``postgres://...`` (or a libpq
    ``key=value`` string containing ``dbname=`` or ``host=``) is PostgreSQL; ``sqlite:///PATH``
    or a plain file path is SQLite (created when absent)."""
    if url.startswith(("postgresql://", "postgres://")) or (
            "=" in url and any(k in url for k in ("dbname=", "host="))):
        from feedback.postgres_store import PostgresStore

        return PostgresStore(url)
    from feedback.sqlite_store import SqliteStore

    # SQLAlchemy's spelling: sqlite:///relative.db, sqlite:////absolute/path.db
    return SqliteStore(url[len("sqlite:///"):] if url.startswith("sqlite:///") else url)

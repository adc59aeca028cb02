"""The statements both stores run: the schema, and enqueue / lease / submit / stats / export
over a DB-API cursor, under the rules of feedback/queue.py.

Written in SQL both SQLite (>= 3.35: RETURNING, partial indexes, ON CONFLICT) and PostgreSQL
accept, with ``?`` placeholders (the PostgreSQL store turns them into ``%s``) and three type
names a backend fills in (``{serial}``, ``{int}``, ``{real}``). A backend supplies
``_write()`` (a transaction holding the store's write lock) and ``_read()``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

from feedback import queue
from feedback.errors import NotFound, QueueFull
from feedback.pairs import Judgment, Lease, Pair
from feedback.store import Enqueued, Labeled, Stats, Store, Submitted

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    reward_a {real}, reward_b {real}, rm_version TEXT NOT NULL, policy_step {int},
    priority {real} NOT NULL, source TEXT NOT NULL,
    labels_wanted {int} NOT NULL, labels_done {int} NOT NULL DEFAULT 0,
    created_at {real} NOT NULL);
CREATE INDEX IF NOT EXISTS pairs_pending ON pairs (priority DESC, seq)
    WHERE labels_done < labels_wanted;
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    pair_id TEXT NOT NULL REFERENCES pairs (id),
    labeler TEXT NOT NULL,
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    leased_at {real} NOT NULL, expires_at {real} NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'answered', 'expired')));
CREATE UNIQUE INDEX IF NOT EXISTS leases_one_per_labeler ON leases (pair_id, labeler)
    WHERE state <> 'expired';
CREATE INDEX IF NOT EXISTS leases_by_state ON leases (state, expires_at);
CREATE TABLE IF NOT EXISTS judgments (
    seq {serial},
    lease_id TEXT NOT NULL UNIQUE REFERENCES leases (lease_id),
    pair_id TEXT NOT NULL REFERENCES pairs (id),
    labeler TEXT NOT NULL,
    left_side TEXT NOT NULL, choice TEXT NOT NULL, winner TEXT NOT NULL,
    judged_at {real} NOT NULL,
    UNIQUE (pair_id, labeler));
"""
PAIR_COLS = ("p.id, p.prompt, p.response_a, p.response_b, p.reward_a, p.reward_b, "
             "p.rm_version, p.policy_step, p.priority, p.source")
JUDGMENT_COLS = "j.seq, j.lease_id, j.pair_id, j.labeler, j.left_side, j.choice, j.winner, " \
                "j.judged_at"
PENDING = "p.labels_done < p.labels_wanted"
NEXT_PAIR = f"""
SELECT {PAIR_COLS} FROM pairs p
WHERE {PENDING}
  AND p.labels_done + (SELECT COUNT(*) FROM leases l
                       WHERE l.pair_id = p.id AND l.state = 'open') < p.labels_wanted
  AND NOT EXISTS (SELECT 1 FROM leases l
                  WHERE l.pair_id = p.id AND l.labeler = ? AND l.state <> 'expired')
ORDER BY p.priority DESC, p.seq
LIMIT 1"""
PAGE = 1000  # rows per fetch when exporting


def _pair(row) -> Pair:
    return Pair(*row[:8], float(row[8]), row[9])


def _judgment(row) -> Judgment:
    return Judgment(int(row[0]), *row[1:7], float(row[7]))


class SqlStore(Store):
    TYPES: dict[str, str] = {}

    @abc.abstractmethod
    def _write(self) -> contextlib.AbstractContextManager:
        """A cursor in a transaction that holds the store's write lock, committed on exit."""

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager:
        """A cursor reading one consistent snapshot."""

    def _sql(self, sql: str) -> str:
        return sql

    def _run(self, cur, sql: str, params=()) -> None:
        cur.execute(self._sql(sql), params)

    def _create_schema(self, cur) -> None:
        for statement in SCHEMA.format(**self.TYPES).split(";"):
            if statement.strip():
                self._run(cur, statement)
        self._run(cur, "SELECT value FROM feedback_meta WHERE key = 'schema_version'")
        row = cur.fetchone()
        if row is None:
            self._run(cur, "INSERT INTO feedback_meta VALUES ('schema_version', ?)",
                      (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise RuntimeError(f"feedback store schema version {row[0]}; this code reads "
                               f"{SCHEMA_VERSION}")

    # -- the queue ---------------------------------------------------------------------------
    def enqueue(self, pairs, max_queue, double_label_fraction, now) -> Enqueued:
        with self._write() as cur:
            ids = list(dict.fromkeys(p.id for p in pairs))
            known: set[str] = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                self._run(cur, f"SELECT id FROM pairs WHERE id IN ({','.join('?' * len(chunk))})",
                          chunk)
                known |= {r[0] for r in cur.fetchall()}
            new: dict[str, Pair] = {}
            duplicates = []
            for p in pairs:  # the first of an id in the call is the one queued
                if p.id in known or p.id in new:
                    duplicates.append(p.id)
                else:
                    new[p.id] = p
            depth = self._count(cur, f"SELECT COUNT(*) FROM pairs p WHERE {PENDING}")
            if new and depth + len(new) > max_queue:
                raise QueueFull(f"the queue holds {depth} pending pairs; {len(new)} more would "
                                f"pass --max-queue {max_queue}: none were queued")
            rows = [(p.id, p.prompt, p.response_a, p.response_b, p.reward_a, p.reward_b,
                     p.rm_version, p.policy_step, p.priority, p.source,
                     queue.labels_wanted(p.id, double_label_fraction), now)
                    for p in new.values()]
            if rows:
                cur.executemany(self._sql(
                    "INSERT INTO pairs (id, prompt, response_a, response_b, reward_a, reward_b, "
                    "rm_version, policy_step, priority, source, labels_wanted, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"), rows)
        return Enqueued(list(new), duplicates, depth + len(new))

    def lease(self, labeler, count, seconds, now, draw_left, new_id):
        with self._write() as cur:
            expired = self._expire(cur, now)
            self._run(cur, f"SELECT l.lease_id, l.left_side, l.leased_at, l.expires_at, "
                           f"{PAIR_COLS} FROM leases l JOIN pairs p ON p.id = l.pair_id "
                           "WHERE l.labeler = ? AND l.state = 'open' "
                           "ORDER BY l.leased_at, l.lease_id LIMIT ?", (labeler, count))
            leases = [Lease(r[0], _pair(r[4:]), labeler, r[1], r[2], r[3])
                      for r in cur.fetchall()]
            while len(leases) < count:
                self._run(cur, NEXT_PAIR, (labeler,))
                row = cur.fetchone()
                if row is None:
                    break
                lease = Lease(new_id(), _pair(row), labeler, draw_left(), now, now + seconds)
                self._run(cur, "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, 'open')",
                          (lease.lease_id, lease.pair.id, labeler, lease.left, now,
                           lease.expires_at))
                leases.append(lease)
        return leases, expired

    def submit(self, lease_id, choice, now) -> Submitted:
        with self._write() as cur:
            self._run(cur, "SELECT state, expires_at, pair_id, labeler, left_side FROM leases "
                           "WHERE lease_id = ?", (lease_id,))
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no lease {lease_id!r}")
            state, expires_at, pair_id, labeler, left = row
            recorded = self._recorded(cur, lease_id) if state == "answered" else None
            outcome = queue.decide_submit(state, expires_at, recorded and recorded.choice,
                                          choice, now)
            if outcome == "duplicate":
                return Submitted(recorded, True)
            if outcome == "expire":
                self._run(cur, "UPDATE leases SET state = 'expired' WHERE lease_id = ? "
                               "AND state = 'open'", (lease_id,))
                marked = cur.rowcount == 1
            else:
                winner = queue.winner_of(left, choice)
                self._run(cur, "INSERT INTO judgments (lease_id, pair_id, labeler, left_side, "
                               "choice, winner, judged_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                               "RETURNING seq", (lease_id, pair_id, labeler, left, choice,
                                                 winner, now))
                seq = int(cur.fetchone()[0])
                self._run(cur, "UPDATE leases SET state = 'answered' WHERE lease_id = ?",
                          (lease_id,))
                self._run(cur, "UPDATE pairs SET labels_done = labels_done + 1 WHERE id = ?",
                          (pair_id,))
                return Submitted(Judgment(seq, lease_id, pair_id, labeler, left, choice, winner,
                                          now), False)
        error = queue.expired_error(lease_id)  # after the commit: the expiry is kept
        error.marked = marked
        raise error

    def expire(self, now) -> int:
        with self._write() as cur:
            return self._expire(cur, now)

    def _expire(self, cur, now) -> int:
        self._run(cur, "UPDATE leases SET state = 'expired' WHERE state = 'open' "
                       "AND expires_at <= ?", (now,))
        return max(cur.rowcount, 0)

    def _recorded(self, cur, lease_id) -> Judgment:
        self._run(cur, f"SELECT {JUDGMENT_COLS} FROM judgments j WHERE j.lease_id = ?",
                  (lease_id,))
        return _judgment(cur.fetchone())

    def _count(self, cur, sql, params=()) -> int:
        self._run(cur, sql, params)
        return int(cur.fetchone()[0])

    # -- reading -----------------------------------------------------------------------------
    def stats(self, now) -> Stats:
        with self._read() as cur:
            depth = self._count(cur, f"SELECT COUNT(*) FROM pairs p WHERE {PENDING}")
            done = self._count(cur, f"SELECT COUNT(*) FROM pairs p WHERE NOT ({PENDING})")
            leased = self._count(cur, "SELECT COUNT(*) FROM leases WHERE state = 'open' "
                                      "AND expires_at > ?", (now,))
            expiries = self._count(cur, "SELECT COUNT(*) FROM leases WHERE state = 'expired'")
            self._run(cur, "SELECT labeler, COUNT(*) FROM judgments GROUP BY labeler "
                           "ORDER BY labeler")
            per_labeler = {name: int(n) for name, n in cur.fetchall()}
            self._run(cur, "SELECT j.pair_id, j.winner FROM judgments j JOIN pairs p "
                           "ON p.id = j.pair_id WHERE p.labels_wanted > 1 ORDER BY j.seq")
            winners: dict[str, list[str]] = {}
            for pair_id, winner in cur.fetchall():
                winners.setdefault(pair_id, []).append(winner)
        return Stats(depth, leased, done, expiries, per_labeler, queue.agreement(winners))

    def progress(self, labeler) -> tuple[int, int]:
        with self._read() as cur:
            return (self._count(cur, f"SELECT COUNT(*) FROM pairs p WHERE {PENDING}"),
                    self._count(cur, "SELECT COUNT(*) FROM judgments WHERE labeler = ?",
                                (labeler,)))

    def labeled(self, after=0, limit=None) -> Iterator[Labeled]:
        left = limit
        while left is None or left > 0:
            n = PAGE if left is None else min(PAGE, left)
            with self._read() as cur:
                self._run(cur, f"SELECT {JUDGMENT_COLS}, {PAIR_COLS} FROM judgments j "
                               "JOIN pairs p ON p.id = j.pair_id WHERE j.seq > ? "
                               "ORDER BY j.seq LIMIT ?", (after, n))
                rows = cur.fetchall()
            for row in rows:
                yield Labeled(_judgment(row[:8]), _pair(row[8:]))
            if len(rows) < n:
                return
            after = int(rows[-1][0])
            left = None if left is None else left - len(rows)

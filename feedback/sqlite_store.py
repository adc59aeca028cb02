"""The embedded store: one SQLite file in WAL mode (the default; nothing to run beside it).

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: a transaction is in the WAL file,
synced, before its commit returns, so a SIGKILL (or a power cut) loses no acknowledged write
and keeps no half of one (tests/feedback/test_crash.py kills a server mid-stream). Readers
(an export, ``sqlite3`` on the command line) never block the writer and see only committed
transactions.

Concurrency: each write is ``BEGIN IMMEDIATE`` (it takes the file's write lock at once, so two
processes never interleave a read-then-write); a busy lock is waited for up to
``busy_timeout_s``. One connection per store object, used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

from feedback.errors import StoreUnavailable
from feedback.sql import SqlStore


class SqliteStore(SqlStore):
    TYPES = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "real": "REAL"}

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False, timeout=busy_timeout_s)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {e}") from None
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal" and self.path != ":memory:":
            raise StoreUnavailable(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                                   "is it on a network file system?")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._write() as cur:
            self._create_schema(cur)

    @contextlib.contextmanager
    def _transaction(self, begin: str):
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(begin)
            except sqlite3.OperationalError as e:  # locked past busy_timeout, disk gone
                raise StoreUnavailable(f"SQLite store {self.path}: {e}") from None
            try:
                yield cur
            except BaseException:
                self._conn.rollback()
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _write(self):
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self):
        return self._transaction("BEGIN")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

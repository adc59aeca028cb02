"""The production store: PostgreSQL through a connection string (psycopg 3).

    feedback-server serve --store postgresql://feedback@db.internal:5432/feedback

Keep the password out of the command line: libpq reads ``PGPASSWORD`` or a ``~/.pgpass`` /
``PGPASSFILE`` entry. Tables are created in the connection's schema (``search_path``; pass
``?options=-csearch_path%3Dmyschema`` to pick one) on first use.

Several feedback servers may share one database: every write transaction first takes one
transaction-level advisory lock (``pg_advisory_xact_lock``), so writes run one at a time as on
SQLite, with the same statements and the same outcomes, and judgment sequence numbers (an
identity column) are committed in order. Labeling runs at human speed; one lock is far from its
limit. A lost connection is reopened on the next call; the call that saw it fails with
``StoreUnavailable`` (503: retry).
"""

from __future__ import annotations

import contextlib
import threading

import psycopg

from feedback.errors import StoreUnavailable
from feedback.sql import SqlStore

WRITE_LOCK = 0x6665656462616B  # "feedbak": the key of the store's advisory lock


class PostgresStore(SqlStore):
    TYPES = {"serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "int": "BIGINT",
             "real": "DOUBLE PRECISION"}

    def __init__(self, conninfo: str, connect_timeout_s: int = 10):
        self.conninfo = conninfo
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        with self._write() as cur:
            self._create_schema(cur)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.conninfo, autocommit=True,
                                         connect_timeout=self.connect_timeout_s)
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, first: str, params=()):
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(first, params)
                    yield cur
            except psycopg.OperationalError as e:
                raise StoreUnavailable("PostgreSQL store: " + " ".join(str(e).split())) from None

    def _write(self):
        return self._transaction("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))

    def _read(self):
        return self._transaction("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

"""The embedded state store: one SQLite file in WAL mode, shared by processes and threads.

Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single write lock up
front: read-check-write sequences (lease acquisition, marker precedence) are atomic across
processes, and a waiting writer queues for up to `busy_timeout` instead of failing at commit.
The connection is in autocommit mode (`isolation_level=None`) so that Python's sqlite3 module
never opens a transaction behind our back; reads run as single autocommitted statements.
All the queries live in `cdcengine.state.sql.SQLStateStore`; this is only the dialect.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path

from cdcengine.state.dialect import Cursor, Tx
from cdcengine.state.sql import SQLStateStore

BUSY_TIMEOUT_MS = 10_000


class SQLiteStateStore(SQLStateStore[sqlite3.Connection]):
    """A `StateStore` in one SQLite file (or `:memory:`); migrated to the latest schema on open.

    `clock` returns wall-clock epoch seconds; injectable so tests can move time.
    """

    driver_errors = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        super().__init__(clock=clock)

    def _describe(self) -> str:
        return self.path

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,  # shared by threads under the store's lock
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise self._error(exc) from exc
        return conn

    def _disconnect(self, conn: sqlite3.Connection) -> None:
        with suppress(sqlite3.Error):
            conn.close()

    def _execute(self, conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> Cursor:
        return conn.execute(sql, params)

    def _execute_many(
        self, conn: sqlite3.Connection, sql: str, rows: Iterable[Sequence[object]]
    ) -> None:
        conn.executemany(sql, rows)

    def _begin_write(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _has_table(self, tx: Tx[sqlite3.Connection], name: str) -> bool:
        row = tx.one(
            "SELECT 1 AS present FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        )
        return row is not None

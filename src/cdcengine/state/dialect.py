"""One SQL connection behind a store: serialised writes, plain reads, migrations, reconnects.

`DialectStore` is the transport half of `cdcengine.state.sql.SQLStateStore`; an engine supplies
only the small dialect below (`_connect`, `_execute`, `_begin_write`, ...). Queries are written
with `?` placeholders; a dialect with another style (psycopg's `%s`) rewrites them in `_execute`.

Concurrency model, the same for every engine:
- One connection per store object, guarded by a lock, so a store can be shared by threads.
- Every write runs in a transaction that first takes the store's single write lock (SQLite:
  `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock). Writers are thus
  serialised across threads, processes and machines, and a read-check-write sequence (lease
  acquisition, marker precedence, id allocation) is atomic without per-row locking.
- Reads take no write lock. A read that finds the connection lost reconnects and runs again once
  (reads are idempotent); a write reconnects only when the loss shows before its first
  statement, so a write is never applied twice.
- Driver exceptions never escape: they become `StateStoreError`s naming the store (a path, or a
  URL with its password masked) and chaining a cause the dialect may scrub.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, ClassVar, Generic, NoReturn, Protocol, Self, TypeVar

from cdcengine.errors import Reason, StateStoreError
from cdcengine.state.migrations import BOOTSTRAP, LATEST_VERSION, pending_migrations
from cdcengine.state.records import Row, refuse

C = TypeVar("C")  # the driver's connection type
T = TypeVar("T")


class Cursor(Protocol):
    """What the store needs of a driver cursor after `execute`."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> Any: ...


class Tx(Generic[C]):
    """One connection inside one read or write of the store: run statements written with `?`."""

    __slots__ = ("_conn", "_store")

    def __init__(self, store: DialectStore[C], conn: C) -> None:
        self._store = store
        self._conn = conn

    @property
    def conn(self) -> C:
        """The driver connection, for the few dialect statements written in its own style."""
        return self._conn

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        row: Row | None = self._store._execute(self._conn, sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(self._store._execute(self._conn, sql, params).fetchall())

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run a statement that returns no rows; the number of rows it changed."""
        return self._store._execute(self._conn, sql, params).rowcount

    def many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self._store._execute_many(self._conn, sql, rows)


class DialectStore(abc.ABC, Generic[C]):
    """One SQL connection, migrated to the latest schema on open.

    `clock` returns wall-clock epoch seconds; injectable so tests can move time. Subclasses set
    `driver_errors` and implement the dialect hooks below, then call `__init__`.
    """

    driver_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: C | None = None
        self._conn = self._connect()
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # dialect hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _describe(self) -> str:
        """The store as messages name it (a path, or a URL with the password masked)."""

    @abc.abstractmethod
    def _connect(self) -> C:
        """A new, configured connection; raises `StateStoreError` (never a driver error)."""

    @abc.abstractmethod
    def _disconnect(self, conn: C) -> None:
        """Close `conn`, ignoring errors: it may already be dead."""

    @abc.abstractmethod
    def _execute(self, conn: C, sql: str, params: Sequence[object]) -> Cursor: ...

    @abc.abstractmethod
    def _execute_many(self, conn: C, sql: str, rows: Iterable[Sequence[object]]) -> None: ...

    @abc.abstractmethod
    def _begin_write(self, conn: C) -> None:
        """Start a transaction holding the store's single write lock (waiting for it)."""

    @abc.abstractmethod
    def _commit(self, conn: C) -> None: ...

    @abc.abstractmethod
    def _rollback(self, conn: C) -> None:
        """End the open transaction, if any, ignoring errors (the connection may be dead)."""

    @abc.abstractmethod
    def _has_table(self, tx: Tx[C], name: str) -> bool: ...

    def _end_read(self, conn: C) -> None:
        """After a read: end the transaction the driver may have opened for it."""

    def _prepare_schema(self, conn: C) -> None:
        """Before the first migration, under the write lock: create what the tables live in."""

    def _usable(self, conn: C) -> bool:
        """False when the connection is known to be dead, so the next call reconnects."""
        return True

    def _lost(self, conn: C, exc: Exception) -> bool:
        """True when `exc` means the connection was lost (not a refused statement)."""
        return False

    def _error(self, exc: Exception) -> StateStoreError:
        return StateStoreError(f"state store {self._describe()}: {exc}")

    def _cause(self, exc: Exception) -> BaseException:
        """What to chain under the `StateStoreError`; a subclass may hand a scrubbed copy."""
        return exc

    # plumbing ---------------------------------------------------------------------------------

    def _raise(self, exc: Exception) -> NoReturn:
        err = self._error(exc)
        try:
            raise err from self._cause(exc)
        finally:
            # nothing but the chosen cause: the original may hold a connection (and its DSN)
            err.__context__ = None

    def _live(self) -> C:
        if self._conn is None:
            raise refuse(f"state store {self._describe()} is closed", Reason.STATE_STORE_FAILED)
        if not self._usable(self._conn):
            return self._reconnect()
        return self._conn

    def _reconnect(self) -> C:
        old, self._conn = self._conn, None
        if old is not None:
            self._disconnect(old)
        self._conn = self._connect()
        return self._conn

    def _read(self, fn: Callable[[Tx[C]], T]) -> T:
        """`fn` run on the connection outside any write lock; retried once on a lost one."""
        with self._lock:
            for retry in (False, True):
                conn = self._live()
                try:
                    result = fn(Tx(self, conn))
                except self.driver_errors as exc:
                    self._rollback(conn)
                    if retry or not self._lost(conn, exc):
                        self._raise(exc)
                    self._reconnect()
                    continue
                except BaseException:
                    self._rollback(conn)
                    raise
                self._end_read(conn)
                return result
        raise AssertionError("unreachable")

    def _begin(self) -> C:
        """The live connection, in a write transaction holding the write lock."""
        for retry in (False, True):
            conn = self._live()
            try:
                self._begin_write(conn)
                return conn
            except self.driver_errors as exc:
                self._rollback(conn)  # e.g. a lock timeout leaves PostgreSQL's transaction aborted
                if retry or not self._lost(conn, exc):
                    raise
                self._reconnect()  # nothing was written yet: safe to start over
        raise AssertionError("unreachable")

    @contextmanager
    def _write(self) -> Iterator[Tx[C]]:
        """A serialised write transaction: committed if the body returns, else rolled back."""
        with self._lock:
            try:
                conn = self._begin()
                try:
                    yield Tx(self, conn)
                    self._commit(conn)
                except BaseException:
                    self._rollback(conn)
                    raise
            except self.driver_errors as exc:
                self._raise(exc)

    def _version(self, tx: Tx[C]) -> int | None:
        if not self._has_table(tx, "schema_migrations"):
            return None
        row = tx.one("SELECT MAX(version) AS version FROM schema_migrations")
        return None if row is None or row["version"] is None else int(row["version"])

    def _migrate(self) -> None:
        """Bring the schema to `LATEST_VERSION`; a no-op (and no write lock) when already there."""
        if self._read(self._version) == LATEST_VERSION:
            return
        with self._write() as tx:
            self._prepare_schema(tx.conn)
            tx.run(BOOTSTRAP)
            for migration in pending_migrations(self._version(tx)):
                for statement in migration.statements:
                    tx.run(statement)
                tx.run(
                    "INSERT INTO schema_migrations (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, self._clock()),
                )

    def close(self) -> None:
        """Close the connection; later calls raise `StateStoreError`. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._disconnect(self._conn)
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

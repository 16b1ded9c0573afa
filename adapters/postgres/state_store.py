"""The PostgreSQL state store: several daemons, on one machine or many, share one config and one
state database without two of them ever streaming the same source.

`[engine] state = "postgresql://user:password@host:5432/dbname?schema=cdcengine"`

- `schema` (optional, default `cdcengine`) names the schema that holds the store's tables. It is
  cdcengine's own URL parameter and is removed before libpq sees the URL; every other parameter
  (`sslmode`, `connect_timeout`, ...) is libpq's. The schema is created on first open when
  missing, which needs CREATE on the database once; after that the user needs only USAGE and
  CREATE on the schema and rights on its tables. Every session sets `search_path` to it, so the
  migrations' unqualified SQL lands there. An `options=-csearch_path=...` in the URL is
  overridden: `?schema=` is the one way to choose.
- The queries, the migrations and every rule are those of the SQLite store
  (`cdcengine.state.sql.SQLStateStore`); this module is only the dialect.
- Writes are serialised like SQLite's single write lock: each write transaction starts with
  `pg_advisory_xact_lock(<cdcengine>, <hash of the schema>)`, so a read-check-write sequence
  (lease acquisition above all) is atomic across processes and machines, and the lock goes with
  the transaction, even when the client dies. Transactions run at READ COMMITTED on purpose:
  each statement after the lock sees everything committed before it was granted (REPEATABLE
  READ would read from a snapshot taken while still waiting for it). A writer waits for the lock
  at most `LOCK_TIMEOUT_MS`, like SQLite's busy timeout.
- Leases compare epoch seconds from the callers' clocks, so hosts sharing a store need roughly
  synchronised clocks (NTP); a lease's dead holder is taken over early only when it ran on this
  host (its pid is gone), otherwise the lease's expiry decides.
- One connection per store, autocommit off, one transaction per operation (reads end theirs at
  once, so no session idles in a transaction), guarded by a lock so threads can share the store.
  A read that finds the connection lost reconnects and runs again once; a write reconnects only
  when the loss shows before its first statement, so it is never applied twice.
- Messages name the store by its URL with the password masked (`cdcengine.secrets.mask_dsn`);
  driver text is scrubbed and chained causes never hold the connection (whose repr shows the
  password).
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any, TypeAlias
from urllib.parse import unquote

import psycopg
from psycopg import errors as pge
from psycopg import sql
from psycopg.rows import dict_row

from cdcengine.errors import CDCError, Reason, StateStoreError
from cdcengine.secrets import dsn_password, mask_dsn, scrub
from cdcengine.state.dialect import Cursor, Tx
from cdcengine.state.sql import SQLStateStore
from cdcengine_postgres.connection import connect
from cdcengine_postgres.errors import _safe_cause, classify_postgres_error

__all__ = ["DEFAULT_SCHEMA", "PostgresStateStore", "split_schema"]

DEFAULT_SCHEMA = "cdcengine"
LOCK_TIMEOUT_MS = 10_000  # as long as the SQLite store's busy timeout
APPLICATION_NAME = "cdcengine-state"
_LOCK_NAMESPACE = 0x63646365  # "cdce": first key of the two-int advisory lock, ours alone
_MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1: a longer schema name would be cut silently

_CONNECT_FIX = (
    "Check the [engine] state URL (host, port, user, password, database): the server must be "
    "running and accept this machine, and the database must exist. Percent-encode special "
    "characters in the password (e.g. % as %25, @ as %40)."
)
Connection: TypeAlias = psycopg.Connection[Any]


def split_schema(url: str) -> tuple[str, str | None]:
    """`url` without its `schema` query parameter (for libpq, which would refuse it), and the
    schema it named (percent-decoded), or None.

    The query starts at the first '?' after the first '@' (libpq ends the user info there), so a
    raw '?' in a password is never mistaken for it.
    """
    at = url.find("@")
    start = url.find("?", at + 1 if at >= 0 else 0)
    if start < 0:
        return url, None
    kept: list[str] = []
    schema: str | None = None
    for part in url[start + 1 :].split("&"):
        key, _, value = part.partition("=")
        if unquote(key) == "schema":
            schema = unquote(value)
        elif part:
            kept.append(part)
    base = url[:start]
    return (f"{base}?{'&'.join(kept)}" if kept else base), schema


@functools.lru_cache(maxsize=512)
def _pg(query: str) -> str:
    """A `?`-placeholder query in psycopg's `%s` style (a literal `%` doubled first). Queries are
    the store's own constants, never built from input (mypy treats `str` as `LiteralString`)."""
    return query.replace("%", "%%").replace("?", "%s")


def _lock_key(schema: str) -> int:
    """The advisory lock's second key: the schema's CRC-32 as a signed int4, so stores in two
    schemas of one database do not serialise each other."""
    crc = zlib.crc32(schema.encode())
    return crc - 2**32 if crc >= 2**31 else crc


class PostgresStateStore(SQLStateStore[Connection]):
    """A `StateStore` in a schema of a PostgreSQL database; migrated to the latest schema on open.

    `url` is a `postgresql://` URL, optionally with `?schema=` (see the module docstring); a
    `schema` argument wins over it. `clock` returns wall-clock epoch seconds (tests move it).
    Raises `StateStoreError` when the server cannot be reached or the schema not prepared.
    """

    driver_errors = (psycopg.Error,)

    def __init__(
        self, url: str, *, schema: str | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.url = mask_dsn(url)
        dsn, url_schema = split_schema(url)
        chosen = schema if schema is not None else url_schema
        self.schema = DEFAULT_SCHEMA if chosen is None else chosen
        if not self.schema or len(self.schema.encode()) > _MAX_IDENTIFIER_BYTES:
            raise StateStoreError(
                f"state store {self.url}: the schema name must be 1 to "
                f"{_MAX_IDENTIFIER_BYTES} bytes, got {self.schema!r}",
                reason=Reason.CONFIG_INVALID,
                retryable=False,
            )
        self._dsn = dsn
        password = dsn_password(url)
        self._secrets = (password,) if password else ()
        self._lock_key = _lock_key(self.schema)
        super().__init__(clock=clock)

    # dialect ----------------------------------------------------------------------------------

    def _describe(self) -> str:
        return self.url

    def _connect(self) -> Connection:
        try:
            conn = connect(self._dsn, autocommit=False, application_name=APPLICATION_NAME)
        except CDCError as err:
            raise StateStoreError(
                f"cannot connect to the PostgreSQL state store {self.url}: {err.message}",
                retryable=err.retryable,
                fix=_CONNECT_FIX,
            ) from err
        try:
            # READ COMMITTED whatever the server's default: see the module docstring.
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{LOCK_TIMEOUT_MS}ms"])
            conn.commit()
        except psycopg.Error as exc:
            self._disconnect(conn)
            self._raise(exc)
        return conn

    def _disconnect(self, conn: Connection) -> None:
        with suppress(psycopg.Error):
            conn.close()

    def _execute(self, conn: Connection, query: str, params: Sequence[object]) -> Cursor:
        cur = conn.cursor(row_factory=dict_row)
        cur.execute(_pg(query), params)
        return cur

    def _execute_many(
        self, conn: Connection, query: str, rows: Iterable[Sequence[object]]
    ) -> None:
        batch = list(rows)
        if batch:
            with conn.cursor() as cur:
                cur.executemany(_pg(query), batch)

    def _begin_write(self, conn: Connection) -> None:
        # autocommit is off: this first statement opens the transaction, and the lock is held
        # until it commits or rolls back.
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s::int4, %s::int4)", [_LOCK_NAMESPACE, self._lock_key]
        )

    def _commit(self, conn: Connection) -> None:
        conn.commit()

    def _rollback(self, conn: Connection) -> None:
        with suppress(psycopg.Error):
            conn.rollback()

    def _end_read(self, conn: Connection) -> None:
        self._rollback(conn)  # a read changed nothing; ending it frees the snapshot at once

    def _usable(self, conn: Connection) -> bool:
        return not (conn.closed or conn.broken)

    def _lost(self, conn: Connection, exc: Exception) -> bool:
        return bool(conn.closed or conn.broken)

    def _has_table(self, tx: Tx[Connection], name: str) -> bool:
        row = tx.one(
            "SELECT 1 AS present FROM pg_catalog.pg_tables WHERE schemaname = ? AND tablename = ?",
            (self.schema, name),
        )
        return row is not None

    def _prepare_schema(self, conn: Connection) -> None:
        # Look first: CREATE SCHEMA IF NOT EXISTS checks the CREATE right on the database even
        # when the schema exists, and an operator may have created it for a less privileged user.
        found = conn.execute(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", [self.schema]
        ).fetchone()
        if found is None:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
            )

    def _error(self, exc: Exception) -> StateStoreError:
        text = str(exc).strip().splitlines()
        detail = scrub(text[0], self._secrets) if text else type(exc).__name__
        sqlstate = getattr(exc, "sqlstate", None)
        code = type(exc).__name__ + (f" {sqlstate}" if sqlstate else "")
        message = f"state store {self.url}: {detail} ({code})"
        if isinstance(exc, pge.InsufficientPrivilege):
            return StateStoreError(
                message,
                retryable=False,
                fix=(
                    f"Let the state store's user create and use schema {self.schema!r}: "
                    f"CREATE SCHEMA IF NOT EXISTS \"{self.schema}\" AUTHORIZATION <user> (as an "
                    "owner of the database), or GRANT CREATE ON DATABASE <db> TO <user>."
                ),
            )
        classified = classify_postgres_error(exc)
        return StateStoreError(
            message, retryable=True if classified is None else classified.retryable
        )

    def _cause(self, exc: Exception) -> BaseException:
        if isinstance(exc, psycopg.Error):
            return _safe_cause(exc, self._secrets)
        return exc

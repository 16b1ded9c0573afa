"""The embedded state store: one SQLite file in WAL mode, shared by processes and threads.

Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single write lock up
front: read-check-write sequences (lease acquisition, marker precedence) are atomic across
processes, and a waiting writer queues for up to `busy_timeout` instead of failing at commit.
One connection per store object, guarded by a lock, so a store can be shared by a daemon's threads.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from cdcengine.errors import LeaseHeld, Reason, StateStoreError
from cdcengine.state.base import (
    SETTING_KEYS,
    ChunkState,
    Lease,
    Marker,
    SettingValue,
    SnapshotChunkRecord,
    SnapshotProgress,
    SourceRecord,
    SourceState,
    TableRecord,
    TableState,
    hold_lease,
    holder_gone,
    lease_held_message,
)
from cdcengine.state.migrations import BOOTSTRAP, LATEST_VERSION, pending_migrations

BUSY_TIMEOUT_MS = 10_000
MAX_LSN = 2**63 - 1  # BIGINT; a real LSN never comes near it
# states a caller may set directly; the others follow from enable/disable and the markers
_SETTABLE = frozenset(
    {SourceState.SNAPSHOTTING, SourceState.STREAMING, SourceState.WARNING, SourceState.ERROR}
)


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def _refuse(message: str, reason: Reason = Reason.CONFIG_INVALID) -> StateStoreError:
    """An error for a call the store refuses on purpose; retrying the same call cannot help."""
    return StateStoreError(message, reason=reason, retryable=False)


def _marker(row: sqlite3.Row, kind: str) -> Marker | None:
    if row[f"{kind}_reason"] is None:
        return None
    return Marker(
        reason=row[f"{kind}_reason"], message=row[f"{kind}_message"], at=_dt(row[f"{kind}_at"])
    )


def _source(row: sqlite3.Row) -> SourceRecord:
    return SourceRecord(
        name=row["name"],
        state=SourceState(row["state"]),
        enabled=bool(row["enabled"]),
        management_mode=row["management_mode"],
        slot_name=row["slot_name"],
        publication_name=row["publication_name"],
        consistent_point=row["consistent_point"],
        system_identifier=row["system_identifier"],
        timeline=row["timeline"],
        enabled_at=None if row["enabled_at"] is None else _dt(row["enabled_at"]),
        updated_at=_dt(row["updated_at"]),
        broken=_marker(row, "broken"),
        paused=_marker(row, "paused"),
    )


def _table(row: sqlite3.Row) -> TableRecord:
    return TableRecord(
        source=row["source"],
        name=row["name"],
        mode=row["mode"],
        state=TableState(row["state"]),
        reason=row["reason"],
        remedy=row["remedy"],
        updated_at=_dt(row["updated_at"]),
    )


def _chunk(row: sqlite3.Row) -> SnapshotChunkRecord:
    return SnapshotChunkRecord(
        chunk_id=int(row["chunk_id"]),
        attempt=int(row["attempt"]),
        leaf=row["leaf"],
        lo=row["lo"],
        hi=row["hi"],
        estimated_rows=int(row["estimated_rows"]),
        state=ChunkState(row["state"]),
        rows=int(row["rows_copied"]),
        lsn=None if row["lsn"] is None else int(row["lsn"]),
        updated_at=_dt(row["updated_at"]),
    )


def _progress(row: sqlite3.Row) -> SnapshotProgress:
    return SnapshotProgress(
        attempt=int(row["attempt"]),
        resumed=bool(row["resumed"]),
        chunks_total=int(row["chunks_total"]),
        chunks_done=int(row["chunks_done"]),
        rows_total=int(row["rows_total"]),
        rows_done=int(row["rows_done"]),
        rows_copied=int(row["rows_copied"]),
        rows_per_s=row["rows_per_s"],
        eta_s=row["eta_s"],
        finished=bool(row["finished"]),
        started_at=_dt(row["started_at"]),
        updated_at=_dt(row["updated_at"]),
    )


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(
        source=row["source"],
        holder=row["holder"],
        purpose=row["purpose"],
        host=row["host"],
        pid=row["pid"],
        acquired_at=_dt(row["acquired_at"]),
        expires_at=_dt(row["expires_at"]),
    )


class SQLiteStateStore:
    """A `StateStore` in one SQLite file (or `:memory:`); migrated to the latest schema on open.

    `clock` returns wall-clock epoch seconds; injectable so tests can move time.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        try:
            with self._read() as c:
                c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                c.execute("PRAGMA foreign_keys = ON")
                c.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except BaseException:
            self.close()
            raise

    # plumbing ---------------------------------------------------------------------------------

    def _error(self, exc: sqlite3.Error) -> StateStoreError:
        return StateStoreError(f"state store {self.path}: {exc}")

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise _refuse(f"state store {self.path} is closed", Reason.STATE_STORE_FAILED)
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._live()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A `BEGIN IMMEDIATE` transaction: committed if the body returns, else rolled back."""
        with self._lock:
            conn = self._live()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    def _version(self, conn: sqlite3.Connection) -> int | None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        if exists is None:
            return None
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return None if row[0] is None else int(row[0])

    def _migrate(self) -> None:
        """Bring the schema to `LATEST_VERSION`; a no-op (and no write lock) when already there."""
        with self._read() as conn:
            if self._version(conn) == LATEST_VERSION:
                return
        with self._write() as conn:
            conn.execute(BOOTSTRAP)
            for migration in pending_migrations(self._version(conn)):
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, self._clock()),
                )

    def close(self) -> None:
        """Close the connection; later calls raise `StateStoreError`. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SQLiteStateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # install id -------------------------------------------------------------------------------

    def install_id(self) -> str:
        """This install's id, created once; it marks the publications and slots we own."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'install_id'").fetchone()
        if row is not None:
            return str(row[0])
        with self._write() as conn:  # re-check under the write lock: another process may win
            row = conn.execute("SELECT value FROM meta WHERE key = 'install_id'").fetchone()
            if row is not None:
                return str(row[0])
            new_id = uuid.uuid4().hex
            conn.execute("INSERT INTO meta (key, value) VALUES ('install_id', ?)", (new_id,))
            return new_id

    # sources ----------------------------------------------------------------------------------

    def _get(self, conn: sqlite3.Connection, name: str) -> SourceRecord:
        row = conn.execute("SELECT * FROM sources WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise _refuse(
                f"source {name!r} is not recorded in the state store", Reason.UNKNOWN_SOURCE
            )
        return _source(row)

    def _get_enabled(self, conn: sqlite3.Connection, name: str) -> SourceRecord:
        record = self._get(conn, name)
        if not record.enabled:
            raise _refuse(f"source {name!r} is not enabled", Reason.NOT_ENABLED)
        return record

    def _running_state(self, conn: sqlite3.Connection, name: str) -> SourceState:
        """Where a source resumes after a marker clears: snapshotting while any table still needs
        its snapshot, streaming otherwise."""
        row = conn.execute(
            "SELECT 1 FROM source_tables WHERE source = ? AND state IN (?, ?)",
            (name, TableState.PENDING, TableState.SNAPSHOTTING),
        ).fetchone()
        return SourceState.SNAPSHOTTING if row is not None else SourceState.STREAMING

    def _update(self, conn: sqlite3.Connection, name: str, **columns: object) -> SourceRecord:
        assigns = ", ".join(f"{column} = ?" for column in columns)  # names are ours, never input
        conn.execute(
            f"UPDATE sources SET {assigns}, updated_at = ? WHERE name = ?",  # noqa: S608
            (*columns.values(), self._clock(), name),
        )
        return self._get(conn, name)

    def get_source(self, name: str) -> SourceRecord | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM sources WHERE name = ?", (name,)).fetchone()
        return None if row is None else _source(row)

    def list_sources(self) -> list[SourceRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM sources ORDER BY name").fetchall()
        return [_source(row) for row in rows]

    def record_enabled(
        self,
        name: str,
        *,
        management_mode: str,
        slot_name: str,
        publication_name: str,
        consistent_point: int | None,
        system_identifier: str | None,
        timeline: int | None,
        tables: Mapping[str, str],
    ) -> SourceRecord:
        """After this the source is enabled and snapshotting with exactly `tables`, all pending,
        and no marker: what `enable` (or `repair`) provisioned is the new starting point."""
        if consistent_point is not None and not 0 <= consistent_point <= MAX_LSN:
            raise _refuse(f"consistent point {consistent_point} is not a valid LSN")
        now = self._clock()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO sources (name, state, enabled, management_mode, slot_name,"
                " publication_name, consistent_point, system_identifier, timeline, enabled_at,"
                " updated_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET state = excluded.state, enabled = 1,"
                " management_mode = excluded.management_mode, slot_name = excluded.slot_name,"
                " publication_name = excluded.publication_name,"
                " consistent_point = excluded.consistent_point,"
                " system_identifier = excluded.system_identifier, timeline = excluded.timeline,"
                " enabled_at = excluded.enabled_at, updated_at = excluded.updated_at,"
                " broken_reason = NULL, broken_message = NULL, broken_at = NULL,"
                " paused_reason = NULL, paused_message = NULL, paused_at = NULL",
                (
                    name,
                    SourceState.SNAPSHOTTING,
                    management_mode,
                    slot_name,
                    publication_name,
                    consistent_point,
                    system_identifier,
                    timeline,
                    now,
                    now,
                ),
            )
            conn.execute("DELETE FROM source_tables WHERE source = ?", (name,))
            conn.executemany(
                "INSERT INTO source_tables (source, name, mode, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(name, table, mode, TableState.PENDING, now) for table, mode in tables.items()],
            )
            return self._get(conn, name)

    def record_disabled(self, name: str) -> SourceRecord:
        """After this the source is disabled with no markers, tables or setting overrides, so a
        later enable starts clean; the row stays, remembering the names last provisioned."""
        with self._write() as conn:
            self._get(conn, name)
            conn.execute("DELETE FROM source_tables WHERE source = ?", (name,))
            conn.execute("DELETE FROM settings WHERE source = ?", (name,))
            return self._update(
                conn,
                name,
                state=SourceState.DISABLED,
                enabled=0,
                broken_reason=None,
                broken_message=None,
                broken_at=None,
                paused_reason=None,
                paused_message=None,
                paused_at=None,
            )

    def set_source_state(self, name: str, state: SourceState) -> SourceRecord:
        """Set a running state (snapshotting, streaming, warning, error) of an enabled source.

        Refused while a broken or paused marker is set, so a late lag check of a daemon thread
        cannot hide a source that needs an operator; only the marker calls lift those states.
        """
        if state not in _SETTABLE:
            raise _refuse(f"state {state!r} is set by enable/disable or the marker calls")
        with self._write() as conn:
            record = self._get_enabled(conn, name)
            for marker in (record.broken, record.paused):
                if marker is not None:
                    raise _refuse(
                        f"source {name!r} is {record.state} ({marker.reason}): clear that first",
                        Reason.STATE_STORE_FAILED,
                    )
            return self._update(conn, name, state=state)

    def set_broken(self, name: str, reason: str, message: str) -> SourceRecord:
        """The source is broken until `repair` (or `clear_broken`); the marker says why."""
        with self._write() as conn:
            self._get_enabled(conn, name)
            return self._update(
                conn,
                name,
                state=SourceState.BROKEN,
                broken_reason=reason,
                broken_message=message,
                broken_at=self._clock(),
            )

    def clear_broken(self, name: str) -> SourceRecord:
        """The broken marker is gone; the source is paused if it also carries a pause, else it
        resumes (snapshotting or streaming, from its tables). No-op when it was not broken."""
        with self._write() as conn:
            record = self._get(conn, name)
            if record.broken is None:
                return record
            state = SourceState.PAUSED if record.paused else self._running_state(conn, name)
            return self._update(
                conn, name, state=state, broken_reason=None, broken_message=None, broken_at=None
            )

    def set_paused(self, name: str, reason: str, message: str) -> SourceRecord:
        """The source is paused until `resume`; if it is also broken it stays broken (a repair
        is needed first) but the pause is remembered."""
        with self._write() as conn:
            record = self._get_enabled(conn, name)
            state = SourceState.BROKEN if record.broken else SourceState.PAUSED
            return self._update(
                conn,
                name,
                state=state,
                paused_reason=reason,
                paused_message=message,
                paused_at=self._clock(),
            )

    def clear_paused(self, name: str) -> SourceRecord:
        """The pause marker is gone; a paused source resumes, a broken one stays broken."""
        with self._write() as conn:
            record = self._get(conn, name)
            if record.paused is None:
                return record
            state = SourceState.BROKEN if record.broken else self._running_state(conn, name)
            return self._update(
                conn, name, state=state, paused_reason=None, paused_message=None, paused_at=None
            )

    # tables -----------------------------------------------------------------------------------

    def _get_table(self, conn: sqlite3.Connection, source: str, table: str) -> TableRecord:
        row = conn.execute(
            "SELECT * FROM source_tables WHERE source = ? AND name = ?", (source, table)
        ).fetchone()
        if row is None:
            raise _refuse(f"table {table!r} is not recorded for source {source!r}")
        return _table(row)

    def list_tables(self, source: str) -> list[TableRecord]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM source_tables WHERE source = ? ORDER BY name", (source,)
            ).fetchall()
        return [_table(row) for row in rows]

    def upsert_table(self, source: str, table: str, mode: str) -> TableRecord:
        """The table is recorded with `mode`; a new one starts pending, a known one keeps its
        state (a mode change alone does not re-snapshot)."""
        with self._write() as conn:
            self._get(conn, source)
            conn.execute(
                "INSERT INTO source_tables (source, name, mode, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (source, name) DO UPDATE"
                " SET mode = excluded.mode, updated_at = excluded.updated_at",
                (source, table, mode, TableState.PENDING, self._clock()),
            )
            return self._get_table(conn, source, table)

    def set_table_state(
        self,
        source: str,
        table: str,
        state: TableState,
        *,
        reason: str | None = None,
        remedy: str | None = None,
    ) -> TableRecord:
        """The table is in `state`; reason and remedy are replaced (cleared when not given), so a
        stopped table's explanation never outlives the stop. A stop needs a reason."""
        if state is TableState.STOPPED and not reason:
            raise _refuse(f"stopping table {table!r} needs a reason")
        with self._write() as conn:  # an unknown table updates nothing and fails the re-read
            conn.execute(
                "UPDATE source_tables SET state = ?, reason = ?, remedy = ?, updated_at = ?"
                " WHERE source = ? AND name = ?",
                (state, reason, remedy, self._clock(), source, table),
            )
            return self._get_table(conn, source, table)

    def remove_table(self, source: str, table: str) -> None:
        """The table is no longer recorded for the source. Idempotent."""
        with self._write() as conn:
            conn.execute("DELETE FROM source_tables WHERE source = ? AND name = ?", (source, table))

    # snapshot progress (display only) -------------------------------------------------------

    def record_snapshot_plan(
        self, source: str, table: str, chunks: Sequence[SnapshotChunkRecord]
    ) -> None:
        """Replace the table's chunk records with `chunks` (a new or resumed attempt)."""
        now = self._clock()
        with self._write() as conn:
            conn.execute(
                "DELETE FROM snapshot_chunks WHERE source = ? AND table_name = ?", (source, table)
            )
            conn.executemany(
                "INSERT INTO snapshot_chunks (source, table_name, chunk_id, attempt, leaf, lo, hi,"
                " estimated_rows, state, rows_copied, lsn, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (source, table, c.chunk_id, c.attempt, c.leaf, c.lo, c.hi, c.estimated_rows,
                     str(c.state), c.rows, c.lsn, now)
                    for c in chunks
                ],
            )

    def update_snapshot_chunk(
        self,
        source: str,
        table: str,
        chunk_id: int,
        *,
        state: ChunkState,
        rows: int,
        lsn: int | None = None,
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE snapshot_chunks SET state = ?, rows_copied = ?, lsn = ?, updated_at = ?"
                " WHERE source = ? AND table_name = ? AND chunk_id = ?",
                (str(ChunkState(state)), rows, lsn, self._clock(), source, table, chunk_id),
            )

    def list_snapshot_chunks(self, source: str, table: str) -> list[SnapshotChunkRecord]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM snapshot_chunks WHERE source = ? AND table_name = ?"
                " ORDER BY chunk_id",
                (source, table),
            ).fetchall()
        return [_chunk(row) for row in rows]

    def set_snapshot_progress(self, source: str, table: str, progress: SnapshotProgress) -> None:
        p = progress
        with self._write() as conn:
            conn.execute(
                "INSERT INTO snapshot_progress (source, table_name, attempt, resumed,"
                " chunks_total, chunks_done, rows_total, rows_done, rows_copied, rows_per_s,"
                " eta_s, finished, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, table_name) DO UPDATE SET attempt = excluded.attempt,"
                " resumed = excluded.resumed, chunks_total = excluded.chunks_total,"
                " chunks_done = excluded.chunks_done, rows_total = excluded.rows_total,"
                " rows_done = excluded.rows_done, rows_copied = excluded.rows_copied,"
                " rows_per_s = excluded.rows_per_s, eta_s = excluded.eta_s,"
                " finished = excluded.finished, started_at = excluded.started_at,"
                " updated_at = excluded.updated_at",
                (source, table, p.attempt, int(p.resumed), p.chunks_total, p.chunks_done,
                 p.rows_total, p.rows_done, p.rows_copied, p.rows_per_s, p.eta_s,
                 int(p.finished), p.started_at.timestamp(), p.updated_at.timestamp()),
            )

    def get_snapshot_progress(self, source: str, table: str) -> SnapshotProgress | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM snapshot_progress WHERE source = ? AND table_name = ?",
                (source, table),
            ).fetchone()
        return None if row is None else _progress(row)

    # settings overrides -----------------------------------------------------------------------

    def set_setting(self, source: str, key: str, value: bool | int) -> SettingValue:
        """The override wins over the config file until cleared or the source is disabled.

        Settings may change before the first enable, so an unknown source is recorded (disabled).
        Values are stored as JSON so a bool reads back as a bool, not as 1.
        """
        if key not in SETTING_KEYS:
            raise _refuse(
                f"{key!r} cannot be overridden; allowed: {', '.join(sorted(SETTING_KEYS))}"
            )
        wants_bool = key == "auto_drop_slot"
        if isinstance(value, bool) != wants_bool or not isinstance(value, int):
            raise _refuse(
                f"{key} must be {'a bool' if wants_bool else 'an integer'}, got {value!r}"
            )
        now = self._clock()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO sources (name, state, enabled, updated_at) VALUES (?, ?, 0, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (source, SourceState.DISABLED, now),
            )
            conn.execute(
                "INSERT INTO settings (source, key, value, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (source, key) DO UPDATE"
                " SET value = excluded.value, updated_at = excluded.updated_at",
                (source, key, json.dumps(value), now),
            )
        return SettingValue(value=value, updated_at=_dt(now))

    def clear_setting(self, source: str, key: str) -> None:
        """The config file's value applies again. Idempotent."""
        with self._write() as conn:
            conn.execute("DELETE FROM settings WHERE source = ? AND key = ?", (source, key))

    def get_settings(self, source: str) -> dict[str, SettingValue]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key, value, updated_at FROM settings WHERE source = ? ORDER BY key",
                (source,),
            ).fetchall()
        return {
            row["key"]: SettingValue(
                value=json.loads(row["value"]), updated_at=_dt(row["updated_at"])
            )
            for row in rows
        }

    # leases -----------------------------------------------------------------------------------

    def _lease_row(self, conn: sqlite3.Connection, source: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM leases WHERE source = ?", (source,)
        ).fetchone()
        return row

    def acquire_lease(self, source: str, *, holder: str, purpose: str, ttl_s: float) -> Lease:
        """`holder` holds the source until `ttl_s` from now. Free and expired leases are taken,
        the holder's own is renewed (keeping when it was first acquired); a live lease of another
        holder raises `LeaseHeld` naming it. Epoch seconds, so expiry holds across processes."""
        if ttl_s <= 0:
            raise _refuse(f"lease ttl must be positive, got {ttl_s}")
        with self._write() as conn:
            now = self._clock()
            row = self._lease_row(conn, source)
            if row is not None and row["holder"] != holder and row["expires_at"] >= now \
                    and not holder_gone(row["host"], row["pid"]):
                raise LeaseHeld(lease_held_message(_lease(row)))
            acquired_at = row["acquired_at"] if row is not None and row["holder"] == holder else now
            lease = Lease(
                source=source,
                holder=holder,
                purpose=purpose,
                host=socket.gethostname(),
                pid=os.getpid(),
                acquired_at=_dt(acquired_at),
                expires_at=_dt(now + ttl_s),
            )
            conn.execute(
                "INSERT INTO leases (source, holder, purpose, host, pid, acquired_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE"
                " SET holder = excluded.holder, purpose = excluded.purpose,"
                " host = excluded.host, pid = excluded.pid,"
                " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                (source, holder, purpose, lease.host, lease.pid, acquired_at, now + ttl_s),
            )
            return lease

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """The lease now runs until `ttl_s` from now. Raises `LeaseHeld` if it was lost (released,
        or expired and taken by another holder); a lapsed lease nobody took is still ours."""
        if ttl_s <= 0:
            raise _refuse(f"lease ttl must be positive, got {ttl_s}")
        with self._write() as conn:
            row = self._lease_row(conn, lease.source)
            if row is None or row["holder"] != lease.holder:
                raise LeaseHeld(
                    lease_held_message(_lease(row))
                    if row is not None
                    else f"the lease on source {lease.source!r} was lost (released or taken over)"
                )
            expires_at = self._clock() + ttl_s
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE source = ?", (expires_at, lease.source)
            )
            return replace(_lease(row), expires_at=_dt(expires_at))

    def release_lease(self, lease: Lease) -> None:
        """The source is free, unless someone else holds it by now (theirs is left alone)."""
        with self._write() as conn:
            conn.execute(
                "DELETE FROM leases WHERE source = ? AND holder = ?", (lease.source, lease.holder)
            )

    def get_lease(self, source: str) -> Lease | None:
        """The live lease on the source, or None when it is free or its lease expired."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM leases WHERE source = ? AND expires_at >= ?",
                (source, self._clock()),
            ).fetchone()
        return None if row is None else _lease(row)

    def lease(
        self, source: str, *, purpose: str, ttl_s: float = 60.0, wait_s: float = 0.0
    ) -> AbstractContextManager[Lease]:
        """Hold the source for a `with` block under a fresh holder id; see `hold_lease`."""
        return hold_lease(self, source, purpose=purpose, ttl_s=ttl_s, wait_s=wait_s)

"""The state store's logic in SQL, shared by the SQLite store and the PostgreSQL store.

`SQLStateStore` holds every query and every read-check-write rule once, on top of
`cdcengine.state.dialect.DialectStore` (one connection, serialised write transactions, reads,
migrations). An engine's store subclasses it with a small dialect: how to open a connection, its
placeholder style, how to begin a serialised write transaction, how to tell that a table exists,
and which driver exceptions it raises. The migrations' SQL is accepted by both engines, so the
schema is shared too. Leases live in `cdcengine.state.sql_leases`, run history in
`cdcengine.state.runs` (mixins of `SQLStateStore`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from cdcengine.errors import Reason
from cdcengine.state.base import (
    SETTING_KEYS,
    ChunkState,
    Lease,
    SettingValue,
    SnapshotChunkRecord,
    SnapshotProgress,
    SourceRecord,
    SourceState,
    Stall,
    TableOptions,
    TableRecord,
    TableState,
    hold_lease,
)
from cdcengine.state.dialect import Tx
from cdcengine.state.records import (
    check_lsn,
    chunk_record,
    dt,
    options_text,
    progress_record,
    refuse,
    source_record,
    stall_detail,
    table_record,
)
from cdcengine.state.runs import RunHistorySQL
from cdcengine.state.sql_leases import LeaseSQL

C = TypeVar("C")  # the driver's connection type

# states a caller may set directly; the others follow from enable/disable and the markers
_SETTABLE = frozenset(
    {SourceState.SNAPSHOTTING, SourceState.STREAMING, SourceState.WARNING, SourceState.ERROR}
)


class SQLStateStore(LeaseSQL[C], RunHistorySQL[C]):
    """A `StateStore` over one SQL connection; migrated to the latest schema on open.

    Subclasses set `driver_errors` and implement the dialect hooks of `DialectStore`.
    """

    # install id -------------------------------------------------------------------------------

    def install_id(self) -> str:
        """This install's id, created once; it marks the publications and slots we own."""
        query = "SELECT value FROM meta WHERE key = 'install_id'"
        row = self._read(lambda tx: tx.one(query))
        if row is not None:
            return str(row["value"])
        with self._write() as tx:  # re-check under the write lock: another process may win
            row = tx.one(query)
            if row is not None:
                return str(row["value"])
            new_id = uuid.uuid4().hex
            tx.run("INSERT INTO meta (key, value) VALUES ('install_id', ?)", (new_id,))
            return new_id

    # sources ----------------------------------------------------------------------------------

    def _get(self, tx: Tx[C], name: str) -> SourceRecord:
        row = tx.one("SELECT * FROM sources WHERE name = ?", (name,))
        if row is None:
            raise refuse(
                f"source {name!r} is not recorded in the state store", Reason.UNKNOWN_SOURCE
            )
        return source_record(row)

    def _get_enabled(self, tx: Tx[C], name: str) -> SourceRecord:
        record = self._get(tx, name)
        if not record.enabled:
            raise refuse(f"source {name!r} is not enabled", Reason.NOT_ENABLED)
        return record

    def _running_state(self, tx: Tx[C], name: str) -> SourceState:
        """Where a source resumes after a marker clears: snapshotting while any table still needs
        its snapshot, streaming otherwise."""
        row = tx.one(
            "SELECT 1 AS pending FROM source_tables WHERE source = ? AND state IN (?, ?)",
            (name, TableState.PENDING, TableState.SNAPSHOTTING),
        )
        return SourceState.SNAPSHOTTING if row is not None else SourceState.STREAMING

    def _update(self, tx: Tx[C], name: str, **columns: object) -> SourceRecord:
        assigns = ", ".join(f"{column} = ?" for column in columns)  # names are ours, never input
        tx.run(
            f"UPDATE sources SET {assigns}, updated_at = ? WHERE name = ?",  # noqa: S608
            (*columns.values(), self._clock(), name),
        )
        return self._get(tx, name)

    def get_source(self, name: str) -> SourceRecord | None:
        row = self._read(lambda tx: tx.one("SELECT * FROM sources WHERE name = ?", (name,)))
        return None if row is None else source_record(row)

    def list_sources(self) -> list[SourceRecord]:
        rows = self._read(lambda tx: tx.all("SELECT * FROM sources ORDER BY name"))
        return [source_record(row) for row in rows]

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
        check_lsn(consistent_point, "consistent point")
        now = self._clock()
        with self._write() as tx:
            tx.run(
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
                " paused_reason = NULL, paused_message = NULL, paused_at = NULL,"
                " stalled_since = NULL, stalled_at = NULL, stalled_detail = NULL",
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
            tx.run("DELETE FROM source_tables WHERE source = ?", (name,))
            tx.many(
                "INSERT INTO source_tables (source, name, mode, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(name, table, mode, TableState.PENDING, now) for table, mode in tables.items()],
            )
            return self._get(tx, name)

    def record_reprovisioned(
        self,
        name: str,
        *,
        consistent_point: int | None,
        system_identifier: str | None,
        timeline: int | None,
    ) -> SourceRecord:
        """`repair` recreated the slot: its new starting point and the source's identity. The
        tables and the markers are left alone (repair queues re-snapshots, then clears the
        broken marker last)."""
        check_lsn(consistent_point, "consistent point")
        with self._write() as tx:
            self._get_enabled(tx, name)
            return self._update(tx, name, consistent_point=consistent_point,
                                system_identifier=system_identifier, timeline=timeline)

    def record_disabled(self, name: str) -> SourceRecord:
        """After this the source is disabled with no markers, tables or setting overrides, so a
        later enable starts clean; the row stays, remembering the names last provisioned."""
        with self._write() as tx:
            self._get(tx, name)
            tx.run("DELETE FROM source_tables WHERE source = ?", (name,))
            tx.run("DELETE FROM settings WHERE source = ?", (name,))
            return self._update(
                tx,
                name,
                state=SourceState.DISABLED,
                enabled=0,
                broken_reason=None,
                broken_message=None,
                broken_at=None,
                paused_reason=None,
                paused_message=None,
                paused_at=None,
                stalled_since=None,
                stalled_at=None,
                stalled_detail=None,
            )

    def set_source_state(self, name: str, state: SourceState) -> SourceRecord:
        """Set a running state (snapshotting, streaming, warning, error) of an enabled source.

        Refused while a broken or paused marker is set, so a late lag check of a daemon thread
        cannot hide a source that needs an operator; only the marker calls lift those states.
        """
        if state not in _SETTABLE:
            raise refuse(f"state {state!r} is set by enable/disable or the marker calls")
        with self._write() as tx:
            record = self._get_enabled(tx, name)
            for marker in (record.broken, record.paused):
                if marker is not None:
                    raise refuse(
                        f"source {name!r} is {record.state} ({marker.reason}): clear that first",
                        Reason.STATE_STORE_FAILED,
                    )
            return self._update(tx, name, state=state)

    def set_broken(self, name: str, reason: str, message: str) -> SourceRecord:
        """The source is broken until `repair` (or `clear_broken`); the marker says why."""
        with self._write() as tx:
            self._get_enabled(tx, name)
            return self._update(
                tx,
                name,
                state=SourceState.BROKEN,
                broken_reason=reason,
                broken_message=message,
                broken_at=self._clock(),
            )

    def clear_broken(self, name: str) -> SourceRecord:
        """The broken marker is gone; the source is paused if it also carries a pause, else it
        resumes (snapshotting or streaming, from its tables). No-op when it was not broken."""
        with self._write() as tx:
            record = self._get(tx, name)
            if record.broken is None:
                return record
            state = SourceState.PAUSED if record.paused else self._running_state(tx, name)
            return self._update(
                tx, name, state=state, broken_reason=None, broken_message=None, broken_at=None
            )

    def set_paused(self, name: str, reason: str, message: str) -> SourceRecord:
        """The source is paused until `resume`; if it is also broken it stays broken (a repair
        is needed first) but the pause is remembered."""
        with self._write() as tx:
            record = self._get_enabled(tx, name)
            state = SourceState.BROKEN if record.broken else SourceState.PAUSED
            return self._update(
                tx,
                name,
                state=state,
                paused_reason=reason,
                paused_message=message,
                paused_at=self._clock(),
            )

    def clear_paused(self, name: str) -> SourceRecord:
        """The pause marker is gone; a paused source resumes, a broken one stays broken."""
        with self._write() as tx:
            record = self._get(tx, name)
            if record.paused is None:
                return record
            state = SourceState.BROKEN if record.broken else self._running_state(tx, name)
            return self._update(
                tx, name, state=state, paused_reason=None, paused_message=None, paused_at=None
            )

    def set_stalled(self, name: str, stall: Stall) -> SourceRecord:
        """Record the daemon watchdog's stall (replacing an earlier one). The stored state is
        left alone: `shown_state` shows `stalled` over it while the record lasts."""
        with self._write() as tx:
            self._get_enabled(tx, name)
            return self._update(tx, name, stalled_since=stall.since.timestamp(),
                                stalled_at=stall.at.timestamp(), stalled_detail=stall_detail(stall))

    def clear_stalled(self, name: str) -> SourceRecord | None:
        """Progress resumed (or the daemon starts or stops): no stall. No-op without one, and
        None for a source the store does not know."""
        with self._write() as tx:
            row = tx.one("SELECT stalled_at FROM sources WHERE name = ?", (name,))
            if row is None:
                return None
            if row["stalled_at"] is None:
                return self._get(tx, name)
            return self._update(tx, name, stalled_since=None, stalled_at=None,
                                stalled_detail=None)

    # tables -----------------------------------------------------------------------------------

    def _get_table(self, tx: Tx[C], source: str, table: str) -> TableRecord:
        row = tx.one("SELECT * FROM source_tables WHERE source = ? AND name = ?", (source, table))
        if row is None:
            raise refuse(f"table {table!r} is not recorded for source {source!r}")
        return table_record(row)

    def list_tables(self, source: str) -> list[TableRecord]:
        rows = self._read(
            lambda tx: tx.all(
                "SELECT * FROM source_tables WHERE source = ? ORDER BY name", (source,)
            )
        )
        return [table_record(row) for row in rows]

    def upsert_table(self, source: str, table: str, mode: str, *,
                     options: TableOptions | None = None) -> TableRecord:
        """The table is recorded with `mode` (and `options`, when given; else they stay); a new
        one starts pending, a known one keeps its state (a mode change alone does not
        re-snapshot)."""
        text = None if options is None else options_text(options)
        with self._write() as tx:
            self._get(tx, source)
            tx.run(
                "INSERT INTO source_tables (source, name, mode, state, updated_at, options)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source, name) DO UPDATE"
                " SET mode = excluded.mode, updated_at = excluded.updated_at,"
                " options = COALESCE(excluded.options, source_tables.options)",
                (source, table, mode, TableState.PENDING, self._clock(), text),
            )
            return self._get_table(tx, source, table)

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
            raise refuse(f"stopping table {table!r} needs a reason")
        with self._write() as tx:  # an unknown table updates nothing and fails the re-read
            tx.run(
                "UPDATE source_tables SET state = ?, reason = ?, remedy = ?, updated_at = ?"
                " WHERE source = ? AND name = ?",
                (state, reason, remedy, self._clock(), source, table),
            )
            return self._get_table(tx, source, table)

    def remove_table(self, source: str, table: str) -> None:
        """The table is no longer recorded for the source. Idempotent."""
        with self._write() as tx:
            tx.run("DELETE FROM source_tables WHERE source = ? AND name = ?", (source, table))

    def lease(
        self, source: str, *, purpose: str, ttl_s: float = 60.0, wait_s: float = 0.0
    ) -> AbstractContextManager[Lease]:
        """Hold the source for a `with` block under a fresh holder id; see `hold_lease`."""
        return hold_lease(self, source, purpose=purpose, ttl_s=ttl_s, wait_s=wait_s)

    # snapshot progress (display only) -------------------------------------------------------

    def record_snapshot_plan(
        self, source: str, table: str, chunks: Sequence[SnapshotChunkRecord]
    ) -> None:
        """Replace the table's chunk records with `chunks` (a new or resumed attempt)."""
        now = self._clock()
        with self._write() as tx:
            tx.run(
                "DELETE FROM snapshot_chunks WHERE source = ? AND table_name = ?", (source, table)
            )
            tx.many(
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
        with self._write() as tx:
            tx.run(
                "UPDATE snapshot_chunks SET state = ?, rows_copied = ?, lsn = ?, updated_at = ?"
                " WHERE source = ? AND table_name = ? AND chunk_id = ?",
                (str(ChunkState(state)), rows, lsn, self._clock(), source, table, chunk_id),
            )

    def list_snapshot_chunks(self, source: str, table: str) -> list[SnapshotChunkRecord]:
        rows = self._read(
            lambda tx: tx.all(
                "SELECT * FROM snapshot_chunks WHERE source = ? AND table_name = ?"
                " ORDER BY chunk_id",
                (source, table),
            )
        )
        return [chunk_record(row) for row in rows]

    def set_snapshot_progress(self, source: str, table: str, progress: SnapshotProgress) -> None:
        p = progress
        with self._write() as tx:
            tx.run(
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
        row = self._read(
            lambda tx: tx.one(
                "SELECT * FROM snapshot_progress WHERE source = ? AND table_name = ?",
                (source, table),
            )
        )
        return None if row is None else progress_record(row)

    # settings overrides -----------------------------------------------------------------------

    def set_setting(self, source: str, key: str, value: bool | int) -> SettingValue:
        """The override wins over the config file until cleared or the source is disabled.

        Settings may change before the first enable, so an unknown source is recorded (disabled).
        Values are stored as JSON so a bool reads back as a bool, not as 1.
        """
        if key not in SETTING_KEYS:
            raise refuse(
                f"{key!r} cannot be overridden; allowed: {', '.join(sorted(SETTING_KEYS))}"
            )
        wants_bool = key == "auto_drop_slot"
        if isinstance(value, bool) != wants_bool or not isinstance(value, int):
            raise refuse(
                f"{key} must be {'a bool' if wants_bool else 'an integer'}, got {value!r}"
            )
        now = self._clock()
        with self._write() as tx:
            tx.run(
                "INSERT INTO sources (name, state, enabled, updated_at) VALUES (?, ?, 0, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (source, SourceState.DISABLED, now),
            )
            tx.run(
                "INSERT INTO settings (source, key, value, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (source, key) DO UPDATE"
                " SET value = excluded.value, updated_at = excluded.updated_at",
                (source, key, json.dumps(value), now),
            )
        return SettingValue(value=value, updated_at=dt(now))

    def clear_setting(self, source: str, key: str) -> None:
        """The config file's value applies again. Idempotent."""
        with self._write() as tx:
            tx.run("DELETE FROM settings WHERE source = ? AND key = ?", (source, key))

    def get_settings(self, source: str) -> dict[str, SettingValue]:
        rows = self._read(
            lambda tx: tx.all(
                "SELECT key, value, updated_at FROM settings WHERE source = ? ORDER BY key",
                (source,),
            )
        )
        return {
            row["key"]: SettingValue(
                value=json.loads(row["value"]), updated_at=dt(row["updated_at"])
            )
            for row in rows
        }

"""Rows of the state store's tables → the records of `cdcengine.state.base`, for every SQL store.

Rows are read by column name only (sqlite3.Row and psycopg's dict rows both allow it), and
timestamps are stored as epoch seconds (see `cdcengine.state.migrations`), so one set of
converters serves SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from cdcengine.errors import Reason, StateStoreError
from cdcengine.state.base import (
    ChunkState,
    Lease,
    Marker,
    SnapshotChunkRecord,
    SnapshotProgress,
    SourceRecord,
    SourceState,
    Stall,
    StuckWork,
    TableOptions,
    TableRecord,
    TableState,
    ThreadInfo,
)

MAX_LSN = 2**63 - 1  # BIGINT; a real LSN never comes near it


class Row(Protocol):
    """A result row, read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


class Queries(Protocol):
    """Statements inside one read or write of a SQL store, written with `?` placeholders (the
    store's `Tx`); what the query helpers need, without knowing the driver."""

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None: ...
    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...
    def run(self, sql: str, params: Sequence[object] = ()) -> int: ...
    def many(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...


def dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def dt_or_none(epoch: float | None) -> datetime | None:
    return None if epoch is None else dt(epoch)


def refuse(message: str, reason: Reason = Reason.CONFIG_INVALID) -> StateStoreError:
    """An error for a call the store refuses on purpose; retrying the same call cannot help."""
    return StateStoreError(message, reason=reason, retryable=False)


def check_lsn(value: int | None, what: str) -> None:
    """Refuse what cannot be an LSN before it reaches a BIGINT column (or wraps around in one)."""
    if value is not None and not 0 <= value <= MAX_LSN:
        raise refuse(f"{what} {value} is not a valid LSN")


def marker(row: Row, kind: str) -> Marker | None:
    if row[f"{kind}_reason"] is None:
        return None
    return Marker(
        reason=row[f"{kind}_reason"], message=row[f"{kind}_message"], at=dt(row[f"{kind}_at"])
    )


def source_record(row: Row) -> SourceRecord:
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
        enabled_at=dt_or_none(row["enabled_at"]),
        updated_at=dt(row["updated_at"]),
        broken=marker(row, "broken"),
        paused=marker(row, "paused"),
        stalled=stall(row),
    )


def stall_detail(stall: Stall) -> str:
    """`stalled_detail` JSON: everything of a `Stall` but its two timestamps (own columns)."""
    return json.dumps({
        "message": stall.message, "host": stall.host, "pid": stall.pid,
        "work": [{"lane": w.lane, "what": w.what, "waited_s": w.waited_s} for w in stall.work],
        "threads": [{"name": t.name, "doing": t.doing, "stack": list(t.stack)}
                    for t in stall.threads]})


def stall(row: Row) -> Stall | None:
    if row["stalled_at"] is None:
        return None
    try:
        raw = json.loads(row["stalled_detail"] or "{}")
    except ValueError:  # display only: a damaged detail still shows the stall
        raw = {}
    return Stall(
        since=dt(row["stalled_since"] if row["stalled_since"] is not None else row["stalled_at"]),
        at=dt(row["stalled_at"]),
        message=str(raw.get("message") or "no progress"),
        work=tuple(StuckWork(lane=str(w.get("lane")), what=str(w.get("what")),
                             waited_s=float(w.get("waited_s") or 0.0))
                   for w in raw.get("work") or ()),
        threads=tuple(ThreadInfo(name=str(t.get("name")), doing=str(t.get("doing")),
                                 stack=tuple(str(f) for f in t.get("stack") or ()))
                      for t in raw.get("threads") or ()),
        host=str(raw.get("host") or ""), pid=int(raw.get("pid") or 0),
    )


def table_record(row: Row) -> TableRecord:
    return TableRecord(
        source=row["source"],
        name=row["name"],
        mode=row["mode"],
        state=TableState(row["state"]),
        reason=row["reason"],
        remedy=row["remedy"],
        updated_at=dt(row["updated_at"]),
        **_options(row["options"]),
    )


def options_text(options: TableOptions) -> str:
    return json.dumps({"columns": None if options.columns is None else list(options.columns),
                       "primary_key": None if options.primary_key is None
                       else list(options.primary_key)})


def _options(text: str | None) -> dict[str, tuple[str, ...] | None]:
    if not text:
        return {}
    raw = json.loads(text)
    return {k: None if raw.get(k) is None else tuple(raw[k]) for k in ("columns", "primary_key")}


def chunk_record(row: Row) -> SnapshotChunkRecord:
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
        updated_at=dt(row["updated_at"]),
    )


def progress_record(row: Row) -> SnapshotProgress:
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
        started_at=dt(row["started_at"]),
        updated_at=dt(row["updated_at"]),
    )


def lease_record(row: Row) -> Lease:
    return Lease(
        source=row["source"],
        holder=row["holder"],
        purpose=row["purpose"],
        host=row["host"],
        pid=row["pid"],
        acquired_at=dt(row["acquired_at"]),
        expires_at=dt(row["expires_at"]),
    )

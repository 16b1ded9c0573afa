"""Re-snapshot one table into its existing Delta tables (SPEC §3 `resync`, §8).

A request is queued in the state store (`request_resync`: table state `pending`, reason
`RESYNC_REASON`); the process holding the source's lease performs it: the daemon polls for
requests while streaming, and `run` performs queued ones before it streams.

`run_resync` performs one: it loads the table's snapshot (consistent point C, temporary slot,
chunked as usual) into a staging location `<destination>/_cdcengine_staging/<C>` first, then
applies it to each Delta table in ONE commit carrying the txn action at C
(`SnapshotSink.apply_resync`): readers never see a half-loaded table. The stream then applies
the table's changes after C only (rows at or below a table's applied version are skipped, as
after any restart).
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from cdcengine.config import SourceConfig, TableConfig
from cdcengine.lsn import format_lsn
from cdcengine.pipeline.snapshots import snapshot_table
from cdcengine.sink import delta_sink
from cdcengine.sink.base import SinkFactory, SnapshotSink, TableKind, kinds_for
from cdcengine.sink.columns import DELETED, LSN, OP, SEQ
from cdcengine.source.adapter import SourceAdapter
from cdcengine.state.base import StateStore, TableRecord, TableState

log = structlog.get_logger("cdcengine.pipeline.resync")

RESYNC_REASON = "resync_requested"
STAGING = "_cdcengine_staging"


def is_requested(rec: TableRecord) -> bool:
    """Queued, or begun and not finished (a crash mid-resync performs it again)."""
    return rec.state in (TableState.PENDING, TableState.SNAPSHOTTING) \
        and rec.reason == RESYNC_REASON


def request_resync(store: StateStore, source: str, table: TableConfig) -> TableRecord:
    """Queue the table's resync (what `cdcengine.api.resync_table` does); `run_resync` performs
    it."""
    store.upsert_table(source, table.name, str(table.mode))
    return store.set_table_state(source, table.name, TableState.PENDING, reason=RESYNC_REASON,
                                 remedy="performed by the process streaming this source")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResyncOutcome:
    finished: bool
    version: int | None = None
    rows: int = 0


def run_resync(adapter: SourceAdapter, source: SourceConfig, table: TableConfig,
               sink: SnapshotSink, store: StateStore, *,
               stop: threading.Event | None = None,
               sink_factory: SinkFactory = delta_sink) -> ResyncOutcome:
    """Re-snapshot `table` and swap it in (see the module doc). Unfinished only on `stop`
    (nothing of it is visible then; the request stays queued). The staging sink comes from
    `sink_factory` (the source with the staging location as its destination)."""
    started = time.monotonic()
    ref = table.ref
    kinds = kinds_for(table.mode)
    if any(sink.applied_version(ref, k) is None for k in kinds):
        # a Delta table never loaded (e.g. a mode change added the append table): the plain
        # snapshot loads exactly the missing ones; the others stay as they are
        store.set_table_state(source.name, table.name, TableState.SNAPSHOTTING)
        plain = snapshot_table(adapter, source, table, sink, store, stop=stop)
        if not plain.finished:
            return ResyncOutcome(finished=False)
        store.set_table_state(source.name, table.name, TableState.STREAMING)
        return ResyncOutcome(finished=True, version=plain.version, rows=plain.rows_copied)
    staging_root = f"{source.destination.rstrip('/')}/{STAGING}/{table.ref.qualified}"
    staged_sink = sink_factory(replace(source, destination=staging_root))
    _remove(staging_root)
    store.set_table_state(source.name, table.name, TableState.SNAPSHOTTING, reason=RESYNC_REASON)
    done = snapshot_table(adapter, source, table, staged_sink, store, stop=stop)
    if not done.finished or done.version is None:
        _remove(staging_root)
        store.set_table_state(source.name, table.name, TableState.PENDING, reason=RESYNC_REASON)
        return ResyncOutcome(finished=False)
    version = done.version
    stamp_us = int(time.time() * 1_000_000)
    key = tuple(table.primary_key or done.key)
    live: pa.Table | None = None
    if TableKind.APPEND in kinds:
        live = _live_keys(sink, table, kinds, key)
    rows = 0
    for kind in kinds:  # append first: `live` was read from the consolidated table before
        staged = staged_sink.read_table(ref, kind)
        sink.apply_resync(ref, kind, staged, key=key, version=version,
                          committed_at_us=stamp_us, hard_deletes=source.hard_deletes,
                          live_keys=live if kind is TableKind.APPEND else None)
        rows = staged.num_rows
    _remove(staging_root)
    store.set_table_state(source.name, table.name, TableState.STREAMING)
    log.info("table_resynced", source=source.name, table=table.name, rows=rows,
             lsn=format_lsn(version), duration_ms=round((time.monotonic() - started) * 1000))
    return ResyncOutcome(finished=True, version=version, rows=rows)


def _live_keys(sink: SnapshotSink, table: TableConfig, kinds: list[TableKind],
               key: tuple[str, ...]) -> pa.Table | None:
    """The keys live in Delta before the swap (for the append table's `D` rows)."""
    if not key:
        return None
    ref = table.ref
    if TableKind.CONSOLIDATED in kinds:
        rows = sink.read_table(ref, TableKind.CONSOLIDATED, columns=[*key, DELETED])
        return rows.filter(pc.invert(rows[DELETED])).select(list(key))
    log_rows = sink.read_table(ref, TableKind.APPEND, columns=[*key, LSN, SEQ, OP])
    truncates = log_rows.filter(pc.equal(log_rows[OP], "T"))
    if truncates.num_rows:
        last = pc.max(truncates[LSN]).as_py()
        log_rows = log_rows.filter(pc.greater(log_rows[LSN], last))
    ordered = log_rows.sort_by([(LSN, "ascending"), (SEQ, "ascending")])
    latest: dict[tuple[object, ...], str] = {}
    cols = [ordered[k].to_pylist() for k in key]
    for i, op in enumerate(ordered[OP].to_pylist()):
        latest[tuple(c[i] for c in cols)] = op
    alive = [k for k, op in latest.items() if op != "D"]
    return pa.table({name: pa.array([k[j] for k in alive], ordered.schema.field(name).type)
                     for j, name in enumerate(key)})


def _remove(path: str) -> None:
    if "://" in path:
        return  # object stores: a stale staging table is overwritten by the next attempt
    shutil.rmtree(Path(path), ignore_errors=True)

"""Resync: an existing table's contents replaced by a re-snapshot in ONE commit (SPEC §8).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction

from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef
from cdcengine.sink.base import SinkSchemaError, SinkWriteError, TableKind
from cdcengine.sink.columns import COMMITTED_AT, DELETED, DELETED_AT, LSN, OP, SEQ
from cdcengine.sink.delta.schema import (
    _ENGINE_COLUMNS,
    TIMESTAMP_UTC,
    _arrow_schema,
    _conform,
    _to_target,
    _with_missing_as_null,
)
from cdcengine.sink.delta.spool import _materialised, _write_delta
from cdcengine.sink.delta.sql import _SOURCE_ALIAS, _TARGET_ALIAS, _Truncate, quote_ident
from cdcengine.sink.delta.tables import DeltaTables
from cdcengine.sink.fold import data_columns

log = structlog.get_logger("cdcengine.sink")


class Resyncs(DeltaTables):
    """Resyncs (see the module docstring)."""

    def apply_resync(
        self, ref: TableRef, kind: TableKind | str, staged: pa.Table, *, key: Sequence[str],
        version: int, committed_at_us: int, hard_deletes: bool = False,
        live_keys: pa.Table | None = None,
    ) -> int:
        """Replace an existing table's contents by a re-snapshot taken at `version` (C) in ONE
        commit carrying the txn action at C (SPEC §8), so no reader sees a half-loaded state.

        `staged`: the snapshot's rows as the snapshot loader wrote them (consolidated rows
        stamped C; append `R` rows at C). Consolidated: snapshot rows are upserted (undeleted)
        and every stored row not in the snapshot and older than C is marked deleted (or deleted
        with `hard_deletes`); when the stored types cannot take the snapshot's (the usual reason
        for a resync), the table is overwritten by the snapshot instead (soft-deleted history is
        then dropped). Append: the `R` rows plus a `D` row at C for each key of `live_keys`
        (the keys live before) the snapshot lacks. Returns the rows written."""
        kind = TableKind(kind)
        keys = list(key)
        path = self._writable_path(ref, kind)
        stamp = pa.scalar(committed_at_us, pa.int64()).cast(TIMESTAMP_UTC)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path)
            if dt is None:
                raise SinkWriteError(f"{ref}: no {kind} Delta table to resync into")
            props = CommitProperties(
                app_transactions=[Transaction(self.app_id(ref, kind), version)],
                custom_metadata={"cdcengine.lsn": format_lsn(version),
                                 "cdcengine.operation": "resync"})
            stored = set(_arrow_schema(dt).names)
            if not set(_ENGINE_COLUMNS[kind]) | set(keys) <= stored:
                # another writer replaced the table's schema (its engine or key columns are
                # gone): nothing stored can be merged with; the re-snapshot replaces the table
                # whole, in one commit -- never columns added to someone else's table
                log.warning("delta_table_replaced", table=ref.qualified, kind=str(kind),
                            reason="the stored table lacks the engine's or the key columns")
                _write_delta(dt, staged, mode="overwrite", schema_mode="overwrite",
                             commit_properties=props)
                written = staged.num_rows
            elif kind is TableKind.APPEND:
                rows = staged
                if live_keys is not None and live_keys.num_rows and keys:
                    seen = staged.select(keys)
                    gone = live_keys.select(keys).join(seen, keys, join_type="left anti")
                    n = gone.num_rows
                    if n:
                        base = (int(pc.max(staged[SEQ]).as_py()) + 1) if staged.num_rows else 0
                        cols = {c: gone.column(c) for c in keys}
                        cols[LSN] = pa.array([version] * n, pa.int64())
                        cols[SEQ] = pa.array(range(base, base + n), pa.int64())
                        cols[OP] = pa.array(["D"] * n, pa.string())
                        cols[COMMITTED_AT] = pa.array([stamp] * n, TIMESTAMP_UTC)
                        rows = pa.concat_tables([staged, pa.table(cols)], promote_options="default")
                self._add_new_columns(dt, ref, rows, kind)
                self._widen(dt, ref, kind, rows)
                target = _arrow_schema(dt)
                _write_delta(dt, _to_target(_conform(rows, target, ref), target),
                             mode="append", commit_properties=props)
                written = rows.num_rows
            else:
                written = self._resync_consolidated(dt, ref, staged, keys, props,
                                                    version=version, stamp=stamp,
                                                    hard_deletes=hard_deletes)
        self._tables.pop(path, None)
        log.info("delta_table_resynced", table=ref.qualified, kind=str(kind), rows=written,
                 lsn=format_lsn(version))
        return written

    def _resync_consolidated(
        self, dt: DeltaTable, ref: TableRef, staged: pa.Table, keys: list[str],
        props: CommitProperties, *, version: int, stamp: pa.Scalar, hard_deletes: bool,
    ) -> int:
        self._add_new_columns(dt, ref, staged, TableKind.CONSOLIDATED)
        self._widen(dt, ref, TableKind.CONSOLIDATED, staged)
        target = _arrow_schema(dt)
        try:
            source = _with_missing_as_null(_conform(staged, target, ref), target)
        except SinkSchemaError:
            # an incompatible type: the snapshot's types win, in one overwrite commit
            _write_delta(dt, staged, mode="overwrite", schema_mode="overwrite",
                         commit_properties=props)
            return staged.num_rows
        s, t = _SOURCE_ALIAS, _TARGET_ALIAS
        data = [c for c in data_columns(source) if c in target.names]
        on = " AND ".join(f"{t}.{quote_ident(k)} = {s}.{quote_ident(k)}" for k in keys)
        merger = dt.merge(_materialised(source), on, source_alias=s, target_alias=t,
                          streamed_exec=False, commit_properties=props)
        merger = merger.when_matched_update(
            {**{quote_ident(c): f"{s}.{quote_ident(c)}" for c in data},
             LSN: f"{s}.{LSN}", COMMITTED_AT: f"{s}.{COMMITTED_AT}", DELETED: "false",
             DELETED_AT: "NULL"},
            predicate=f"{t}.{LSN} < {s}.{LSN}")
        merger = merger.when_not_matched_insert(
            {**{quote_ident(c): f"{s}.{quote_ident(c)}" for c in data},
             LSN: f"{s}.{LSN}", COMMITTED_AT: f"{s}.{COMMITTED_AT}", DELETED: "false",
             DELETED_AT: "NULL"})
        gone = _Truncate(lsn=version, committed_at_us=int(stamp.cast(pa.int64()).as_py()))
        if hard_deletes:
            merger = merger.when_not_matched_by_source_delete(predicate=gone.predicate(t + "."))
        else:
            merger = merger.when_not_matched_by_source_update(gone.updates(),
                                                              predicate=gone.predicate(t + "."))
        before = dt.version()
        merger.execute()
        if dt.version() == before:
            _write_delta(dt, target.empty_table(), mode="append", commit_properties=props)
        return source.num_rows

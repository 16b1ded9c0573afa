"""Initial snapshots into Delta (SPEC §8): `write_snapshot` (one call), and the chunked protocol
driven by `cdcengine.pipeline.snapshots`: `begin_snapshot`, `write_snapshot_chunk`,
`mirror_snapshot_chunks`, `finish_snapshot`, with the plan and chunk markers in the Delta log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import DeltaError

from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef
from cdcengine.sink.base import SinkWriteError, TableKind, TableSpec, WriteResult, kinds_for
from cdcengine.sink.columns import COMMITTED_AT, DELETED, DELETED_AT, LSN, OP, SEQ, UNCHANGED
from cdcengine.sink.delta.schema import (
    TIMESTAMP_UTC,
    _append_schema,
    _arrow_schema,
    _conform,
    _consolidated_schema,
    _to_target,
)
from cdcengine.sink.delta.spool import _Spool, _write_delta
from cdcengine.sink.delta.tables import SNAPSHOT_PLAN_PROPERTY, DeltaTables
from cdcengine.sink.fold import UNCHANGED_TYPE

log = structlog.get_logger("cdcengine.sink")


class SnapshotLoads(DeltaTables):
    """Snapshot loads (see the module docstring)."""

    def write_snapshot(
        self,
        ref: TableRef,
        chunks: Iterable[pa.Table],
        *,
        spec: TableSpec,
        version: int,
        committed_at_us: int,
    ) -> WriteResult:
        """Load a table's initial snapshot, taken at consistent point `version` (SPEC §8).

        `chunks` are the data columns only, in any number. They are appended without a txn
        action; then one commit per Delta table carries the txn action at `version`. So a load
        interrupted before that last commit has no applied version, and the next attempt
        overwrites the partial table from its first chunk: a half-loaded table is never taken
        for a loaded one. Consolidated rows get `_cdc_lsn = version`; append rows are `R` rows
        with `_cdc_seq` numbering them. A kind that already has an applied version is left
        alone (a re-snapshot into an existing table is `resync`'s job).
        """
        todo: list[tuple[TableKind, str, DeltaTable | None]] = []
        done: list[int] = []
        for kind in kinds_for(spec.mode):
            path = self._writable_path(ref, kind)
            dt = self._cached(path)
            applied = None if dt is None else self._txn_version(dt, ref, kind)
            if applied is None:
                todo.append((kind, path, dt))
            else:
                done.append(applied)
        if not todo:
            return WriteResult(table=ref, version=min(done))
        stamp = pa.scalar(committed_at_us, pa.int64()).cast(TIMESTAMP_UTC)
        seq = rows = 0
        first = True
        try:
            for chunk in chunks:
                n = chunk.num_rows
                for i, (kind, path, dt) in enumerate(todo):
                    cols = {c: chunk.column(c) for c in chunk.column_names}
                    cols[LSN] = pa.array([version] * n, pa.int64())
                    cols[COMMITTED_AT] = pa.array([stamp] * n, TIMESTAMP_UTC)
                    if kind is TableKind.CONSOLIDATED:
                        cols[DELETED] = pa.array([False] * n, pa.bool_())
                        cols[DELETED_AT] = pa.nulls(n, TIMESTAMP_UTC)
                        data = pa.table(cols)
                        schema = _consolidated_schema(data)
                    else:
                        cols[SEQ] = pa.array(range(seq, seq + n), pa.int64())
                        cols[OP] = pa.array(["R"] * n, pa.string())
                        cols[UNCHANGED] = pa.nulls(n, UNCHANGED_TYPE)
                        data = pa.table(cols)
                        schema = _append_schema(data)
                    if dt is None:
                        dt = self._create(path, ref, kind, schema, list(spec.key))
                    target = _arrow_schema(dt)
                    _write_delta(dt, _to_target(_conform(data, target, ref), target),
                                 mode="overwrite" if first else "append")
                    todo[i] = (kind, path, dt)
                first = False
                seq += n
                rows += n
            if first:
                raise ValueError(f"{ref}: a snapshot yields at least one (possibly empty) chunk")
            for kind, _, dt in todo:
                assert dt is not None
                target = _arrow_schema(dt)
                _write_delta(dt, target.empty_table(), mode="append",
                             commit_properties=self._commit_properties(ref, kind, version))
                self._after_commit(ref, kind, version)
                log.info("snapshot_loaded", table=ref.qualified, kind=str(kind), rows=rows,
                         lsn=format_lsn(version))
        except (DeltaError, OSError) as exc:
            for _, path, _ in todo:
                self._tables.pop(path, None)
            raise SinkWriteError(f"loading the snapshot of {ref} failed "
                                 f"({type(exc).__name__})") from exc
        return WriteResult(table=ref, version=min([version, *done]))

    # --- chunked snapshots (driven by cdcengine.pipeline.snapshots) ------------------------------
    #
    # Per Delta table (kind), in the Delta log only:
    # - table property `cdcengine.snapshot.plan`: the JSON plan of the current attempt
    #   (its `attempt` = consistent point of the run that planned it);
    # - txn `<app_id>/snapshot` = that attempt: set by the commit that emptied the table for it,
    #   so a plan whose attempt differs from this marker is stale (a crash between the two);
    # - txn `<app_id>/snapshot/<attempt hex>-<chunk id>` = the consistent point the chunk was
    #   copied under, in the same commit as the chunk's rows: a chunk is finished exactly when
    #   its txn is in the log;
    # - finally txn `<app_id>` = the earliest finished chunk's point (the stream replays from it).

    def snapshot_app_id(self, ref: TableRef, kind: TableKind | str, chunk: str = "") -> str:
        """`<app_id>/snapshot` (the attempt marker) or `<app_id>/snapshot/<chunk>`."""
        base = f"{self.app_id(ref, kind)}/snapshot"
        return f"{base}/{chunk}" if chunk else base

    def snapshot_plan(self, ref: TableRef, kind: TableKind | str) -> tuple[str | None, int | None]:
        """(the stored plan JSON, the attempt marker's version); Nones without table or plan."""
        dt = self._load(self.path(ref, kind))
        if dt is None:
            return None, None
        plan = dt.metadata().configuration.get(SNAPSHOT_PLAN_PROPERTY)
        marker = dt.transaction_version(self.snapshot_app_id(ref, kind))
        return plan, None if marker is None else int(marker)

    def snapshot_chunk_versions(
        self, ref: TableRef, kind: TableKind | str, chunks: Sequence[str]
    ) -> dict[str, int]:
        """For each chunk name committed in this table's log: the point it was copied under."""
        dt = self._load(self.path(ref, kind))
        if dt is None:
            return {}
        out: dict[str, int] = {}
        for chunk in chunks:
            value = dt.transaction_version(self.snapshot_app_id(ref, kind, chunk))
            if value is not None:
                out[chunk] = int(value)
        return out

    def begin_snapshot(
        self,
        ref: TableRef,
        kind: TableKind | str,
        *,
        empty: pa.Table,
        key: Sequence[str],
        plan: str,
        attempt: int,
    ) -> None:
        """Start a snapshot attempt from scratch: the table is created (or emptied: an
        interrupted load is overwritten) in a commit carrying the attempt marker, then `plan` is
        stored. `empty` is the typed empty table of the data columns."""
        kind = TableKind(kind)
        path = self._writable_path(ref, kind)
        data = _snapshot_rows(empty, kind, version=attempt, stamp_us=0, seq_base=0)
        try:
            dt = self._load(path)
            if dt is None:
                schema = (_consolidated_schema(data) if kind is TableKind.CONSOLIDATED
                          else _append_schema(data))
                dt = self._create(path, ref, kind, schema, list(key))
            else:
                self._check_layout(dt, ref, path, kind)
                self._add_new_columns(dt, ref, data, kind)
            target = _arrow_schema(dt)
            _write_delta(dt, _to_target(_conform(data, target, ref), target), mode="overwrite",
                         commit_properties=CommitProperties(
                             app_transactions=[
                                 Transaction(self.snapshot_app_id(ref, kind), attempt)],
                             custom_metadata={"cdcengine.snapshot": "begin"}))
            dt.alter.set_table_properties({SNAPSHOT_PLAN_PROPERTY: plan},
                                          raise_if_not_exists=False)
        except (DeltaError, OSError) as exc:
            self._tables.pop(path, None)
            raise SinkWriteError(f"starting the snapshot of {ref} failed "
                                 f"({type(exc).__name__})") from exc
        self._tables.pop(path, None)  # a cached handle predates the overwrite
        log.info("snapshot_started", table=ref.qualified, kind=str(kind),
                 lsn=format_lsn(attempt))

    def write_snapshot_chunk(
        self,
        ref: TableRef,
        kinds: Sequence[TableKind | str],
        pieces: Iterable[pa.Table],
        *,
        chunk: str,
        seq_base: int,
        version: int,
        committed_at_us: int,
    ) -> int:
        """Append one snapshot chunk to each of `kinds`: per Delta table ONE commit carrying
        the chunk's txn (`version` = the consistent point it was read under). Safe to call from
        several threads at once (fresh table handles; appends do not conflict). Returns the
        rows written (per kind).

        The pieces are read to the end BEFORE deltalake sees the chunk, never pulled by it (see
        `_write_delta`): each Delta table's rows collect in a `_Spool`, in memory up to
        `spill_bytes`, beyond that in a local Arrow file the write reads memory-mapped. So
        memory stays bounded however large the chunk (a table without a usable key is one
        chunk), and a copy that fails midway commits nothing."""
        kinds = [TableKind(k) for k in kinds]
        handles: dict[TableKind, tuple[DeltaTable, pa.Schema]] = {}
        for kind in kinds:
            dt = self._chunk_handle(self._writable_path(ref, kind))
            if dt is None:
                raise SinkWriteError(f"{ref}: the snapshot's {kind} table is missing")
            handles[kind] = (dt, _arrow_schema(dt))
        rows = 0
        try:
            with ExitStack() as stack:
                spools = {kind: stack.enter_context(_Spool(target, limit=self.spill_bytes,
                                                           directory=self.spill_dir))
                          for kind, (_, target) in handles.items()}
                for piece in pieces:
                    for kind in kinds:
                        target = handles[kind][1]
                        out = _snapshot_rows(piece, kind, version=version,
                                             stamp_us=committed_at_us, seq_base=seq_base + rows)
                        spools[kind].add(_to_target(_conform(out, target, ref), target))
                    rows += piece.num_rows

                def write(kind: TableKind) -> None:
                    with spools[kind].data() as data:
                        _write_delta(handles[kind][0], data, mode="append",
                                     commit_properties=CommitProperties(
                                         app_transactions=[Transaction(
                                             self.snapshot_app_id(ref, kind, chunk), version)],
                                         custom_metadata={"cdcengine.snapshot": chunk}))

                if len(kinds) == 1:
                    write(kinds[0])
                else:  # a `both` table: its two commits run side by side (deltalake frees the GIL)
                    with ThreadPoolExecutor(len(kinds), "snapshot-write") as pool:
                        for done in [pool.submit(write, kind) for kind in kinds]:
                            done.result()
        except (DeltaError, OSError) as exc:
            raise SinkWriteError(f"writing snapshot chunk {chunk} of {ref} failed "
                                 f"({type(exc).__name__})") from exc
        return rows

    def _chunk_handle(self, path: str) -> DeltaTable | None:
        """This thread's handle on `path`, brought up to date. Why not a fresh load per chunk:
        loading replays the log since the last checkpoint, and a snapshot commits once per
        chunk, so the replay grew with every chunk (~16 ms CPU at 50 versions vs ~5 ms for the
        update; a 10M-row table is 100 chunks). Per thread, because a DeltaTable is not shared
        between threads here, and a chunk worker thread lives for one table's copy only."""
        handles: dict[str, DeltaTable] | None = getattr(self._chunk_handles, "tables", None)
        if handles is None:
            handles = self._chunk_handles.tables = {}
        return self._cached(path, cache=handles)

    def mirror_snapshot_chunks(
        self,
        ref: TableRef,
        into: TableKind | str,
        *,
        chunks: Mapping[str, tuple[int, int]],
        version: int,
        key: Sequence[str],
    ) -> int:
        """Give `into` the snapshot chunks the table's other Delta table (a `both` table)
        holds at `version` and `into` lacks — the process died between a chunk's two commits —
        copied from that other table, in ONE commit carrying all their txns. Copying them from
        the source again would stamp them with a later point than the other table's rows, and
        the change log's `R` rows must carry the consolidated rows' `_cdc_lsn` (SPEC §5).

        `chunks`: chunk name -> its append rows' `_cdc_seq` range [lo, hi). Only a snapshot in
        progress is mirrored: until it finishes, the rows at `version` of both tables are
        exactly its chunks' rows. Returns the rows written."""
        into = TableKind(into)
        keys = list(key)
        if not chunks or not keys:
            raise ValueError("mirroring snapshot chunks needs chunks and a key")
        path = self._writable_path(ref, into)
        with self._delta_errors(path, ref, into):
            at = pads.field(LSN) == version
            if into is TableKind.CONSOLIDATED:
                ranges = [(pads.field(SEQ) >= lo) & (pads.field(SEQ) < hi)
                          for lo, hi in chunks.values()]
                picked = ranges[0]
                for r in ranges[1:]:
                    picked = picked | r
                rows = self.reader.dataset(ref, TableKind.APPEND).to_table(
                    filter=at & (pads.field(OP) == "R") & picked)
                n = rows.num_rows
                rows = rows.drop_columns([SEQ, OP, UNCHANGED]) \
                    .append_column(DELETED, pa.repeat(pa.scalar(False), n)) \
                    .append_column(DELETED_AT, pa.nulls(n, TIMESTAMP_UTC))
            else:
                # the consolidated rows at `version` the change log has no R row for
                seen = self.reader.dataset(ref, TableKind.APPEND).to_table(
                    columns=keys, filter=at & (pads.field(OP) == "R"))
                consolidated = self.reader.dataset(ref, TableKind.CONSOLIDATED)
                parts = [pa.Table.from_batches([b]).join(seen, keys, join_type="left anti")
                         for b in consolidated.to_batches(filter=at) if b.num_rows]
                rows = pa.concat_tables(parts) if parts else consolidated.schema.empty_table()
                n = rows.num_rows
                base = min(lo for lo, _ in chunks.values())
                rows = rows.drop_columns([DELETED, DELETED_AT]) \
                    .append_column(SEQ, pa.array(range(base, base + n), pa.int64())) \
                    .append_column(OP, pa.repeat(pa.scalar("R"), n)) \
                    .append_column(UNCHANGED, pa.nulls(n, UNCHANGED_TYPE))
            dt = self._load(path)
            if dt is None:
                raise SinkWriteError(f"{ref}: the snapshot's {into} table is missing")
            target = _arrow_schema(dt)
            _write_delta(dt, _to_target(_conform(rows, target, ref), target), mode="append",
                         commit_properties=CommitProperties(
                             app_transactions=[
                                 Transaction(self.snapshot_app_id(ref, into, name), version)
                                 for name in chunks],
                             custom_metadata={"cdcengine.snapshot": "mirror"}))
        self._tables.pop(path, None)
        return n

    def finish_snapshot(self, ref: TableRef, kind: TableKind | str, *, version: int) -> None:
        """Mark the table loaded: an empty commit carrying its app id at `version` (the
        earliest finished chunk's point, from where the stream replays its changes)."""
        kind = TableKind(kind)
        path = self._writable_path(ref, kind)
        try:
            dt = self._load(path)
            if dt is None:
                raise SinkWriteError(f"{ref}: the snapshot's {kind} table is missing")
            _write_delta(dt, _arrow_schema(dt).empty_table(), mode="append",
                         commit_properties=self._commit_properties(ref, kind, version))
        except (DeltaError, OSError) as exc:
            raise SinkWriteError(f"finishing the snapshot of {ref} failed "
                                 f"({type(exc).__name__})") from exc
        self._tables.pop(path, None)
        self._after_commit(ref, kind, version)
        log.info("snapshot_loaded", table=ref.qualified, kind=str(kind), lsn=format_lsn(version))


def _snapshot_rows(
    chunk: pa.Table, kind: TableKind, *, version: int, stamp_us: int, seq_base: int
) -> pa.Table:
    """Snapshot data columns as rows of `kind`: consolidated rows stamped `_cdc_lsn = version`,
    not deleted; append rows are `R` rows numbered from `seq_base`."""
    n = chunk.num_rows
    cols = {c: chunk.column(c) for c in chunk.column_names}
    cols[LSN] = pa.repeat(pa.scalar(version, pa.int64()), n)
    cols[COMMITTED_AT] = pa.repeat(pa.scalar(stamp_us, pa.int64()), n).cast(TIMESTAMP_UTC)
    if kind is TableKind.CONSOLIDATED:
        cols[DELETED] = pa.repeat(pa.scalar(False), n)
        cols[DELETED_AT] = pa.nulls(n, TIMESTAMP_UTC)
    else:
        ones = pa.repeat(pa.scalar(1, pa.int64()), n)
        cols[SEQ] = pc.add(pc.cumulative_sum(ones), seq_base - 1) if n else ones
        cols[OP] = pa.repeat(pa.scalar("R"), n)
        cols[UNCHANGED] = pa.nulls(n, UNCHANGED_TYPE)
    return pa.table(cols)

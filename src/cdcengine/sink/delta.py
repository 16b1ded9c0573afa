"""The Delta Lake sink (deltalake / delta-rs): every write of the engine goes through it. (The
readers of `verify`, `history` and the demo still open Delta tables themselves.)

Layout (SPEC §5): for source table `schema.table` and destination `D`, the consolidated table is
`D/schema/table` and the append (change-log) table `D/schema/table_cdc`. Progress is a Delta
transaction action, `app_id = cdcengine/<source>/<schema.table>/<kind>` with `version` = end LSN
of the last source transaction included, written in the SAME commit as the data. A write whose
version is at or below the table's applied version is skipped, so a replay after a crash
neither loses nor duplicates anything.

How a consolidated batch lands (one Delta commit per call):
1. `fold_for_merge`: one row per key (delta-rs inserts duplicates when a merge source repeats
   a key in the not-matched branch), unchanged-TOAST values and delete rows filled from the batch.
2. New data columns are added as nullable columns in a commit of their own first (no txn action:
   adding a column is harmless to replay; the txn action always rides on the data commit).
3. One `DeltaTable.merge` with `streamed_exec=False` (lets delta-rs prune target files with the
   source's min/max) and, for a single integer, string or date key, an explicit key-range
   predicate. Clauses, first match wins: matched & D -> delete (hard), or soft delete: only
   `_cdc_deleted`, `_cdc_deleted_at`, `_cdc_lsn`, `_cdc_committed_at` change, except when the
   batch changed the row before deleting it (`_cdc_has_values`): then the data columns the
   batch knew are written too, so the row keeps its LAST values; matched & I/U/R -> every data
   column the batch sent except that row's unchanged-TOAST ones, undeleted; not matched & not
   D -> insert; not matched & D -> nothing.
4. A merge that changes no row does not commit in delta-rs 1.6.6 (and so would drop the txn
   action): the sink then commits an empty append carrying it.

deltalake 1.6.6 facts this module relies on (see the tests): `write_deltalake` refuses custom
table properties (`cdcengine.layout`), `DeltaTable.create(..., raise_if_key_not_exists=False)`
takes them; `merge(merge_schema=True)` adding a timestamp-without-timezone column commits a
table that no reader can open (no protocol upgrade), `alter.add_columns` upgrades correctly;
`vacuum` defaults to `dry_run=True`. Some of its calls block on delta-rs' tokio runtime
while holding the GIL, so deltalake is only ever given materialised data (`_write_delta`, see
"feeding deltalake" below): a Python-backed reader deadlocks it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import structlog
from deltalake import CommitProperties, DeltaTable, Field, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError

from cdcengine import failpoints
from cdcengine.config import SourceConfig, TableMode
from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef, is_engine_column
from cdcengine.secrets import option_secrets, scrub
from cdcengine.sink.base import (
    AddedColumns,
    CommitResult,
    MaintenanceResult,
    SinkSchemaError,
    SinkWriteError,
    TableKind,
    TableSpec,
    WriteResult,
    kinds_for,
)
from cdcengine.sink.destination import local_path
from cdcengine.sink.fold import (
    COMMITTED_AT,
    HAS_VALUES,
    LSN,
    OP,
    SEQ,
    UNCHANGED,
    UNCHANGED_TYPE,
    append_lookup_keys,
    append_rows,
    data_columns,
    fill_before,
    fold_for_merge,
    has_key_change_with_unchanged,
    newest_commit_us,
    rows_after,
    unresolved_rows,
)

log = structlog.get_logger("cdcengine.sink")

LAYOUT_PROPERTY = "cdcengine.layout"
SNAPSHOT_PLAN_PROPERTY = "cdcengine.snapshot.plan"
LAYOUT_VERSION = "1"
DELETED = "_cdc_deleted"
DELETED_AT = "_cdc_deleted_at"
# the engine columns every stored table of a kind has (a table without them is not ours)
_ENGINE_COLUMNS = {
    TableKind.CONSOLIDATED: (LSN, COMMITTED_AT, DELETED, DELETED_AT),
    TableKind.APPEND: (LSN, SEQ, OP, COMMITTED_AT),
}
TIMESTAMP_UTC = pa.timestamp("us", tz="UTC")

CONSOLIDATED_ENGINE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(LSN, pa.int64()),
    pa.field(COMMITTED_AT, TIMESTAMP_UTC),
    pa.field(DELETED, pa.bool_()),
    pa.field(DELETED_AT, TIMESTAMP_UTC),
)
"""Engine columns of a consolidated table, after the data columns (SPEC §5)."""

APPEND_ENGINE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(LSN, pa.int64()),
    pa.field(SEQ, pa.int64()),
    pa.field(OP, pa.string()),
    pa.field(COMMITTED_AT, TIMESTAMP_UTC),
    pa.field(UNCHANGED, UNCHANGED_TYPE),
)
"""Engine columns of an append (change-log) table, after the data columns (SPEC §5)."""

SPILL_BYTES = 64 * 1024 * 1024
"""Arrow bytes of one snapshot chunk (per Delta table) held in memory before the rest goes to a
local spool file (`write_snapshot_chunk`); a chunk is usually one piece of at most 100k rows."""

_MAX_VERSION = (1 << 63) - 1
_SOURCE_ALIAS = "s"
_TARGET_ALIAS = "t"


@dataclass(frozen=True, slots=True)
class _Applied:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unresolved_unchanged: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaTableInfo:
    path: str
    exists: bool
    version: int | None = None
    applied_version: int | None = None
    rows: int | None = None


@dataclass(frozen=True, slots=True)
class DeltaMaintenance:
    """What `DeltaSink.maintain` does; the defaults are safe for readers of the last 7 days.

    - `compact`: rewrite small files into `target_file_size` files (None: delta-rs default,
      the table's `delta.targetFileSize` or 100 MB). Compaction commits with dataChange=false.
    - `checkpoint_interval`: write a checkpoint when at least this many commits happened since
      the last one this sink wrote (also stored as `delta.checkpointInterval` on new tables,
      so delta-rs checkpoints on its own while writing).
    - `vacuum_retention_hours`: delete files unreferenced for this long (None: no vacuum);
      below the table's `delta.deletedFileRetentionDuration` (7 days) only with
      `enforce_retention_duration=False`.
    - `cleanup_log`: after a checkpoint, delete log files older than `delta.logRetentionDuration`.
    """

    compact: bool = True
    target_file_size: int | None = None
    checkpoint_interval: int = 100
    vacuum_retention_hours: int | None = 168
    enforce_retention_duration: bool = True
    cleanup_log: bool = True


def quote_ident(name: str) -> str:
    """A column name as a delta-rs (DataFusion) SQL identifier: backticks, doubled inside."""
    return "`" + name.replace("`", "``") + "`"


def quote_text(value: str) -> str:
    """A SQL string literal (standard SQL: quotes doubled, backslash literal)."""
    return "'" + value.replace("'", "''") + "'"


class DeltaSink:
    """Writes change batches of one source into Delta tables under `destination`, exactly once.

    `source` names the source in every app id; `storage_options` go to delta-rs unchanged
    (object-store credentials: never logged, never in a repr). One writer thread owns an instance
    (it caches open table handles); `read_table`, `row_count`, `exists` and `applied_version`
    open fresh handles and may be called from any thread.
    """

    def __init__(
        self,
        destination: str,
        *,
        source: str,
        storage_options: Mapping[str, str] | None = None,
        maintenance: DeltaMaintenance | None = None,
        target_file_size: int | None = None,
        spill_bytes: int = SPILL_BYTES,
        spill_dir: str | None = None,
    ) -> None:
        if not destination:
            raise ValueError("DeltaSink needs a destination")
        if not source:
            raise ValueError("DeltaSink needs a source name")
        self.destination = destination
        self.source = source
        self.maintenance = maintenance or DeltaMaintenance()
        self.target_file_size = target_file_size
        self.spill_bytes, self.spill_dir = spill_bytes, spill_dir
        self._storage_options: dict[str, str] | None = (
            dict(storage_options) if storage_options else None
        )
        self._tables: dict[str, DeltaTable] = {}
        self._checkpointed_at: dict[str, int] = {}

    @classmethod
    def for_source(cls, source: SourceConfig, *, destination: str | None = None) -> DeltaSink:
        """The sink of a configured source (its destination and storage options), or of
        another `destination` under the same options (a staging area)."""
        return cls(destination or source.destination, source=source.name,
                   storage_options=dict(source.destination_options) or None)

    def __repr__(self) -> str:
        return f"DeltaSink(destination={self.destination!r}, source={self.source!r})"

    # --- names -------------------------------------------------------------------------

    def path(self, ref: TableRef, kind: TableKind | str) -> str:
        """`D/schema/table` or `D/schema/table_cdc` (SPEC §5)."""
        return ref.delta_path(self.destination, append=TableKind(kind) is TableKind.APPEND)

    def app_id(self, ref: TableRef, kind: TableKind | str) -> str:
        """`cdcengine/<source>/<schema.table>/<kind>`: the txn app id of one Delta table."""
        return f"cdcengine/{self.source}/{ref.qualified}/{TableKind(kind)}"

    # --- progress ----------------------------------------------------------------------

    def applied_version(self, ref: TableRef, kind: TableKind | str) -> int | None:
        """The txn version of this table's app id in the Delta log; None without table or id.

        Reads the log afresh (no cached handle), so it reflects every commit made so far,
        including one whose writer crashed before it could return.
        """
        dt = self._load(self.path(ref, kind))
        return None if dt is None else self._txn_version(dt, ref, kind)

    def resume_version(self, ref: TableRef, mode: TableMode) -> int | None:
        """Minimum applied version over the tables `mode` writes; None if any has none."""
        versions = [self.applied_version(ref, kind) for kind in kinds_for(mode)]
        if not versions or any(v is None for v in versions):
            return None
        return min(v for v in versions if v is not None)

    # --- writing -----------------------------------------------------------------------

    def write(
        self, ref: TableRef, batch: pa.Table, *, spec: TableSpec, version: int,
        added: AddedColumns | None = None,
    ) -> WriteResult:
        """The stream's write (the `Sink` protocol): `write_append` and/or `write_consolidated`
        as `spec.mode` says (append first), each given only the rows above its applied version.

        A kind with no row left is skipped without a commit. `added`: columns added at the
        source with a constant default, backfilled into the consolidated table first
        (`_backfill_added`). A commit failure is raised with `SinkWriteError.kind` set; the
        kinds committed before it stay (a retry skips them). The returned version is the
        durable position: the batch's version, or the minimum of the kinds' applied versions
        when that is higher (a replay).
        """
        kinds = kinds_for(spec.mode)
        consolidated = batch
        if added is not None and added.values and TableKind.CONSOLIDATED in kinds:
            consolidated = self._backfill_added(ref, batch, added)
        commits: list[CommitResult] = []
        for j, kind in enumerate(kinds):
            if j:
                failpoints.hit("between_kinds")
            path = self.path(ref, kind)
            with self._delta_errors(path, ref, kind):
                dt = self._cached(path)
                applied = None if dt is None else self._txn_version(dt, ref, kind)
            rows = rows_after(consolidated if kind is TableKind.CONSOLIDATED else batch, applied)
            if applied is not None and (version <= applied or rows.num_rows == 0):
                commits.append(self._skipped(ref, kind, applied, 0, version))
                continue
            try:
                if kind is TableKind.APPEND:
                    # `both`: the consolidated table is written after this, so it still holds
                    # the values as of before the batch
                    commit = self.write_append(
                        ref, rows, version=version, key=spec.key,
                        fill_from_consolidated=TableKind.CONSOLIDATED in kinds)
                else:
                    commit = self.write_consolidated(ref, rows, key=spec.key, version=version,
                                                     hard_deletes=spec.hard_deletes)
            except SinkWriteError as exc:
                exc.kind = exc.kind or kind
                raise
            commits.append(replace(commit, rows_in=rows.num_rows, bytes_in=rows.nbytes,
                                   newest_commit_us=newest_commit_us(rows)))
        durable = min((c.version for c in commits), default=version)
        return WriteResult(table=ref, version=max(version, durable), commits=tuple(commits))

    def _backfill_added(self, ref: TableRef, batch: pa.Table, added: AddedColumns) -> pa.Table:
        """Columns added at the source whose older rows hold a constant default (SPEC §6): the
        stored consolidated rows up to `added.upto` (default: the table's applied version) get
        it (`backfill_column`: one commit carrying the current version, so a replay is
        harmless), and so do the batch's rows from before the change. A table not created yet
        has no old rows."""
        kind = TableKind.CONSOLIDATED
        if self.data_columns(ref, kind) is None:
            return batch
        upto = added.upto
        if upto is None:
            upto = self.applied_version(ref, kind) or 0
        for column, value in sorted(added.values.items()):
            if column not in batch.column_names:
                continue
            self.backfill_column(ref, kind, column, value, upto_lsn=upto)
            batch = fill_before(batch, column, value, upto)
        return batch

    def write_consolidated(
        self,
        ref: TableRef,
        batch: pa.Table,
        *,
        key: Sequence[str],
        version: int,
        hard_deletes: bool = False,
    ) -> CommitResult:
        """Merge one batch into the consolidated table in ONE Delta commit carrying the txn.

        Skipped (no commit, the applied version returned) when `version` <= applied version.
        Creates the table on first use (properties `cdcengine.layout = 1`,
        `delta.dataSkippingStatsColumns` = key columns + `_cdc_lsn`). An empty batch still
        commits the txn action, so progress advances without data. After it returns,
        `applied_version(ref, "consolidated") >= version`. Raises `SinkSchemaError` when the
        batch's columns do not fit the table, `SinkWriteError` when Delta fails (retry the
        same call), ValueError for a malformed batch (a caller bug).
        """
        kind = TableKind.CONSOLIDATED
        started = time.perf_counter()
        keys = list(key)
        if not keys:
            raise ValueError(f"{ref}: a consolidated table needs key columns")
        batch = _check_batch(batch, version, require=(OP, LSN, COMMITTED_AT))
        path = self._writable_path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path)
            applied = None if dt is None else self._txn_version(dt, ref, kind)
            if applied is not None and version <= applied:
                return self._skipped(ref, kind, applied, batch.num_rows, version)
            batch, truncate = _after_last_truncate(batch)
            if has_key_change_with_unchanged(batch, keys):
                # a key-changing update that kept a TOASTed column: its value belongs to the
                # OLD key, stored in this very table (the merge alone would insert NULL)
                batch = append_rows(batch, keys,
                                    prior=self._last_known(ref, batch, keys, applied))
            folded = fold_for_merge(batch, keys)
            _assert_unique(folded, keys, ref)
            created = dt is None
            if dt is None:
                dt = self._create(path, ref, kind, _consolidated_schema(folded), keys)
                added: tuple[str, ...] = ()
            else:
                self._check_layout(dt, ref, path, kind)
                added = self._add_new_columns(dt, ref, folded, kind)
                self._widen(dt, ref, kind, folded)
            target = _arrow_schema(dt)
            # a stored column the batch lacks was dropped at the source: null from now on
            source = _with_missing_as_null(_conform(folded, target, ref), target)
            props = self._commit_properties(ref, kind, version)
            result = self._merge_or_append(
                dt, ref, source, target, keys, props, hard_deletes=hard_deletes, created=created,
                truncate=None if created else truncate,
            )
            self._after_commit(ref, kind, version)
        out = CommitResult(
            table=ref,
            kind=kind,
            version=version,
            skipped=False,
            delta_version=dt.version(),
            rows_in=batch.num_rows,
            rows_written=source.num_rows,
            columns_added=added,
            inserted=result.inserted,
            updated=result.updated,
            deleted=result.deleted,
            unresolved_unchanged=result.unresolved_unchanged,
            duration_ms=_ms(started),
        )
        self._log_commit(out)
        return out

    def write_append(
        self,
        ref: TableRef,
        batch: pa.Table,
        *,
        version: int,
        key: Sequence[str] = (),
        fill_from_consolidated: bool = False,
    ) -> CommitResult:
        """Append one batch to the change-log table in ONE Delta commit carrying the txn.

        Rows keep their order; unchanged-TOAST columns and delete rows are filled from earlier
        changes of the same `key` in the batch where known (`append_rows`); what stays unknown
        is listed in `_cdc_unchanged`. Same skip rule, creation, empty-batch and error behaviour
        as `write_consolidated`. `(_cdc_lsn, _cdc_seq)` stays unique as long as the caller
        sends each source transaction once per version (a replay is skipped).

        `fill_from_consolidated` (table mode `both`, where the append table of a batch is
        written BEFORE its consolidated table): what the batch cannot resolve (a D without an
        earlier change of its key in the batch, an unchanged-TOAST column no earlier change
        knew) is filled from the stored consolidated row of the key, which still holds the
        values as of before the batch (see `_last_known`).
        """
        kind = TableKind.APPEND
        started = time.perf_counter()
        batch = _check_batch(batch, version, require=(OP, LSN, SEQ, COMMITTED_AT))
        path = self._writable_path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path)
            applied = None if dt is None else self._txn_version(dt, ref, kind)
            if applied is not None and version <= applied:
                return self._skipped(ref, kind, applied, batch.num_rows, version)
            prior = (
                self._last_known(ref, batch, list(key), applied)
                if fill_from_consolidated and key
                else None
            )
            rows = append_rows(batch, key, prior=prior)
            if dt is None:
                dt = self._create(path, ref, kind, _append_schema(rows), list(key))
                added: tuple[str, ...] = ()
            else:
                self._check_layout(dt, ref, path, kind)
                added = self._add_new_columns(dt, ref, rows, kind)
                self._widen(dt, ref, kind, rows)
            target = _arrow_schema(dt)
            out_rows = _to_target(_conform(rows, target, ref), target)
            _write_delta(
                dt,
                out_rows,
                mode="append",
                target_file_size=self.target_file_size,
                commit_properties=self._commit_properties(ref, kind, version),
            )
            self._after_commit(ref, kind, version)
        out = CommitResult(
            table=ref,
            kind=kind,
            version=version,
            skipped=False,
            delta_version=dt.version(),
            rows_in=batch.num_rows,
            rows_written=out_rows.num_rows,
            inserted=out_rows.num_rows,
            unresolved_unchanged=unresolved_rows(out_rows),
            columns_added=added,
            duration_ms=_ms(started),
        )
        self._log_commit(out)
        return out

    def _last_known(
        self, ref: TableRef, batch: pa.Table, keys: list[str], applied: int | None
    ) -> pa.Table | None:
        """The stored consolidated rows of the keys `batch` cannot resolve on its own, as they
        were BEFORE the batch (None when there is nothing to look up or nothing usable).

        Only the candidate keys (`append_lookup_keys`) are read, through a key filter on the
        pyarrow dataset (files and row groups whose statistics exclude the keys are skipped),
        and only the batch's data columns the table holds. A stored row is used only when it
        is live and older than the key's first change in the batch, and only when the
        consolidated table has applied at least what the append table had (so no change
        between the stored row and the batch is missing: after a crash between the two
        kinds the consolidated table lags, and then nothing is filled).
        """
        wanted = append_lookup_keys(batch, keys)
        if wanted.num_rows == 0:
            return None
        dt = self._cached(self.path(ref, TableKind.CONSOLIDATED))
        if dt is None:
            return None
        stored_version = self._txn_version(dt, ref, TableKind.CONSOLIDATED)
        if stored_version is None or (applied is not None and stored_version < applied):
            log.info("append_fill_skipped", table=ref.qualified, reason="consolidated_behind",
                     consolidated_lsn=None if stored_version is None
                     else format_lsn(stored_version))
            return None
        target = _arrow_schema(dt)
        if any(k not in target.names for k in keys):
            return None
        columns = [c for c in data_columns(batch) if c in target.names]
        stored = _scan_keys(dt.to_pyarrow_dataset(), target, wanted, keys, [*columns, LSN])
        if stored.num_rows == 0:
            return None
        # exact key match (the per-column filters over-approximate a composite key), and only
        # rows older than the key's first change in this batch
        index = stored.select([*keys, LSN]).rename_columns([*keys, "__stored_lsn"])
        index = index.append_column("__row", pa.array(range(stored.num_rows), pa.int64()))
        probe_schema = pa.schema([target.field(k) for k in keys]
                                 + [pa.field("__first_lsn", pa.int64())])
        probe = wanted.rename_columns([*keys, "__first_lsn"]).cast(probe_schema)
        joined = index.join(probe, keys=keys, join_type="inner", use_threads=False)
        older = pc.fill_null(pc.less(joined.column("__stored_lsn"),
                                     joined.column("__first_lsn")), False)
        rows = joined.column("__row").filter(older)
        if len(rows) == 0:
            return None
        return stored.select(columns).take(rows)

    # --- upkeep ------------------------------------------------------------------------

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
            dt = self._load(self._writable_path(ref, kind))
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
                rows = self.dataset(ref, TableKind.APPEND).to_table(
                    filter=at & (pads.field(OP) == "R") & picked)
                n = rows.num_rows
                rows = rows.drop_columns([SEQ, OP, UNCHANGED]) \
                    .append_column(DELETED, pa.repeat(pa.scalar(False), n)) \
                    .append_column(DELETED_AT, pa.nulls(n, TIMESTAMP_UTC))
            else:
                # the consolidated rows at `version` the change log has no R row for
                seen = self.dataset(ref, TableKind.APPEND).to_table(
                    columns=keys, filter=at & (pads.field(OP) == "R"))
                consolidated = self.dataset(ref, TableKind.CONSOLIDATED)
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

    def data_columns(self, ref: TableRef, kind: TableKind | str) -> tuple[str, ...] | None:
        """The stored data columns (engine columns left out); None when the table is missing.
        Uses the cached handle: call it from the table's writer thread."""
        dt = self._cached(self.path(ref, kind))
        if dt is None:
            return None
        return tuple(n for n in _arrow_schema(dt).names if not is_engine_column(n))

    def backfill_column(
        self, ref: TableRef, kind: TableKind | str, column: str, value: pa.Scalar, *,
        upto_lsn: int,
    ) -> int:
        """Set `column` to `value` in every stored row with `_cdc_lsn <= upto_lsn` where it is
        null: the value a source `ADD COLUMN … DEFAULT <constant>` gave existing rows without
        writing WAL. The column is added first when the table lacks it.

        ONE commit carrying the table's CURRENT txn version (it applies no source change), so
        it is idempotent: a replay finds nothing null left (no commit at all). Returns the rows
        updated. A missing table is a no-op."""
        kind = TableKind(kind)
        path = self._writable_path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path)
            if dt is None:
                return 0
            typed = pa.table({column: pa.array([value.as_py()], value.type)})
            self._add_new_columns(dt, ref, typed, kind)
            target = _arrow_schema(dt)
            stored = target.field(column).type
            fill = typed.column(column).cast(stored)
            applied = self._txn_version(dt, ref, kind)
            props = CommitProperties(
                app_transactions=[Transaction(self.app_id(ref, kind), applied)]
                if applied is not None else None,
                custom_metadata={"cdcengine.operation": "backfill_default",
                                 "cdcengine.column": column})
            col = f"{_TARGET_ALIAS}.{quote_ident(column)}"
            metrics: dict[str, Any] = dt.merge(
                _materialised(pa.table({"__cdc_fill": fill})), "true",
                source_alias=_SOURCE_ALIAS,
                target_alias=_TARGET_ALIAS, streamed_exec=False, commit_properties=props,
            ).when_matched_update(
                {quote_ident(column): f"{_SOURCE_ALIAS}.__cdc_fill"},
                predicate=f"{_TARGET_ALIAS}.{LSN} <= {int(upto_lsn)} AND {col} IS NULL",
            ).execute()
        updated = int(metrics.get("num_target_rows_updated", 0))
        log.info("delta_column_backfilled", table=ref.qualified, kind=str(kind), column=column,
                 rows=updated, upto_lsn=format_lsn(upto_lsn))
        return updated

    def maintain(self, ref: TableRef, kind: TableKind | str) -> MaintenanceResult:
        """Compact, checkpoint and vacuum one table as `self.maintenance` says.

        Never changes the rows a reader sees nor the txn versions (compaction commits carry no
        data change; checkpoints keep txn actions). A missing table is a no-op. Call it from
        the table's writer thread, between writes.
        """
        kind = TableKind(kind)
        started = time.perf_counter()
        policy = self.maintenance
        path = self.path(ref, kind)
        removed = added = vacuumed = 0
        checkpointed = False
        try:
            dt = self._cached(path)
            if dt is None:
                return MaintenanceResult(table=ref, kind=kind)
            if policy.compact:
                metrics = dt.optimize.compact(target_size=policy.target_file_size)
                removed = int(metrics.get("numFilesRemoved", 0))
                added = int(metrics.get("numFilesAdded", 0))
            current = dt.version()
            last = self._checkpointed_at.get(path)
            if last is None or current - last >= policy.checkpoint_interval or removed:
                dt.create_checkpoint()
                self._checkpointed_at[path] = current
                checkpointed = True
                if policy.cleanup_log:
                    dt.cleanup_metadata()
            if policy.vacuum_retention_hours is not None:
                vacuumed = len(
                    dt.vacuum(
                        retention_hours=policy.vacuum_retention_hours,
                        dry_run=False,
                        enforce_retention_duration=policy.enforce_retention_duration,
                    )
                )
        except (DeltaError, OSError) as exc:
            self._tables.pop(path, None)
            raise SinkWriteError(
                f"maintenance of the Delta {kind} table of {ref} failed ({type(exc).__name__})"
            ) from exc
        result = MaintenanceResult(
            table=ref,
            kind=kind,
            files_removed=removed,
            files_added=added,
            checkpointed=checkpointed,
            vacuumed_files=vacuumed,
            duration_ms=_ms(started),
        )
        log.info("delta_table_maintained", **result.to_dict())
        return result

    def close(self) -> None:
        """Drop cached table handles (nothing is buffered: every write committed). Safe twice."""
        self._tables.clear()

    # --- reading (tests, `status`) -----------------------------------------------------

    def exists(self, ref: TableRef, kind: TableKind | str) -> bool:
        """Whether the Delta table exists."""
        return self._load(self.path(ref, kind)) is not None

    def table_info(self, ref: TableRef, kind: TableKind | str) -> DeltaTableInfo:
        """Path, existence, Delta version, applied LSN and row count (consolidated: live rows)
        of one table, from one fresh read of its log."""
        kind = TableKind(kind)
        path = self.path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._load(path)
            if dt is None:
                return DeltaTableInfo(path=path, exists=False)
            if kind is TableKind.CONSOLIDATED:
                rows = int(dt.to_pyarrow_dataset().count_rows(filter=~pads.field(DELETED)))
            else:
                rows = int(dt.count())
            return DeltaTableInfo(path=path, exists=True, version=dt.version(),
                                  applied_version=self._txn_version(dt, ref, kind), rows=rows)

    def read_table(
        self, ref: TableRef, kind: TableKind | str, *, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """The table's current snapshot as a pyarrow Table (soft-deleted rows included).

        Raises LookupError when the table does not exist.
        """
        dt = self._load(self.path(ref, kind))
        if dt is None:
            raise LookupError(f"no Delta {TableKind(kind)} table for {ref}")
        return dt.to_pyarrow_table(columns=list(columns) if columns is not None else None)

    def dataset(self, ref: TableRef, kind: TableKind | str) -> pads.Dataset:
        """A pyarrow dataset of the current snapshot (for duckdb: `... FROM dset`)."""
        dt = self._load(self.path(ref, kind))
        if dt is None:
            raise LookupError(f"no Delta {TableKind(kind)} table for {ref}")
        return dt.to_pyarrow_dataset()

    def row_count(
        self, ref: TableRef, kind: TableKind | str, *, live_only: bool = False
    ) -> int | None:
        """Rows in the table (None when it does not exist). `live_only`: consolidated rows
        not soft-deleted."""
        kind = TableKind(kind)
        dt = self._load(self.path(ref, kind))
        if dt is None:
            return None
        if live_only and kind is TableKind.CONSOLIDATED:
            return int(dt.to_pyarrow_dataset().count_rows(filter=~pads.field(DELETED)))
        return int(dt.count())

    # --- internals ---------------------------------------------------------------------

    @contextmanager
    def _delta_errors(self, path: str, ref: TableRef, kind: TableKind) -> Iterator[None]:
        """Delta/IO failures as `SinkWriteError` (retryable), values that do not fit the stored
        types as `SinkSchemaError`; the cached table handle is dropped on any failure."""
        try:
            yield
        except (DeltaError, OSError) as exc:
            self._tables.pop(path, None)
            detail = _first_line(exc, self._storage_options)
            # the destination's own words say what is wrong (permission denied, no space, a
            # read-only file system); credentials are scrubbed from them
            raise SinkWriteError(
                f"Delta {kind} table of {ref} failed ({type(exc).__name__}"
                f"{': ' + detail if detail else ''})",
                table_specific=_table_specific(exc), detail=detail,
            ) from exc
        except pa.ArrowException as exc:
            self._tables.pop(path, None)
            raise SinkSchemaError(
                f"the batch for the Delta {kind} table of {ref} does not fit its schema "
                f"({type(exc).__name__})",
                table=ref.qualified,
            ) from exc
        except BaseException:
            self._tables.pop(path, None)
            raise

    def _writable_path(self, ref: TableRef, kind: TableKind) -> str:
        """The table's path, refused when deltalake 1.6.6 would corrupt it.

        delta-rs percent-decodes a local path (and decodes a `file://` URL twice) when it reads
        the log back, but writes the commit under the literal path: a path holding `%` gets a
        commit it can never read. Table segments are escaped with `~XX`, so only a destination
        that itself contains `%` gets here; it is refused before anything is written rather
        than failing on every retry.
        """
        path = self.path(ref, kind)
        if "%" in path:
            raise SinkWriteError(
                f"the Delta path of {ref} ({path}) contains '%', which deltalake 1.6.6 "
                "cannot read back",
                retryable=False,
                fix="Use a destination path without '%'.",
            )
        return path

    def _load(self, path: str) -> DeltaTable | None:
        if not DeltaTable.is_deltatable(path, storage_options=self._storage_options):
            return None
        return DeltaTable(path, storage_options=self._storage_options)

    def _cached(self, path: str) -> DeltaTable | None:
        dt = self._tables.get(path)
        if dt is not None:
            dt.update_incremental()
            return dt
        dt = self._load(path)
        if dt is not None:
            self._tables[path] = dt
        return dt

    def _txn_version(self, dt: DeltaTable, ref: TableRef, kind: TableKind | str) -> int | None:
        value = dt.transaction_version(self.app_id(ref, kind))
        return None if value is None else int(value)

    def _commit_properties(self, ref: TableRef, kind: TableKind, version: int) -> CommitProperties:
        return CommitProperties(
            app_transactions=[Transaction(self.app_id(ref, kind), version)],
            custom_metadata={"cdcengine.lsn": format_lsn(version)},
        )

    def _after_commit(self, ref: TableRef, kind: TableKind, version: int) -> None:
        """Hook between the durable commit and the return; tests make it "crash" here."""

    def _skipped(
        self, ref: TableRef, kind: TableKind, applied: int, rows: int, version: int
    ) -> CommitResult:
        log.info(
            "delta_commit_skipped",
            table=ref.qualified,
            kind=str(kind),
            lsn=format_lsn(version),
            applied_lsn=format_lsn(applied),
            rows=rows,
        )
        return CommitResult(table=ref, kind=kind, version=applied, skipped=True, rows_in=rows)

    def _create(
        self, path: str, ref: TableRef, kind: TableKind, schema: pa.Schema, keys: list[str]
    ) -> DeltaTable:
        stats = [*keys, LSN] if kind is TableKind.CONSOLIDATED else [*keys, LSN, COMMITTED_AT]
        configuration: dict[str, str | None] = {
            LAYOUT_PROPERTY: LAYOUT_VERSION,
            "delta.dataSkippingStatsColumns": ",".join(quote_ident(c) for c in stats),
            "delta.checkpointInterval": str(self.maintenance.checkpoint_interval),
        }
        _check_storable(schema, ref)
        local = local_path(path)
        if local is not None and local.is_dir() and any(
                p.name != "_delta_log" for p in local.iterdir()):
            # never turn a folder of someone's files into a Delta table
            raise SinkSchemaError(
                f"{path} already holds files that are not a Delta table; the engine does not "
                "write its tables into other files (point destination at an empty directory)",
                table=ref.qualified)
        dt = DeltaTable.create(
            path,
            schema,
            mode="error",
            configuration=configuration,
            storage_options=self._storage_options,
            raise_if_key_not_exists=False,
        )
        self._tables[path] = dt
        log.info("delta_table_created", table=ref.qualified, kind=str(kind), path=path)
        return dt

    def _check_layout(self, dt: DeltaTable, ref: TableRef, path: str, kind: TableKind) -> None:
        layout = dt.metadata().configuration.get(LAYOUT_PROPERTY)
        if layout != LAYOUT_VERSION:
            raise SinkSchemaError(
                f"{path} holds a Delta table that is not a cdcengine layout-{LAYOUT_VERSION} "
                f"table ({LAYOUT_PROPERTY}={layout!r})",
                table=ref.qualified,
            )
        present = set(_arrow_schema(dt).names)
        fields = (
            CONSOLIDATED_ENGINE_FIELDS if kind is TableKind.CONSOLIDATED else (APPEND_ENGINE_FIELDS)
        )
        missing = [f.name for f in fields if f.name not in present]
        if missing:
            raise SinkSchemaError(
                f"{path} lacks the engine column(s) {missing}", table=ref.qualified
            )

    def _add_new_columns(
        self, dt: DeltaTable, ref: TableRef, batch: pa.Table, kind: TableKind
    ) -> tuple[str, ...]:
        """Add the batch's data columns the table lacks (nullable), in one commit of their own.

        That commit carries no txn action: replaying it is harmless (the columns then exist),
        and the data commit that follows carries the progress.
        """
        target = _arrow_schema(dt)
        stored = {name.lower(): name for name in target.names}
        new: list[pa.Field] = []
        for name in data_columns(batch):
            existing = stored.get(name.lower())
            if existing is None:
                new.append(pa.field(name, _normalise(batch.schema.field(name).type), True))
            elif existing != name:
                raise SinkSchemaError(
                    f"{ref}: column {name!r} clashes with stored column {existing!r} "
                    "(Delta column names ignore case)",
                    table=ref.qualified,
                    column=name,
                )
        if not new:
            return ()
        _check_storable(pa.schema(new), ref)
        dt.alter.add_columns([Field.from_arrow(f) for f in new])
        names = tuple(f.name for f in new)
        log.info("delta_columns_added", table=ref.qualified, kind=str(kind), columns=list(names))
        return names

    def _widen(self, dt: DeltaTable, ref: TableRef, kind: TableKind, batch: pa.Table) -> None:
        """Rewrite the table with the wider types a source column now has (int4 → int8, a
        wider numeric, …), in one commit that keeps the applied version's txn action.

        delta-rs neither widens on merge nor refuses: it would truncate silently. A change
        that is not a widening is left to `_conform`, which refuses it (`SinkSchemaError`).
        """
        target = _arrow_schema(dt)
        wider: dict[str, pa.DataType] = {}
        for name in data_columns(batch):
            index = target.get_field_index(name)
            if index < 0:
                continue
            stored, incoming = target.field(index).type, _normalise(batch.schema.field(name).type)
            if incoming != stored and widens(stored, incoming):
                wider[name] = incoming
        if not wider:
            return
        started = time.perf_counter()
        table = dt.to_pyarrow_table()
        for name, type_ in wider.items():
            index = table.schema.get_field_index(name)
            table = table.set_column(index, pa.field(name, type_, True),
                                     table.column(name).cast(type_))
        applied = self._txn_version(dt, ref, kind)
        props = CommitProperties(
            app_transactions=[Transaction(self.app_id(ref, kind), applied)]
            if applied is not None else None,
            custom_metadata={"cdcengine.operation": "widen"},
        )
        _write_delta(dt, table, mode="overwrite", schema_mode="overwrite",
                     commit_properties=props)
        log.info("delta_columns_widened", table=ref.qualified, kind=str(kind),
                 columns={n: str(t) for n, t in wider.items()}, rows=table.num_rows,
                 duration_ms=_ms(started))

    def _merge_or_append(
        self,
        dt: DeltaTable,
        ref: TableRef,
        source: pa.Table,
        target: pa.Schema,
        keys: list[str],
        props: CommitProperties,
        *,
        hard_deletes: bool,
        created: bool,
        truncate: _Truncate | None = None,
    ) -> _Applied:
        """Apply the folded batch in one commit carrying `props` (the txn action).

        With `truncate`, every stored row older than the TRUNCATE is deleted (soft: marked,
        stamped with its LSN and time) in the same commit; `source` holds what came after it.
        """
        is_delete = pc.fill_null(pc.equal(source.column(OP), "D"), False)
        upserts = source.filter(pc.invert(is_delete))
        if truncate is not None and source.num_rows == 0:
            return self._truncate_only(dt, truncate, target, props, hard_deletes=hard_deletes)
        if created or (source.num_rows == 0 and truncate is None):
            # A table this call created is empty: every non-delete row is an insert.
            rows = _to_target(_consolidated_rows(upserts), target)
            _write_delta(
                dt,
                rows,
                mode="append",
                target_file_size=self.target_file_size,
                commit_properties=props,
            )
            unresolved = unresolved_rows(upserts)
            self._log_unresolved(ref, unresolved)
            return _Applied(inserted=rows.num_rows, unresolved_unchanged=unresolved)

        unresolved = self._count_unresolved(dt, upserts, keys)
        data = [c for c in data_columns(source) if c in target.names]
        merger = dt.merge(
            _materialised(source),
            # a TRUNCATE reaches every stored row: no file may be pruned from the merge
            _merge_predicate(source, keys, prune=truncate is None),
            source_alias=_SOURCE_ALIAS,
            target_alias=_TARGET_ALIAS,
            streamed_exec=False,
            commit_properties=props,
        )
        s = _SOURCE_ALIAS
        # A matched row changes only when the change is newer than what it holds: replays
        # (after a restart, or over snapshot chunks copied at a later point) never regress it.
        newer = f"{_TARGET_ALIAS}.{LSN} < {s}.{LSN}"
        is_d = f"{s}.{OP} = 'D' AND {newer}"
        not_d = f"{s}.{OP} <> 'D'"
        matched_not_d = f"{not_d} AND {newer}"
        values = _value_assignments(source, data, keys)
        deleted = {
            DELETED: "true",
            DELETED_AT: f"{s}.{COMMITTED_AT}",
            LSN: f"{s}.{LSN}",
            COMMITTED_AT: f"{s}.{COMMITTED_AT}",
        }
        if hard_deletes:
            merger = merger.when_matched_delete(predicate=is_d)
        else:
            if pc.any(pc.and_(is_delete, source.column(HAS_VALUES))).as_py():
                # changed and then deleted in this batch: the row keeps its LAST values
                merger = merger.when_matched_update(
                    {**values, **deleted}, predicate=f"{is_d} AND {s}.{HAS_VALUES}"
                )
            merger = merger.when_matched_update(deleted, predicate=is_d)
        merger = merger.when_matched_update(
            {
                **values,
                LSN: f"{s}.{LSN}",
                COMMITTED_AT: f"{s}.{COMMITTED_AT}",
                DELETED: "false",
                DELETED_AT: "NULL",
            },
            predicate=matched_not_d,
        )
        merger = merger.when_not_matched_insert(_insert_assignments(data), predicate=not_d)
        if truncate is not None:
            gone = truncate.predicate(_TARGET_ALIAS + ".")
            if hard_deletes:
                merger = merger.when_not_matched_by_source_delete(predicate=gone)
            else:
                merger = merger.when_not_matched_by_source_update(truncate.updates(),
                                                                  predicate=gone)
        before = dt.version()
        metrics: dict[str, Any] = merger.execute()
        if dt.version() == before:
            # delta-rs 1.6.6 does not commit a merge that changed nothing; the txn action
            # must still be recorded, so commit an empty append carrying it.
            _write_delta(dt, target.empty_table(), mode="append", commit_properties=props)
        self._log_unresolved(ref, unresolved)
        return _Applied(
            inserted=int(metrics.get("num_target_rows_inserted", 0)),
            updated=int(metrics.get("num_target_rows_updated", 0)),
            deleted=int(metrics.get("num_target_rows_deleted", 0)),
            unresolved_unchanged=unresolved,
        )

    def _truncate_only(self, dt: DeltaTable, truncate: _Truncate, target: pa.Schema,
                       props: CommitProperties, *, hard_deletes: bool) -> _Applied:
        before = dt.version()
        if hard_deletes:
            metrics = dt.delete(truncate.predicate(""), commit_properties=props)
            done = _Applied(deleted=int(metrics.get("num_deleted_rows", 0)))
        else:
            metrics = dt.update(updates=truncate.updates(), predicate=truncate.predicate(""),
                                commit_properties=props)
            done = _Applied(updated=int(metrics.get("num_updated_rows", 0)))
        if dt.version() == before:  # nothing to delete: the txn action still gets its commit
            _write_delta(dt, target.empty_table(), mode="append", commit_properties=props)
        return done

    def _count_unresolved(self, dt: DeltaTable, upserts: pa.Table, keys: list[str]) -> int:
        """Rows with still-unchanged TOAST columns whose key the target does not hold.

        The merge will insert those with null values; this reads only the key columns of the
        files whose statistics admit the candidate keys, and only when there are candidates.
        """
        if UNCHANGED not in upserts.column_names:
            return 0
        candidates = upserts.filter(pc.is_valid(upserts.column(UNCHANGED))).select(keys)
        if candidates.num_rows == 0:
            return 0
        condition: pads.Expression | None = None
        for k in keys:
            term = pads.field(k).isin(candidates.column(k).combine_chunks())
            condition = term if condition is None else condition & term
        stored = dt.to_pyarrow_dataset().to_table(columns=keys, filter=condition)
        total = int(candidates.num_rows)
        if stored.num_rows == 0:
            return total
        found = candidates.join(stored.cast(candidates.schema), keys=keys, join_type="left semi")
        return total - int(found.num_rows)

    def _log_unresolved(self, ref: TableRef, count: int) -> None:
        if count:
            log.warning(
                "unchanged_toast_unresolved",
                table=ref.qualified,
                rows=count,
                reason="row_not_in_target",
            )

    def _log_commit(self, result: CommitResult) -> None:
        log.info(
            "delta_committed",
            table=result.table.qualified,
            kind=str(result.kind),
            lsn=format_lsn(result.version),
            delta_version=result.delta_version,
            rows=result.rows_in,
            inserted=result.inserted,
            updated=result.updated,
            deleted=result.deleted,
            duration_ms=round(result.duration_ms, 1),
        )


# --- pure helpers -----------------------------------------------------------------------


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


# --- feeding deltalake --------------------------------------------------------------------
#
# Why every input to deltalake is materialised (issue 12, defect 3). delta-rs runs each call on
# one process-wide tokio runtime (one worker per core). A write's input stream is pulled by
# those workers. When the input is Python-backed (a `pa.RecordBatchReader.from_batches` over a
# generator), each pull takes the GIL (pyarrow's PyRecordBatchReader::ReadNext). Several
# deltalake calls block on the runtime WITHOUT releasing the GIL (deltalake 1.6.6:
# `alter.set_table_properties`, `DeltaTable.is_deltatable`, `history`, `file_uris`, ...), and
# they need tokio workers to finish. So one thread in such a call holds the GIL waiting for a
# worker while every worker waits for the GIL inside another thread's write: a deadlock, seen
# with several snapshots at once (`tests/integration/test_concurrent_snapshots.py`).
#
# Once deltalake never pulls through Python, its workers never need the GIL and no deltalake
# call can wait on a thread that does: that holds for every call (writes, merges, reads, table
# properties), from every thread and every module, whatever the deltalake version releases.
# The alternatives measured worse: one process-wide lock around deltalake calls would have to
# cover every module that touches deltalake (status, verify, the HTTP thread) and would hold
# every other source's commits behind a snapshot chunk's copy; avoiding the GIL-holding calls
# leaves the hazard to the next call someone adds.


def _materialised(data: Any) -> Any:
    """`data` when deltalake can read it without Python (a `pa.Table`, a `_Mapped` spool);
    TypeError for anything else: a Python-backed reader would hand the GIL to tokio workers."""
    if isinstance(data, (pa.Table, _Mapped)):
        return data
    raise TypeError(f"deltalake must be given a pa.Table or a spooled chunk, not "
                    f"{type(data).__name__}: a Python-backed reader can deadlock delta-rs")


def _write_delta(dt: DeltaTable, data: pa.Table | _Mapped, **options: Any) -> None:
    """`write_deltalake(dt, data, **options)` on materialised data only (see above)."""
    write_deltalake(dt, _materialised(data), **options)


class _Mapped:
    """A spooled Arrow stream file read memory-mapped: a C++ reader (no GIL to pull from)."""

    def __init__(self, reader: pa.RecordBatchReader) -> None:
        self._reader = reader

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        return self._reader.__arrow_c_stream__(requested_schema)


class _Spool:
    """The rows of one Delta write, collected before the write (see `_materialised`): in memory
    up to `limit` bytes, then appended to a temporary Arrow IPC stream file in `directory`
    (the system temp dir by default), removed on exit. `data()` gives what to write."""

    def __init__(self, schema: pa.Schema, *, limit: int, directory: str | None = None) -> None:
        self.schema, self.limit, self.directory = schema, limit, directory
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0
        self._path: str | None = None
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_writer()
        self._batches.clear()
        if self._path is not None:
            with suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None

    @property
    def spilled(self) -> bool:
        return self._path is not None

    def add(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            if self._writer is None and self._bytes + batch.nbytes > self.limit:
                self._spill()
            if self._writer is not None:
                self._writer.write_batch(batch)
            else:
                self._batches.append(batch)
                self._bytes += batch.nbytes

    def _spill(self) -> None:
        fd, self._path = tempfile.mkstemp(prefix="cdcengine-chunk-", suffix=".arrows",
                                          dir=self.directory)
        os.close(fd)
        self._sink = pa.OSFile(self._path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        for batch in self._batches:
            self._writer.write_batch(batch)
        self._batches.clear()
        self._bytes = 0

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    @contextmanager
    def data(self) -> Iterator[pa.Table | _Mapped]:
        """The collected rows: a `pa.Table`, or the spool file mapped (valid inside `with`)."""
        if self._path is None:
            yield pa.Table.from_batches(self._batches, schema=self.schema)
            return
        self._close_writer()
        with pa.memory_map(self._path) as source:
            reader = pa.ipc.open_stream(source)
            try:
                yield _Mapped(reader)
            finally:
                reader.close()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _check_batch(batch: pa.Table, version: int, *, require: Sequence[str]) -> pa.Table:
    """Validate a change batch and coerce the engine columns' types; ValueError on a bug."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"version must be an int LSN, got {version!r}")
    if not 0 <= version <= _MAX_VERSION:
        raise ValueError(f"version {version} is outside 0..2^63-1")
    missing = [c for c in require if c not in batch.column_names]
    if missing:
        raise ValueError(f"change batch lacks engine column(s) {missing}")
    wanted = {
        LSN: pa.int64(),
        SEQ: pa.int64(),
        OP: pa.string(),
        COMMITTED_AT: TIMESTAMP_UTC,
        UNCHANGED: UNCHANGED_TYPE,
    }
    for name, type_ in wanted.items():
        if name in batch.column_names and batch.schema.field(name).type != type_:
            index = batch.schema.get_field_index(name)
            batch = batch.set_column(index, name, batch.column(name).cast(type_))
    if batch.num_rows:
        top = pc.max(batch.column(LSN)).as_py()
        if top is not None and top > version:
            raise ValueError(f"batch holds _cdc_lsn {top} above its version {version}")
    return batch


def _assert_unique(folded: pa.Table, keys: list[str], ref: TableRef) -> None:
    """One source row per key, or delta-rs would insert duplicates; a violation is a bug."""
    if folded.num_rows <= 1:
        return
    distinct = folded.select(keys).group_by(keys, use_threads=False).aggregate([]).num_rows
    if distinct != folded.num_rows:
        raise AssertionError(f"{ref}: folded batch has {folded.num_rows} rows for {distinct} keys")


def _normalise(type_: pa.DataType) -> pa.DataType:
    """The Arrow type Delta stores for `type_` (what reading the table back gives)."""
    if pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return pa.string()
    if (
        pa.types.is_large_binary(type_)
        or pa.types.is_binary_view(type_)
        or pa.types.is_fixed_size_binary(type_)
    ):
        return pa.binary()
    if pa.types.is_dictionary(type_):
        return _normalise(type_.value_type)
    if pa.types.is_timestamp(type_):
        return pa.timestamp("us", tz="UTC" if type_.tz is not None else None)
    if (
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
        or pa.types.is_list_view(type_)
        or pa.types.is_large_list_view(type_)
    ):
        return pa.list_(pa.field("element", _normalise(type_.value_type), True))
    if pa.types.is_struct(type_):
        return pa.struct([pa.field(f.name, _normalise(f.type), True) for f in type_.fields])
    if pa.types.is_map(type_):
        return pa.map_(_normalise(type_.key_type), _normalise(type_.item_type))
    return type_


def _check_storable(schema: pa.Schema, ref: TableRef) -> None:
    for f in schema:
        try:
            Field.from_arrow(pa.field(f.name, _normalise(f.type), True))
        except Exception as exc:  # delta-rs raises a bare Exception for an unmappable type
            raise SinkSchemaError(
                f"{ref}: column {f.name!r} has type {f.type}, which Delta cannot store",
                table=ref.qualified,
                column=f.name,
                incoming=str(f.type),
            ) from exc


def _arrow_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def _consolidated_schema(batch: pa.Table) -> pa.Schema:
    fields = [
        pa.field(c, _normalise(batch.schema.field(c).type), True) for c in data_columns(batch)
    ]
    return pa.schema([*fields, *CONSOLIDATED_ENGINE_FIELDS])


def _append_schema(batch: pa.Table) -> pa.Schema:
    fields = [
        pa.field(c, _normalise(batch.schema.field(c).type), True) for c in data_columns(batch)
    ]
    return pa.schema([*fields, *APPEND_ENGINE_FIELDS])


def widens(stored: pa.DataType, incoming: pa.DataType) -> bool:
    """Whether every value of `stored` is exactly representable in `incoming` (PostgreSQL's
    widening ALTERs: smaller → larger integers, float4 → float8, integers → float8 or a numeric
    wide enough, a numeric with more integer digits and scale, integers/numerics → text)."""
    int_digits = {8: 3, 16: 5, 32: 10, 64: 19}
    if pa.types.is_signed_integer(stored):
        if pa.types.is_signed_integer(incoming):
            return incoming.bit_width >= stored.bit_width
        if pa.types.is_float64(incoming):
            return stored.bit_width <= 32
        if pa.types.is_decimal(incoming):
            return incoming.precision - incoming.scale >= int_digits[stored.bit_width]
        return pa.types.is_string(incoming)
    if pa.types.is_float32(stored):
        return pa.types.is_float64(incoming)
    if pa.types.is_decimal(stored):
        if pa.types.is_decimal(incoming):
            return (incoming.scale >= stored.scale
                    and incoming.precision - incoming.scale >= stored.precision - stored.scale)
        return pa.types.is_string(incoming)
    return False


def _with_missing_as_null(batch: pa.Table, target: pa.Schema) -> pa.Table:
    for f in target:
        if not is_engine_column(f.name) and f.name not in batch.column_names:
            batch = batch.append_column(f, pa.nulls(batch.num_rows, f.type))
    return batch


def _conform(batch: pa.Table, target: pa.Schema, ref: TableRef) -> pa.Table:
    """Cast the batch's data columns to the stored types; a real type change is an error."""
    for name in data_columns(batch):
        index = target.get_field_index(name)
        if index < 0:
            continue
        stored = target.field(index).type
        incoming = batch.schema.field(name).type
        if incoming == stored:
            continue
        if _normalise(incoming) != _normalise(stored):
            raise SinkSchemaError(
                f"{ref}: column {name!r} is stored as {stored} but the source now sends "
                f"{incoming}, which is not a widening; the table must be re-snapshotted",
                table=ref.qualified,
                column=name,
                stored=str(stored),
                incoming=str(incoming),
            )
        position = batch.schema.get_field_index(name)
        batch = batch.set_column(position, name, batch.column(name).cast(stored))
    return batch


def _consolidated_rows(upserts: pa.Table) -> pa.Table:
    """Upsert rows as consolidated-table rows (data columns + engine columns, not deleted)."""
    n = upserts.num_rows
    columns = {c: upserts.column(c) for c in data_columns(upserts)}
    columns[LSN] = upserts.column(LSN)
    columns[COMMITTED_AT] = upserts.column(COMMITTED_AT)
    columns[DELETED] = pa.nulls(n, pa.bool_()).fill_null(False)
    columns[DELETED_AT] = pa.nulls(n, TIMESTAMP_UTC)
    return pa.table(columns)


def _to_target(rows: pa.Table, target: pa.Schema) -> pa.Table:
    """Rows laid out exactly as the table: its column order, nulls for columns rows lack."""
    n = rows.num_rows
    columns = []
    for f in target:
        if f.name in rows.column_names:
            col = rows.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(columns, schema=target)


def _literal(value: object) -> str | None:
    """A SQL literal for a key bound, None when the type is not handled."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return quote_text(value)
    if isinstance(value, date) and type(value) is date:
        return f"DATE '{value.isoformat()}'"
    return None


@dataclass(frozen=True, slots=True)
class _Truncate:
    """The last TRUNCATE of a batch: its commit's end LSN and time."""

    lsn: int
    committed_at_us: int

    def predicate(self, prefix: str) -> str:
        """Rows the TRUNCATE removes: older than it (a replay never touches later rows)."""
        return f"{prefix}{LSN} < {self.lsn} AND NOT {prefix}{DELETED}"

    def updates(self) -> dict[str, str]:
        stamp = (f"arrow_cast(to_timestamp_micros({self.committed_at_us}), "
                 "'Timestamp(Microsecond, Some(\"UTC\"))')")
        return {DELETED: "true", DELETED_AT: stamp, LSN: str(self.lsn), COMMITTED_AT: stamp}


def _after_last_truncate(batch: pa.Table) -> tuple[pa.Table, _Truncate | None]:
    """The rows after the batch's last 'T' row, and that TRUNCATE; rows before it are gone
    from the table anyway (it removes everything the table held at that point)."""
    is_t = pc.fill_null(pc.equal(batch.column(OP), "T"), False)
    if batch.num_rows == 0 or not pc.any(is_t).as_py():
        return batch, None
    last = int(pc.max(pc.indices_nonzero(is_t)).as_py())
    at = batch.column(COMMITTED_AT)[last].cast(pa.int64()).as_py()
    lsn = batch.column(LSN)[last].as_py()
    return batch.slice(last + 1), _Truncate(lsn=lsn, committed_at_us=at)


# Words of a failure of the destination itself (storage, network, a concurrent commit), not of
# one table's data: such a failure is retried by the source, never stops a table.
_DESTINATION_FAILURE = re.compile(
    r"object.?store|i/?o error|\bio\b|no space|disk|quota|permission|denied|read-only|"
    r"readonly|connect|timed? ?out|timeout|network|dns|http|s3|gcs|azure|throttl|slow ?down|"
    r"too many|broken pipe|reset by peer|not found|no such file|version \d+ already exists|"
    r"conflict|concurrent|transaction",
    re.IGNORECASE)


def _first_line(exc: BaseException, options: Mapping[str, str] | None) -> str:
    """The first line of a destination's message, credentials scrubbed, at most 300 chars."""
    lines = str(exc).strip().splitlines()
    return scrub(lines[0][:300], option_secrets(options)) if lines else ""


def _table_specific(exc: BaseException) -> bool:
    """Does a Delta failure look like the table's own (its data or statement refused)?"""
    if isinstance(exc, (OSError, CommitFailedError)):
        return False
    return not _DESTINATION_FAILURE.search(str(exc))


def _merge_predicate(source: pa.Table, keys: list[str], *, prune: bool = True) -> str:
    """Key equality (null-safe only for key columns holding nulls), plus, for one integer,
    string or date key, the source's key range so delta-rs skips target files early."""
    s, t = _SOURCE_ALIAS, _TARGET_ALIAS
    terms: list[str] = []
    for k in keys:
        q = quote_ident(k)
        if source.column(k).null_count:
            # parenthesised: DataFusion's parser reads `a IS NOT DISTINCT FROM b AND c IS NOT
            # DISTINCT FROM d` as `a IS NOT DISTINCT FROM (b AND c) ...`, a planning error that
            # failed every MERGE of a row with two null key columns
            terms.append(f"({t}.{q} IS NOT DISTINCT FROM {s}.{q})")
        else:
            terms.append(f"{t}.{q} = {s}.{q}")
    if prune and len(keys) == 1 and source.num_rows:
        k = keys[0]
        type_ = source.schema.field(k).type
        orderable = (
            pa.types.is_integer(type_)
            or pa.types.is_string(type_)
            or pa.types.is_large_string(type_)
            or pa.types.is_date32(type_)
        )
        if orderable and not source.column(k).null_count:
            bounds = pc.min_max(source.column(k))
            low, high = _literal(bounds["min"].as_py()), _literal(bounds["max"].as_py())
            if low is not None and high is not None:
                q = quote_ident(k)
                terms.append(f"{t}.{q} >= {low} AND {t}.{q} <= {high}")
    return " AND ".join(terms)


def _value_assignments(source: pa.Table, data: list[str], keys: list[str]) -> dict[str, str]:
    """Every non-key data column from the source row, except the columns that row lists in
    `_cdc_unchanged` (per-row CASE, only for columns some row lists): those keep the target's."""
    s, t = _SOURCE_ALIAS, _TARGET_ALIAS
    maybe_unchanged: set[str] = set()
    if UNCHANGED in source.column_names:
        flat = pc.list_flatten(source.column(UNCHANGED))
        maybe_unchanged = {str(v) for v in pc.unique(flat).to_pylist() if v is not None}
    updates: dict[str, str] = {}
    key_set = set(keys)
    for c in data:
        if c in key_set:
            continue
        q = quote_ident(c)
        if c in maybe_unchanged:
            updates[q] = (
                f"CASE WHEN array_contains({s}.{UNCHANGED}, {quote_text(c)}) "
                f"THEN {t}.{q} ELSE {s}.{q} END"
            )
        else:
            updates[q] = f"{s}.{q}"
    return updates


def _insert_assignments(data: list[str]) -> dict[str, str]:
    s = _SOURCE_ALIAS
    values = {quote_ident(c): f"{s}.{quote_ident(c)}" for c in data}
    values[LSN] = f"{s}.{LSN}"
    values[COMMITTED_AT] = f"{s}.{COMMITTED_AT}"
    values[DELETED] = "false"
    values[DELETED_AT] = "NULL"
    return values


__all__ = [
    "APPEND_ENGINE_FIELDS",
    "CONSOLIDATED_ENGINE_FIELDS",
    "DeltaMaintenance",
    "DeltaSink",
    "TableSpec",
    "quote_ident",
    "quote_text",
]


def _scan_keys(dataset: pads.Dataset, target: pa.Schema, wanted: pa.Table, keys: list[str],
               columns: list[str]) -> pa.Table:
    """The live rows of `dataset` whose key columns take the values of `wanted` (a superset for
    a composite key), with the key filter pushed down to the scan.

    Files written by delta-rs' MERGE may store strings as `string_view`; pyarrow 26 has no
    kernel comparing a `string` literal with `string_view` statistics, nor an `isin` across the
    two, so when the plain filter fails the key columns are cast inside the filter expression
    (rows are still filtered while scanning; only statistics pruning is lost).
    """
    live = ~pads.field(DELETED)
    for cast in (False, True):
        condition = live
        for k in keys:
            typ = target.field(k).type
            field = pads.field(k).cast(typ) if cast else pads.field(k)
            condition = condition & field.isin(wanted.column(k).combine_chunks().cast(typ))
        try:
            return dataset.to_table(columns=columns, filter=condition)
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError):
            if cast:
                raise
    raise AssertionError("unreachable")

"""Change batches into Delta: progress (`applied_version`, `resume_version`), `write`,
`write_append` (the change log) and `write_consolidated` (merge, with TRUNCATE and delete
handling), each in ONE Delta commit carrying the txn action (see the package docstring).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from deltalake import CommitProperties, DeltaTable

from cdcengine import failpoints
from cdcengine.config import TableMode
from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef
from cdcengine.sink.base import (
    AddedColumns,
    BatchTable,
    CommitResult,
    SinkWriteError,
    SpilledTable,
    TableKind,
    TableSpec,
    WriteResult,
    kinds_for,
)
from cdcengine.sink.columns import (
    COMMITTED_AT,
    DELETED,
    DELETED_AT,
    HAS_VALUES,
    LSN,
    OP,
    SEQ,
)
from cdcengine.sink.delta.lookup import keys_absent
from cdcengine.sink.delta.schema import (
    _append_schema,
    _arrow_schema,
    _check_batch,
    _conform,
    _consolidated_rows,
    _consolidated_schema,
    _to_target,
    _with_missing_as_null,
)
from cdcengine.sink.delta.spool import WRITER_PROPERTIES, _materialised, _write_delta
from cdcengine.sink.delta.sql import (
    _SOURCE_ALIAS,
    _TARGET_ALIAS,
    _insert_assignments,
    _merge_predicate,
    _Truncate,
    _value_assignments,
)
from cdcengine.sink.delta.streamed import StreamedWrites, append_streamable
from cdcengine.sink.delta.tables import _ms
from cdcengine.sink.fold import (
    append_rows,
    data_columns,
    fill_before,
    fold_for_merge,
    has_key_change_with_unchanged,
    newest_commit_us,
    rows_after,
    transaction_commits,
    unresolved_rows,
)

log = structlog.get_logger("cdcengine.sink")



@dataclass(frozen=True, slots=True)
class _Applied:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unresolved_unchanged: int = 0


class ChangeWrites(StreamedWrites):
    """Progress and change batches (see the module docstring)."""

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
        self, ref: TableRef, batch: BatchTable, *, spec: TableSpec, version: int,
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

        A `SpilledTable` is written piece by piece where `streamed` can (bulk inserts, and
        change-log rows that need no other row); otherwise it is materialised first, once for
        every kind, and `spill_materialised` says why.
        """
        kinds = kinds_for(spec.mode)
        if isinstance(batch, SpilledTable):
            return self._write_spilled(ref, batch, spec=spec, version=version, added=added)
        consolidated = batch
        if added is not None and added.values and TableKind.CONSOLIDATED in kinds:
            consolidated = self._backfill_added(ref, batch, added)
        commits: list[CommitResult] = []
        for j, kind in enumerate(kinds):
            applied = self._applied_before(ref, kind, j)
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
                        fill_from_consolidated=TableKind.CONSOLIDATED in kinds, _fresh=True)
                else:
                    commit = self.write_consolidated(ref, rows, key=spec.key, version=version,
                                                     hard_deletes=spec.hard_deletes, _fresh=True)
            except SinkWriteError as exc:
                exc.kind = exc.kind or kind
                raise
            commits.append(replace(commit, rows_in=rows.num_rows, bytes_in=rows.nbytes,
                                   newest_commit_us=newest_commit_us(rows),
                                   transactions=transaction_commits(rows)))
        durable = min((c.version for c in commits), default=version)
        return WriteResult(table=ref, version=max(version, durable), commits=tuple(commits))

    def _applied_before(self, ref: TableRef, kind: TableKind, j: int) -> int | None:
        """The applied version of the `j`-th table kind a batch is written to (a fresh read of
        its log); between two kinds a test may "crash" (`between_kinds`)."""
        if j:
            failpoints.hit("between_kinds")
        path = self.path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path)
            return None if dt is None else self._txn_version(dt, ref, kind)

    def _write_spilled(self, ref: TableRef, spilled: SpilledTable, *, spec: TableSpec,
                       version: int, added: AddedColumns | None) -> WriteResult:
        """`write` of a spilled batch: each kind streamed when it can be (see `streamed`);
        the first kind that cannot materialises the batch, and the rest goes the usual way."""
        kinds = kinds_for(spec.mode)
        if added is not None and added.values and TableKind.CONSOLIDATED in kinds:
            return self.write(ref, self._materialise(ref, spilled, "added_column_default"),
                              spec=spec, version=version, added=added)
        commits: list[CommitResult] = []
        for j, kind in enumerate(kinds):
            applied = self._applied_before(ref, kind, j)
            if applied is not None and (version <= applied or spilled.max_lsn is None
                                        or spilled.max_lsn <= applied):
                commits.append(self._skipped(ref, kind, applied, 0, version))
                continue
            reason: str | None = None
            if applied is not None and spilled.min_lsn is not None \
                    and spilled.min_lsn <= applied:
                reason = "replay_straddles_applied"
            try:
                commit: CommitResult | str
                if reason is not None:
                    commit = reason
                elif kind is TableKind.APPEND:
                    reason = append_streamable(spilled)
                    commit = reason or self._append_spilled(ref, spilled, version=version,
                                                            key=spec.key)
                else:
                    commit = self._consolidated_spilled(ref, spilled, version=version,
                                                        key=spec.key)
            except SinkWriteError as exc:
                exc.kind = exc.kind or kind
                raise
            if isinstance(commit, str):  # materialised: this kind and the rest as usual
                rest = replace(spec, mode=_mode_of(kinds[j:]))
                table = self._materialise(ref, spilled, commit, kind=kind)
                done = self.write(ref, table, spec=rest, version=version, added=added)
                commits += done.commits
                break
            self._log_commit(commit)
            commits.append(replace(commit, bytes_in=spilled.nbytes,
                                   newest_commit_us=spilled.newest_commit_us,
                                   transactions=spilled.transactions))
        durable = min((c.version for c in commits), default=version)
        return WriteResult(table=ref, version=max(version, durable), commits=tuple(commits))

    def _materialise(self, ref: TableRef, spilled: SpilledTable, reason: str, *,
                     kind: TableKind | None = None) -> pa.Table:
        """The spilled batch in memory, said in the log: this write is NOT bounded by
        `max_batch_mb` (README, memory)."""
        log.warning("spill_materialised", table=ref.qualified,
                    kind=None if kind is None else str(kind), reason=reason,
                    rows=spilled.num_rows, bytes=spilled.nbytes)
        return spilled.to_table()

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
        _fresh: bool = False,
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
            # `_fresh`: `write` read this log a moment ago on this thread; reading it again is
            # one more listing (a request on an object store) per table kind and batch
            dt = self._cached(path, refresh=not _fresh)
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
            dt, added = self._table_for(dt, path, ref, kind, folded,
                                        _consolidated_schema(folded), keys)
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
        _fresh: bool = False,
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
            # `_fresh`: `write` read this log a moment ago on this thread; reading it again is
            # one more listing (a request on an object store) per table kind and batch
            dt = self._cached(path, refresh=not _fresh)
            applied = None if dt is None else self._txn_version(dt, ref, kind)
            if applied is not None and version <= applied:
                return self._skipped(ref, kind, applied, batch.num_rows, version)
            prior = (
                self._last_known(ref, batch, list(key), applied)
                if fill_from_consolidated and key
                else None
            )
            rows = append_rows(batch, key, prior=prior)
            dt, added = self._table_for(dt, path, ref, kind, rows, _append_schema(rows), key)
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
        # without deletes (an insert-only transaction) the upserts are the source itself: a
        # filter would copy every column of it
        upserts = source.filter(pc.invert(is_delete)) if pc.any(is_delete).as_py() else source
        if truncate is not None and source.num_rows == 0:
            return self._truncate_only(dt, truncate, target, props, hard_deletes=hard_deletes)
        if created or (truncate is None and (source.num_rows == 0
                                             or keys_absent(dt, source, keys))):
            # A table this call created is empty, or holds none of the keys (a bulk insert of
            # new ids, per the file statistics): every non-delete row is an insert, and a
            # delete matches nothing. An append, not a MERGE: delta-rs's join held ~380 MB
            # more for 1M rows of the bench table (issue 16), and is slower.
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
            writer_properties=WRITER_PROPERTIES,
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


def _mode_of(kinds: Sequence[TableKind]) -> TableMode:
    """The table mode that writes exactly `kinds` (a suffix of `kinds_for(mode)`)."""
    if len(kinds) == 2:
        return TableMode.BOTH
    return TableMode.APPEND if kinds[0] is TableKind.APPEND else TableMode.CONSOLIDATED


def _assert_unique(folded: pa.Table, keys: list[str], ref: TableRef) -> None:
    """One source row per key, or delta-rs would insert duplicates; a violation is a bug."""
    if folded.num_rows <= 1:
        return
    distinct = folded.select(keys).group_by(keys, use_threads=False).aggregate([]).num_rows
    if distinct != folded.num_rows:
        raise AssertionError(f"{ref}: folded batch has {folded.num_rows} rows for {distinct} keys")


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

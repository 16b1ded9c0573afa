"""What a write looks up in the stored tables: the last known values of keys a batch cannot
resolve on its own (`_last_known`, table mode `both`) and the unchanged-TOAST rows whose key the
consolidated table does not hold (`_count_unresolved`). Reads only the candidate keys.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import structlog
from deltalake import DeltaTable

from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef
from cdcengine.sink.base import TableKind
from cdcengine.sink.columns import DELETED, LSN, UNCHANGED
from cdcengine.sink.delta.schema import _arrow_schema
from cdcengine.sink.delta.tables import DeltaTables
from cdcengine.sink.fold import append_lookup_keys, data_columns

log = structlog.get_logger("cdcengine.sink")


class StoredLookups(DeltaTables):
    """Reads of the stored tables a write needs (see the module docstring)."""

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


def keys_absent(dt: DeltaTable, source: pa.Table, keys: list[str]) -> bool:
    """Whether no row of `dt` can hold a key of `source`, from the log's file statistics alone
    (no data read): one integer key column without nulls in `source`, and every file's
    [min, max] of it (the key is a statistics column) disjoint from the source's range. A
    file without statistics, or any other key, answers False (the caller merges)."""
    if len(keys) != 1 or source.num_rows == 0:
        return False
    key = keys[0]
    column = source.column(key)
    if not pa.types.is_integer(column.type) or column.null_count:
        return False
    bounds = pc.min_max(column)
    return range_absent(dt, key, bounds["min"].as_py(), bounds["max"].as_py())


def range_absent(dt: DeltaTable, key: str, low: int, high: int) -> bool:
    """Whether no row of `dt` can hold a value of the integer column `key` in [low, high], from
    the file statistics alone (`keys_absent` for a batch whose range is already known, such as
    a spilled one)."""
    stats = pa.table(dt.get_add_actions(flatten=True))
    if stats.num_rows == 0:
        return True
    lows, highs = f"min.{key}", f"max.{key}"
    if lows not in stats.column_names or highs not in stats.column_names:
        return False
    rows = pc.fill_null(stats.column("num_records"), 1)
    stats = stats.filter(pc.greater(rows, 0))  # an empty file holds no key
    if stats.num_rows == 0:
        return True
    if stats.column(lows).null_count or stats.column(highs).null_count:
        return False
    overlap = pc.and_(pc.less_equal(stats.column(lows), high),
                      pc.greater_equal(stats.column(highs), low))
    return not pc.any(overlap).as_py()


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

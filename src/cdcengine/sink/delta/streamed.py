"""A spilled change batch (`SpilledTable`) written piece by piece, still in ONE Delta commit.

What is streamed (bounded memory: a piece of `PIECE_ROWS` rows at a time, plus what delta-rs
holds for one row group per file it writes):
- the change log (`write_append`) when no row needs another row of the batch: no D row (its
  values come from an earlier change of its key) and no unchanged-TOAST column to fill;
- the consolidated table when the batch inserts new keys only: every row an I without an
  unchanged-TOAST column, one integer key, no key twice (checked over the spill, see
  `key_check`) and no stored file's key range meeting the batch's (the table cannot hold any
  of them, so the MERGE is an append; see `_merge_or_append`).

Anything else (updates, deletes, duplicate keys, keys the table may hold, a replay straddling
the applied version, an added column's default) is materialised by the caller and written as
before; `spill_materialised` is logged with the reason.

Each piece is shaped for the target on this thread (Python), written to a second spill file,
and that file's C++ reader is what deltalake pulls: never a Python-backed reader (see
`spool`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable

from cdcengine.names import TableRef
from cdcengine.sink.base import CommitResult, SpilledTable, TableKind
from cdcengine.sink.columns import COMMITTED_AT, LSN, OP, SEQ
from cdcengine.sink.delta.lookup import StoredLookups, range_absent
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
from cdcengine.sink.delta.spool import _Mapped, _write_delta
from cdcengine.sink.delta.tables import _ms
from cdcengine.sink.fold import append_rows, fold_for_merge
from cdcengine.sink.spilled import SpillWriter

DUCKDB_MEMORY = "256MB"
"""DuckDB's memory limit for the duplicate-key check of an unsorted spilled batch (past it,
its hash aggregate spills to disk)."""


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """One integer key over a spilled batch: its range, nulls, and whether no value repeats."""

    unique: bool
    low: int | None
    high: int | None
    nulls: int


def key_check(spilled: SpilledTable, key: str, *, temp_dir: str | None = None) -> KeyCheck:
    """Range, nulls and uniqueness of `key` over the spill, in bounded memory.

    One streaming pass gets the range and whether the key strictly increases (a bulk insert
    of serial or identity ids does): then it is unique, at O(1) memory. Otherwise DuckDB
    counts distinct keys over a second pass with its memory limit (`DUCKDB_MEMORY`; its
    aggregate spills to disk past it): exact, bounded, slower. A sorted check alone would
    have to materialise or sort externally; a Python set would grow with the batch. The
    batcher gathers the first pass's figures while it writes the spill (`SpilledTable.key`):
    then there is no pass here at all unless the keys do not ascend."""
    stats = spilled.key
    if stats is not None and stats.column == key:
        if stats.nulls or stats.ascending:
            return KeyCheck(unique=not stats.nulls, low=stats.low, high=stats.high,
                            nulls=stats.nulls)
        return _distinct(spilled, key, stats.low, stats.high, temp_dir)
    low: int | None = None
    high: int | None = None
    nulls = 0
    increasing = True
    last: int | None = None
    with spilled.reader() as reader:
        for piece in reader:
            column = piece.column(key)
            nulls += column.null_count
            if len(column) == 0 or column.null_count == len(column):
                continue
            bounds = pc.min_max(column)
            lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
            if increasing and not column.null_count:
                first = column[0].as_py()
                rises = pc.all(pc.greater(column.slice(1), column.slice(0, len(column) - 1)))
                if (last is not None and first <= last) or rises.as_py() is False:
                    increasing = False
                last = column[len(column) - 1].as_py()
    if nulls or increasing:
        return KeyCheck(unique=not nulls, low=low, high=high, nulls=nulls)
    return _distinct(spilled, key, low, high, temp_dir)


def _distinct(spilled: SpilledTable, key: str, low: int | None, high: int | None,
              temp_dir: str | None) -> KeyCheck:
    """Whether no value of `key` repeats, counted by DuckDB in bounded memory (see
    `key_check`)."""
    import duckdb  # only here: loading it costs every process ~0.2 s and memory at start

    config: dict[str, str | int | bool | float] = {"memory_limit": DUCKDB_MEMORY, "threads": 1}
    if temp_dir is not None:
        config["temp_directory"] = temp_dir
    quoted = '"' + key.replace('"', '""') + '"'
    with duckdb.connect(config=config) as con, spilled.reader() as reader:
        con.register("spill", reader)
        # the key is a column name, quoted as an identifier; no value is interpolated
        query = f"SELECT count(*) - count(DISTINCT {quoted}) FROM spill"  # noqa: S608
        found = con.execute(query).fetchone()
    return KeyCheck(unique=found is not None and found[0] == 0, low=low, high=high, nulls=0)


def append_streamable(spilled: SpilledTable) -> str | None:
    """None when the change log can take the spill piece by piece, else why not."""
    if spilled.ops.get("D"):
        return "deletes_need_earlier_rows"
    if spilled.unchanged_rows:
        return "unchanged_toast_to_fill"
    return None


class StreamedWrites(StoredLookups):
    """`write_append` / `write_consolidated` of a `SpilledTable` (see the module docstring)."""

    def _append_spilled(self, ref: TableRef, spilled: SpilledTable, *, version: int,
                        key: Sequence[str]) -> CommitResult:
        """The change log's commit of a spilled batch that `append_streamable` accepted."""
        kind = TableKind.APPEND
        started = time.perf_counter()
        require = (OP, LSN, SEQ, COMMITTED_AT)
        _check_version(spilled, version)
        path = self._writable_path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path, refresh=False)
            shape = append_rows(_check_batch(spilled.schema.empty_table(), version,
                                             require=require), key)
            dt, added = self._table_for(dt, path, ref, kind, shape, _append_schema(shape), key)
            target = _arrow_schema(dt)

            def shaped(piece: pa.Table) -> pa.Table:
                rows = append_rows(_check_batch(piece, version, require=require), key)
                return _to_target(_conform(rows, target, ref), target)

            return self._commit_pieces(dt, ref, kind, version, spilled, shaped, added, started)

    def _consolidated_spilled(self, ref: TableRef, spilled: SpilledTable, *, version: int,
                              key: Sequence[str]) -> CommitResult | str:
        """The consolidated table's commit of a spilled batch of new keys only, appended piece
        by piece; or, when the batch is not that, the reason (the caller materialises it)."""
        kind = TableKind.CONSOLIDATED
        started = time.perf_counter()
        if not spilled.only("I") or spilled.unchanged_rows:
            return "not_insert_only"
        if len(key) != 1 or not pa.types.is_integer(spilled.schema.field(key[0]).type):
            return "key_not_one_integer"
        _check_version(spilled, version)
        keys = list(key)
        path = self._writable_path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path, refresh=False)
            found = key_check(spilled, keys[0], temp_dir=self.spill_dir)
            if not found.unique or found.low is None or found.high is None:
                return "keys_not_unique"
            if dt is not None and not range_absent(dt, keys[0], found.low, found.high):
                return "keys_may_be_stored"
            require = (OP, LSN, COMMITTED_AT)
            shape = fold_for_merge(_check_batch(spilled.schema.empty_table(), version,
                                                require=require), keys)
            dt, added = self._table_for(dt, path, ref, kind, shape, _consolidated_schema(shape),
                                        keys)
            target = _arrow_schema(dt)

            def shaped(piece: pa.Table) -> pa.Table:
                # unique keys, inserts only: folding a piece is folding the batch, piece-wise
                folded = fold_for_merge(_check_batch(piece, version, require=require), keys)
                source = _with_missing_as_null(_conform(folded, target, ref), target)
                return _to_target(_consolidated_rows(source), target)

            return self._commit_pieces(dt, ref, kind, version, spilled, shaped, added, started)

    def _commit_pieces(self, dt: DeltaTable, ref: TableRef, kind: TableKind, version: int,
                       spilled: SpilledTable, shaped: Callable[[pa.Table], pa.Table],
                       added: tuple[str, ...], started: float) -> CommitResult:
        """Write `spilled` piece by piece, each `shaped` for the table, in one commit carrying
        `version`; what was committed."""
        written = self._write_pieces(dt, spilled, shaped,
                                     self._commit_properties(ref, kind, version))
        self._after_commit(ref, kind, version)
        return CommitResult(table=ref, kind=kind, version=version, skipped=False,
                            delta_version=dt.version(), rows_in=spilled.num_rows,
                            rows_written=written, inserted=written, columns_added=added,
                            duration_ms=_ms(started))

    def _write_pieces(self, dt: DeltaTable, spilled: SpilledTable,
                      shaped: Callable[[pa.Table], pa.Table], props: CommitProperties) -> int:
        """Every piece of `spilled` through `shaped` into a second spill file, then that file
        appended by deltalake in ONE commit carrying `props`; returns the rows written."""
        out: SpillWriter | None = None
        try:
            with spilled.reader() as reader:
                for piece in reader:
                    rows = shaped(pa.Table.from_batches([piece]))
                    if out is None:
                        out = SpillWriter(rows.schema, self.spill_dir)
                    elif rows.schema != out.schema:
                        rows = rows.cast(out.schema)
                    out.write(rows)
            if out is None:
                out = SpillWriter(shaped(spilled.schema.empty_table()).schema, self.spill_dir)
            result = out.finish()
        except BaseException:
            if out is not None:
                out.abort()
            raise
        try:
            _write_delta(dt, _Mapped(result.reader()), mode="append",
                         target_file_size=self.target_file_size, commit_properties=props)
            return result.num_rows
        finally:
            result.close()


def _check_version(spilled: SpilledTable, version: int) -> None:
    if spilled.max_lsn is not None and spilled.max_lsn > version:
        raise ValueError(f"batch holds {LSN} {spilled.max_lsn} above its version {version}")

"""A change batch's table kept on local disk instead of in memory (`SpilledTable`), and the files
and writers behind it.

Why: one source transaction must be ONE Delta commit, whatever its size, so a transaction
larger than the memory budget cannot be cut into several batches. Its rows go to an Arrow IPC
stream file and are read back batch by batch through a C++ reader (`SpilledTable.reader()`):
deltalake pulls that reader without Python (no GIL; see `sink.delta.spool` on why a
Python-backed reader deadlocks delta-rs), and only the record batches in flight are in memory,
never the whole file (a memory-mapped file's pages count in RSS once touched, and a Delta write
touches them all).

Nothing is left on disk after a crash: a `SpillFile` is unlinked as soon as it is created and
reached through its open descriptor (`/proc/self/fd/N`), so its blocks go back to the file
system when the descriptor is closed: by `close()`, when the object is collected, or when the
process dies.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine.sink.columns import COMMITTED_AT, LSN, OP, UNCHANGED

PIECE_ROWS = 64 * 1024
"""Rows per record batch of a spilled table: what a reader holds per pull (a few MB of a
typical table), and the row-group size the Delta writer uses anyway."""

_PROC_FD = Path("/proc/self/fd")


class SpillFile:
    """An anonymous temporary file in `directory` (the system temp dir by default): unlinked at
    creation where the platform lets it be reopened by descriptor (Linux), else removed on
    `close()`. `path` opens it (again) for writing or reading."""

    def __init__(self, directory: str | Path | None = None) -> None:
        fd, name = tempfile.mkstemp(prefix="cdcengine-spill-", suffix=".arrows", dir=directory)
        self.fd = fd
        if _PROC_FD.is_dir():
            os.unlink(name)  # unlink-on-open: a crash leaves nothing behind
            self.path = str(_PROC_FD / str(fd))
            self._finalizer = weakref.finalize(self, os.close, fd)
        else:
            self.path = name
            self._finalizer = weakref.finalize(self, _close_and_remove, fd, name)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Release the file (its disk space). Safe twice."""
        self._finalizer()


def _close_and_remove(fd: int, name: str) -> None:
    os.close(fd)
    with suppress(FileNotFoundError):
        os.unlink(name)


@dataclass(frozen=True, slots=True)
class KeyStats:
    """One integer key column over a spilled table, gathered while it was written: its range,
    its nulls, and whether it strictly ascends in row order (then no value repeats: a bulk
    insert of serial or identity ids, checked unique without another pass)."""

    column: str
    low: int | None
    high: int | None
    nulls: int
    ascending: bool


@dataclass(frozen=True, kw_only=True)
class SpilledTable:
    """A change batch's rows of one table in a spill file: what `ChangeBatch.tables` holds
    instead of a `pa.Table` when a transaction outgrew the memory budget (`max_batch_mb`).

    Same columns and row order as the in-memory table would have. The summary fields are
    computed while the file was written, so a consumer can decide how to write it without
    reading it: `ops` rows per `_cdc_op`, `unchanged_rows` rows listing an unchanged-TOAST
    column, the `_cdc_lsn` range, the newest commit time (µs) and each source transaction's
    (end LSN, commit µs), and `key` the `KeyStats` of a single integer key column when the
    writer was told the key. `reader()` streams the rows in pieces of at most `PIECE_ROWS`;
    `to_table()` materialises them (the whole batch in memory). The owner (the pipeline's
    writer) calls `close()` once the batch is durable or dropped."""

    schema: pa.Schema
    num_rows: int
    nbytes: int
    file: SpillFile = field(repr=False, compare=False)
    min_lsn: int | None = None
    max_lsn: int | None = None
    newest_commit_us: int | None = None
    transactions: tuple[tuple[int, int], ...] = ()
    ops: Mapping[str, int] = field(default_factory=dict)
    unchanged_rows: int = 0
    key: KeyStats | None = None

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def reader(self) -> pa.RecordBatchReader:
        """A fresh C++ reader over the file, one piece at a time (no mapping, no GIL needed
        to pull it)."""
        return pa.ipc.open_stream(pa.OSFile(self.file.path))

    def to_table(self) -> pa.Table:
        with self.reader() as reader:
            return reader.read_all()

    def only(self, *ops: str) -> bool:
        """Whether every row's `_cdc_op` is one of `ops`."""
        return all(op in ops for op, n in self.ops.items() if n)

    def close(self) -> None:
        self.file.close()


class SpillWriter:
    """Writes record batches of one schema to a new `SpillFile` (re-cut into pieces of at most
    `PIECE_ROWS`) and summarises them (unless `summarise` is False: an intermediate file);
    `key`: a key column whose `KeyStats` to gather when it is one integer column. `finish()`
    returns the `SpilledTable`. A writer that is not finished releases its file on `abort()`
    (or when collected)."""

    def __init__(self, schema: pa.Schema, directory: str | Path | None = None, *,
                 summarise: bool = True, key: str | None = None) -> None:
        self.schema, self._summarising = schema, summarise
        integer = key is not None and key in schema.names \
            and pa.types.is_integer(schema.field(key).type)
        self._key = key if integer else None
        self._key_low: int | None = None
        self._key_high: int | None = None
        self._key_last: int | None = None
        self._key_nulls = 0
        self._ascending = True
        self.file = SpillFile(directory)
        self._sink = pa.OSFile(self.file.path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self.rows = self.nbytes = self.unchanged_rows = 0
        self._lsn: tuple[int | None, int | None] = (None, None)
        self._newest: int | None = None
        self._txns: dict[int, int] = {}
        self._ops: dict[str, int] = {}

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        if table.num_rows == 0:
            return
        if self._summarising:
            self._summarise(table)
        if self._key is not None:
            self._key_stats(table[self._key])
        for piece in table.to_batches(max_chunksize=PIECE_ROWS):
            self._writer.write_batch(piece)
            self.nbytes += piece.nbytes
        self.rows += table.num_rows

    def write_all(self, pieces: Iterable[pa.Table | pa.RecordBatch]) -> None:
        for piece in pieces:
            self.write(piece)

    def _summarise(self, table: pa.Table) -> None:
        names = table.column_names
        if LSN in names:
            bounds = pc.min_max(table[LSN])
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            old_low, old_high = self._lsn
            self._lsn = (low if old_low is None or (low is not None and low < old_low)
                         else old_low,
                         high if old_high is None or (high is not None and high > old_high)
                         else old_high)
        if COMMITTED_AT in names and LSN in names:
            stamps = table[COMMITTED_AT].cast(pa.int64())
            top = pc.max(stamps).as_py()
            if top is not None and (self._newest is None or top > self._newest):
                self._newest = top
            pairs = pa.table({"lsn": table[LSN], "at": stamps})
            found = pairs.group_by("lsn").aggregate([("at", "min")])
            for lsn, at in zip(found["lsn"].to_pylist(), found["at_min"].to_pylist(),
                               strict=True):
                self._txns[lsn] = at if lsn not in self._txns else min(at, self._txns[lsn])
        if OP in names:
            counts = pc.value_counts(table[OP])
            for item in counts.to_pylist():
                op = item["values"]
                self._ops[op] = self._ops.get(op, 0) + item["counts"]
        if UNCHANGED in names:
            lengths = pc.fill_null(pc.list_value_length(table[UNCHANGED]), 0)
            self.unchanged_rows += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)

    def _key_stats(self, column: pa.ChunkedArray) -> None:
        self._key_nulls += column.null_count
        if column.null_count == len(column):
            return
        bounds = pc.min_max(column)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        self._key_low = low if self._key_low is None else min(self._key_low, low)
        self._key_high = high if self._key_high is None else max(self._key_high, high)
        if not self._ascending or column.null_count:
            self._ascending = False
            return
        values = column.combine_chunks()
        first = values[0].as_py()
        rises = pc.all(pc.greater(values.slice(1), values.slice(0, len(values) - 1))).as_py()
        if (self._key_last is not None and first <= self._key_last) or rises is False:
            self._ascending = False
        self._key_last = values[len(values) - 1].as_py()

    def _close(self) -> None:
        self._writer.close()
        self._sink.close()

    def finish(self) -> SpilledTable:
        self._close()
        low, high = self._lsn
        return SpilledTable(schema=self.schema, num_rows=self.rows, nbytes=self.nbytes,
                            file=self.file, min_lsn=low, max_lsn=high,
                            newest_commit_us=self._newest,
                            transactions=tuple(sorted(self._txns.items())),
                            ops=dict(self._ops), unchanged_rows=self.unchanged_rows,
                            key=None if self._key is None else KeyStats(
                                column=self._key, low=self._key_low, high=self._key_high,
                                nulls=self._key_nulls, ascending=self._ascending))

    def abort(self) -> None:
        if not self._sink.closed:
            self._close()
        self.file.close()


BatchTable = pa.Table | SpilledTable
"""What `ChangeBatch.tables` holds per table and `Sink.write` takes."""


def min_lsn(table: BatchTable) -> int | None:
    """The smallest `_cdc_lsn` of a batch table (None without rows)."""
    if isinstance(table, SpilledTable):
        return table.min_lsn
    if table.num_rows == 0 or LSN not in table.column_names:
        return None
    found = pc.min(table[LSN]).as_py()
    return None if found is None else int(found)

"""Feeding deltalake: every input a write or merge gets is materialised (`_materialised`,
`_write_delta`); the rows of a large snapshot chunk collect in a `_Spool` first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pyarrow as pa
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake

SPILL_BYTES = 64 * 1024 * 1024
"""Arrow bytes of one snapshot chunk (per Delta table) held in memory before the rest goes to a
local spool file (`write_snapshot_chunk`); a chunk is usually one piece of at most 100k rows."""

ROW_GROUP_ROWS = 64 * 1024
"""Rows per Parquet row group of what the engine writes. delta-rs's default (about 1M rows)
holds a whole row group encoded in memory before it is flushed. Writing 1M rows of the bench
table cost +246 MB of RSS in 0.76 s with it; +121 MB / 0.51 s with 128k-row groups, +97 MB /
0.45 s with 64k, +81 MB with 32k (issue 16). 64k rows of a typical table is still a few MB per
row group: large enough for readers, and the statistics per group prune finer."""
PARQUET_COMPRESSION = ("ZSTD", 1)
"""How the engine's Parquet files are compressed: zstd level 1, without dictionary encoding.
deltalake's writer otherwise writes UNCOMPRESSED pages and tries a dictionary for every column
(falling back per page when it overflows). Measured on 1M rows of the bench table (146 MB of
Arrow, one write, CPU seconds / file size; `benchmarks/parquet_settings_bench.py`, two runs):
dictionary + uncompressed (the old default) 0.32-0.61 s / 116 MB; no dictionary + zstd 1:
0.30-0.37 s / 29 MB; + snappy 0.26-0.29 s / 67 MB; + lz4_raw 0.21-0.30 s / 68 MB;
dictionary + snappy 0.45-0.57 s / 71 MB. The dictionary attempt on
high-cardinality columns (keys, hashes, text) is most of the cost, and zstd compresses the
repeats a dictionary would have caught. Every Delta reader (Spark 3.2+, Databricks — whose new
tables default to zstd —, DuckDB, Polars, Trino, delta-rs) reads zstd."""
TARGET_FILE_BYTES = 32 * 1024 * 1024
"""The size the engine's writes and compaction aim at per data file (delta-rs's default is 100
MB). A consolidated table is copy-on-write: a MERGE rewrites every file holding a changed key
whole, so a file's rows are the unit of a merge's cost. zstd made files ~4× denser than the
uncompressed ones before, so 100 MB files held ~3.5M bench rows and a recent-keys merge into 10M
rows rewrote that many (bench `merge`, 10M vs 1M: 1.26× → 1.68×); 32 MB holds ~1.1M, what a
100 MB file held before. (Databricks picks 32 MB for tables tuned for rewrites, the same trade.)"""
WRITER_PROPERTIES = WriterProperties(
    max_row_group_size=ROW_GROUP_ROWS,
    compression=PARQUET_COMPRESSION[0],
    compression_level=PARQUET_COMPRESSION[1],
    default_column_properties=ColumnProperties(dictionary_enabled=False),
)


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


#: A write of at least this much Arrow data first hands the Arrow pool's freed pages back.
RELEASE_BYTES = 32 * 1024 * 1024


def _write_delta(dt: DeltaTable, data: pa.Table | _Mapped, **options: Any) -> None:
    """`write_deltalake(dt, data, **options)` on materialised data only (see above), in row
    groups of `ROW_GROUP_ROWS` unless `options` say otherwise.

    Before a large write the Arrow memory pool returns what it holds unused (`release_unused`):
    converting and folding a big batch freed about as much as the batch, and neither
    allocator keeps it for delta-rs, whose Parquet encoding allocates outside the pool, so
    without this the process peak is batch + freed pages + encoding (issue 16: a 1M-row
    transaction peaked ~100 MB higher). Once per large write, not at every free: returning
    pages at every free (jemalloc decay 0) cost streaming inserts ~30 % throughput."""
    options.setdefault("writer_properties", WRITER_PROPERTIES)
    if isinstance(data, pa.Table) and data.nbytes >= RELEASE_BYTES:
        pa.default_memory_pool().release_unused()
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

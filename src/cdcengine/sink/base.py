"""The sink seam: where a table's committed source transactions become durable, exactly once.

Who calls it: the pipeline's single writer thread calls `Sink` (the stream), the pipeline's
thread and its backfill thread call `SnapshotSink` (snapshots and resyncs, one table at a time,
each thread with its own sink). The engine never talks to a destination any other way, so a
sink is the only place that knows how progress is stored; for Delta it is the transaction
(`txn`) action committed in the same Delta commit as the data, so data and progress can never
disagree. The pipeline gets its sinks from a `SinkFactory` (`Pipeline(sink_factory=...)`).

The stream's protocol, in the order the pipeline uses it:

1. On start, for every captured table: `applied_version(ref, kind)` per kind the table's mode
   writes (`resume_version(ref, mode)` is their minimum). Source changes whose transaction end
   LSN is at or below it are already durable; None means the table has no progress yet (it
   needs a snapshot). `data_columns` says which columns the stored table has, so the pipeline
   can tell a column added at the source while it was away.
2. For each batch: `write(ref, batch, spec=..., version=V)`. A batch holds whole source
   transactions of ONE table, rows in WAL order, and `V` is the end LSN of the last transaction
   of the pipeline's batch (every row's `_cdc_lsn` <= V). Versions a writer passes for one
   table only grow, except that after a restart the stream replays from the confirmed position
   and batches are cut differently: a replayed batch may hold rows already applied, or straddle
   the applied version. The sink writes, per kind, only the rows above that kind's applied
   version (nothing at all when none is left), so a replay, and a retry of a failed `write`
   with the same batch and version, is always safe: exactly once.
   When `write` returns, every change of the batch is durable in every table the mode writes
   and `WriteResult.version` (>= V) is the position the pipeline may count as durable for this
   table; the slot is confirmed on nothing else. When it raises, each kind's table holds either
   all of its rows of the batch or none of them (one atomic commit per kind, data and progress
   together); nothing is half-applied, and the caller retries or stops the table.
3. Between batches, when the pipeline decides: `maintain(ref, kind)` (compaction, checkpoints,
   vacuum). It never changes the rows a reader sees nor the applied versions.
4. On shutdown: `close()`.

A sink is not thread-safe: one thread owns it. Reading helpers of an implementation may say
otherwise for themselves.

Change batch columns (typed Arrow, SPEC §6): the data columns plus `_cdc_op` ('I', 'U', 'D'; 'R'
snapshot read; 'T' truncate, append tables only), `_cdc_lsn` int64, `_cdc_seq` int64,
`_cdc_committed_at` timestamp[us, UTC] and `_cdc_unchanged` list<string> (see `sink.fold`, which
names them once).

A batch table is a `pa.Table`, or a `SpilledTable` (`sink.spilled`) when the transaction
outgrew the pipeline's memory budget: the same rows in a local Arrow IPC stream file, with a
summary (row counts per op, LSN range, transactions) and a C++ `reader()` that yields pieces of
at most `PIECE_ROWS` rows. A sink may write it piece by piece (still ONE commit per kind) or
materialise it with `to_table()`; it never closes it (the writer does, once the batch is
durable or dropped).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from cdcengine.config import SourceConfig, TableMode
from cdcengine.errors import CDCError, Reason
from cdcengine.names import TableRef

# part of the seam: a batch table may be spilled (re-exported for sinks)
from cdcengine.sink.spilled import BatchTable
from cdcengine.sink.spilled import SpilledTable as SpilledTable


class TableKind(enum.StrEnum):
    """Which Delta table of a source table: the current-state copy or the change log."""

    CONSOLIDATED = "consolidated"
    APPEND = "append"


def kinds_for(mode: TableMode) -> tuple[TableKind, ...]:
    """The Delta tables a table mode writes, in the order `Sink.write` writes them."""
    kinds: list[TableKind] = []
    if mode.writes_append:
        kinds.append(TableKind.APPEND)
    if mode.writes_consolidated:
        kinds.append(TableKind.CONSOLIDATED)
    return tuple(kinds)


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSpec:
    """How one source table is written: its key (replica identity), mode and delete style."""

    key: tuple[str, ...]
    mode: TableMode = TableMode.CONSOLIDATED
    hard_deletes: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AddedColumns:
    """Columns added at the source with a constant default (`ADD COLUMN … DEFAULT <constant>`):
    rows that existed before hold `values[column]` without any WAL saying so (SPEC §6).

    `upto`: the end LSN up to which stored and batch rows predate the change (the first
    transaction with the new shape); None: every row stored so far predates it (the change
    happened while the pipeline was away), i.e. up to the consolidated table's applied version.
    The pipeline resolves the values on its own thread (from the source) and hands them to
    `Sink.write` with the batch; only the consolidated table holds old rows to fill.
    """

    values: Mapping[str, pa.Scalar]
    upto: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitResult:
    """What one write did to one Delta table.

    `version` is that table's applied version after the call: the batch's version when it was
    committed, the applied version when the call was skipped (every row of the batch was at or
    below it; it may be below the batch's version when the table's last change came earlier).
    `delta_version` is the Delta table version that holds the commit (None when skipped).
    Row counts: `rows_in` change rows of the batch above the table's applied version (what the
    call had to write; 0 when skipped), `bytes_in` their Arrow size, `newest_commit_us` their
    newest source commit time (µs since the epoch; None without rows) and `transactions` the
    (end LSN, commit µs) of each source transaction among them; `rows_written` rows in
    the commit's source (after folding, for a consolidated table); `inserted`/`updated`/
    `deleted` target rows as Delta reports them (a soft delete counts as an update).
    `unresolved_unchanged` counts rows that carried an unchanged-TOAST column whose value
    neither the batch nor the target held (written as null, logged). `columns_added` lists
    columns added to the table before this commit.
    """

    table: TableRef
    kind: TableKind
    version: int
    skipped: bool
    delta_version: int | None = None
    rows_in: int = 0
    bytes_in: int = 0
    newest_commit_us: int | None = None
    transactions: tuple[tuple[int, int], ...] = ()
    rows_written: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unresolved_unchanged: int = 0
    columns_added: tuple[str, ...] = ()
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-safe: the table as its qualified name, everything else plain."""
        out = asdict(self)
        out["table"] = self.table.qualified
        out["kind"] = str(self.kind)
        out["columns_added"] = list(self.columns_added)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteResult:
    """The outcome of `Sink.write`: the durable position for the table (>= the batch's version)
    and one `CommitResult` per kind the mode writes, in `kinds_for` order."""

    table: TableRef
    version: int
    commits: tuple[CommitResult, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {
            "table": self.table.qualified,
            "version": self.version,
            "commits": [c.to_dict() for c in self.commits],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class MaintenanceResult:
    """What `maintain` did to one Delta table (all zero/False when there was nothing to do)."""

    table: TableRef
    kind: TableKind
    files_removed: int = 0
    files_added: int = 0
    checkpointed: bool = False
    clustered: bool = False  # compacted by sorting on the key (its files' ranges overlapped)
    vacuumed_files: int = 0
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["table"] = self.table.qualified
        out["kind"] = str(self.kind)
        return out


class SinkSchemaError(CDCError):
    """A batch's columns do not fit the stored table (a changed type, a case clash, a foreign
    table at the path). Not retryable: the table must stop until a resync or a schema migration.

    `table`, `column`, `stored` and `incoming` say what clashed (types as Arrow type strings).
    """

    default_reason = Reason.SCHEMA_INCOMPATIBLE

    def __init__(
        self,
        message: str,
        *,
        table: str = "",
        column: str = "",
        stored: str = "",
        incoming: str = "",
    ) -> None:
        super().__init__(
            message,
            retryable=False,
            fix="Resync the table (a widening migration is not supported yet).",
        )
        self.table = table
        self.column = column
        self.stored = stored
        self.incoming = incoming


class SinkWriteError(CDCError):
    """The destination failed a read or a commit (I/O, object store, a Delta log conflict).

    Retryable: retry the same `write` with the same batch and version; the applied-version check
    makes that safe. The original exception is chained as `__cause__`.

    `table_specific`: the failure looks like this table's own (the engine refused the table's
    data or statement: a planning or execution error, a constraint the rows violate), not the
    destination's (I/O, object store, network, a commit conflict). A table-specific failure
    that persists through a few retries stops that table alone (the writer decides); the
    destination's failures are retried by the source with backoff. `detail` is the first line
    of the destination's message, secrets scrubbed, for the table's stop reason. `kind`: the
    table kind whose commit failed, when known.
    """

    default_reason = Reason.DESTINATION_FAILED

    def __init__(self, message: str | None = None, *, table_specific: bool = False,
                 detail: str = "", kind: TableKind | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.table_specific = table_specific
        self.detail = detail
        self.kind = kind


class Sink(Protocol):
    """The stream's destination: change batches made durable with their progress, exactly once.

    The pipeline's writer thread calls these methods and nothing else of a sink (see the module
    docstring for the order). Every failure is `SinkWriteError` (retryable) or
    `SinkSchemaError` (the table must stop); any other exception is a bug.
    """

    def applied_version(self, ref: TableRef, kind: TableKind) -> int | None:
        """The highest version durable in `ref`'s `kind` table, None when it has none (no table,
        or never loaded). Read from the destination, so it reflects every commit made so far,
        including one whose writer died before it could return."""
        ...

    def resume_version(self, ref: TableRef, mode: TableMode) -> int | None:
        """The version at or below which `ref`'s changes are durable in every table `mode`
        writes: the minimum of `applied_version` over `kinds_for(mode)`; None when any of them
        is None."""
        ...

    def data_columns(self, ref: TableRef, kind: TableKind) -> tuple[str, ...] | None:
        """The data columns `ref`'s `kind` table stores (engine columns left out), None when the
        table does not exist yet. Called by the thread that owns the sink."""
        ...

    def write(
        self, ref: TableRef, batch: BatchTable, *, spec: TableSpec, version: int,
        added: AddedColumns | None = None,
    ) -> WriteResult:
        """Make `batch` (a `pa.Table` or a `SpilledTable`) durable in every table `spec.mode`
        writes (append first), once.

        Per kind: the rows at or below the kind's applied version are left out; when rows are
        left, ONE atomic commit holds them and records `version` as the kind's applied version;
        when none are left the kind is skipped (no commit). `added`: columns added at the source
        whose older rows hold a constant default; the consolidated table's stored rows and the
        batch's rows up to `added.upto` get it before the data commit (harmless to replay).
        Returns the durable position (>= `version`) and what each kind did; raises
        `SinkWriteError` / `SinkSchemaError` with nothing of the failing kind half-applied
        (kinds committed before it stay: a retry skips them)."""
        ...

    def maintain(self, ref: TableRef, kind: TableKind) -> MaintenanceResult:
        """Upkeep of one table between batches (compaction, checkpoints, vacuum); never changes
        the rows a reader sees nor applied versions. A missing table is a no-op."""
        ...

    def close(self) -> None:
        """Release cached handles (nothing is buffered: every write committed). Safe twice."""
        ...


class SnapshotSink(Sink, Protocol):
    """A sink that also loads snapshots and swaps in resyncs (`pipeline.snapshots`,
    `pipeline.resync`): what a `SinkFactory` builds.

    A snapshot attempt of one Delta table: `begin_snapshot` (emptied, the plan stored, an
    attempt marker), then one atomic commit per chunk (`write_snapshot_chunk`, its own chunk
    marker at the point it was read under), then `finish_snapshot` records the applied version
    the stream continues from. Until then `applied_version` stays None, so an interrupted
    attempt is never taken as loaded; the markers let the next attempt resume.
    """

    def snapshot_plan(self, ref: TableRef, kind: TableKind) -> tuple[str | None, int | None]:
        """(the stored plan JSON, the attempt marker's version); Nones without table or plan."""
        ...

    def snapshot_chunk_versions(
        self, ref: TableRef, kind: TableKind, chunks: Sequence[str]
    ) -> dict[str, int]:
        """For each of `chunks` committed to the table: the point it was copied under."""
        ...

    def begin_snapshot(
        self, ref: TableRef, kind: TableKind, *, empty: pa.Table, key: Sequence[str], plan: str,
        attempt: int,
    ) -> None:
        """Start an attempt from scratch: the table created or emptied in a commit carrying the
        attempt marker `attempt`, then `plan` stored. `empty`: the typed empty data columns."""
        ...

    def write_snapshot_chunk(
        self, ref: TableRef, kinds: Sequence[TableKind], pieces: Iterable[pa.Table], *,
        chunk: str, seq_base: int, version: int, committed_at_us: int,
    ) -> int:
        """Append one chunk's rows (data columns only; read to the end before anything is
        committed) to each of `kinds`, ONE commit per kind carrying the chunk marker at
        `version`; a copy failing midway commits nothing. Thread-safe (chunks are copied in
        parallel). Returns the rows written per kind."""
        ...

    def mirror_snapshot_chunks(
        self, ref: TableRef, into: TableKind, *, chunks: Mapping[str, tuple[int, int]],
        version: int, key: Sequence[str],
    ) -> int:
        """Copy into `into` the chunks (name -> `_cdc_seq` range) the table's other kind holds
        at `version` and `into` lacks (the process died between a chunk's two commits), in one
        commit carrying their markers. Returns the rows copied."""
        ...

    def finish_snapshot(self, ref: TableRef, kind: TableKind, *, version: int) -> None:
        """Mark the table loaded: `applied_version` becomes `version` (the earliest finished
        chunk's point, from where the stream replays the table's changes)."""
        ...

    def read_table(
        self, ref: TableRef, kind: TableKind, *, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """The table's current rows (soft-deleted ones included); LookupError when missing."""
        ...

    def apply_resync(
        self, ref: TableRef, kind: TableKind, staged: pa.Table, *, key: Sequence[str],
        version: int, committed_at_us: int, hard_deletes: bool = False,
        live_keys: pa.Table | None = None,
    ) -> int:
        """Replace a loaded table's contents by a re-snapshot taken at `version` (read from a
        staging sink with `read_table`) in ONE commit that also records `version` as applied:
        no reader sees a half-loaded table. Returns the rows written."""
        ...


SinkFactory = Callable[[SourceConfig], SnapshotSink]
"""Builds the sink of a source's destination (`SourceConfig.destination`; a staging area is the
same source with another destination). The default is `cdcengine.sink.delta_sink`."""

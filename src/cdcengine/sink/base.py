"""The sink seam: where a table's committed source transactions become durable, exactly once.

Who calls it: the pipeline's single writer thread, one table at a time. The engine never talks to
a destination any other way, so a sink is the only place that knows how progress is stored; for
Delta it is the transaction (`txn`) action committed in the same Delta commit as the data, so
data and progress can never disagree.

The protocol, in the order the pipeline uses it:

1. On start, for every captured table: `resume_version(ref, mode)` (or `applied_version` per
   kind). Source changes whose transaction end LSN is at or below it are already durable and are
   skipped; None means the table has no progress yet (it needs a snapshot).
2. For each batch: `write(ref, batch, spec=..., version=V)`. A batch holds whole source
   transactions of ONE table, rows in WAL order, and `V` is the end LSN of the last of them (every
   row's `_cdc_lsn` <= V). Versions a writer passes for one table only grow, except that after a
   restart the stream may replay a batch that was already committed: the sink recognises it
   (`V <= applied version`) and skips it without writing anything. That makes a retry of a
   failed `write` with the same batch and version always safe.
   When `write` returns, every change of the batch is durable and `applied_version(ref, kind)
   >= V` holds for every kind the mode writes; the returned `WriteResult.version` is the
   position the pipeline may count as durable for this table (the minimum over the kinds).
   When it raises, each kind's Delta table holds either all of the batch or none of it (a Delta
   commit is atomic); nothing is half-applied, and the caller retries or stops the table.
3. Between batches, when the pipeline decides: `maintain(ref, kind)` (compaction, checkpoints,
   vacuum). It never changes the rows a reader sees nor the applied versions.
4. On shutdown: `close()`.

A sink is not thread-safe: one writer thread owns it. Reading helpers of an implementation may say
otherwise for themselves.

Change batch columns (typed Arrow, SPEC §6): the data columns plus `_cdc_op` ('I', 'U', 'D'; 'R'
snapshot read; 'T' truncate, append tables only), `_cdc_lsn` int64, `_cdc_seq` int64,
`_cdc_committed_at` timestamp[us, UTC] and `_cdc_unchanged` list<string> (see `sink.fold`).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from cdcengine.config import TableMode
from cdcengine.errors import CDCError, Reason
from cdcengine.names import TableRef


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
class CommitResult:
    """What one write did to one Delta table.

    `version` is that table's applied version after the call: the batch's version when it was
    committed, the already-applied (higher or equal) version when the call was skipped.
    `delta_version` is the Delta table version that holds the commit (None when skipped).
    Row counts: `rows_in` change rows received; `rows_written` rows in the commit's source (after
    folding, for a consolidated table); `inserted`/`updated`/`deleted` target rows as Delta
    reports them (a soft delete counts as an update). `unresolved_unchanged` counts rows that
    carried an unchanged-TOAST column whose value neither the batch nor the target held (written
    as null, logged). `columns_added` lists columns added to the table before this commit.
    """

    table: TableRef
    kind: TableKind
    version: int
    skipped: bool
    delta_version: int | None = None
    rows_in: int = 0
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
    """The outcome of `Sink.write`: the durable position for the table and each commit."""

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
    of the destination's message, secrets scrubbed, for the table's stop reason.
    """

    default_reason = Reason.DESTINATION_FAILED

    def __init__(self, message: str | None = None, *, table_specific: bool = False,
                 detail: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.table_specific = table_specific
        self.detail = detail


class Sink(Protocol):
    """A destination of change batches with progress stored atomically with the data."""

    def applied_version(self, ref: TableRef, kind: TableKind) -> int | None:
        """The highest version committed to `ref`'s `kind` table, None when it has none."""
        ...

    def resume_version(self, ref: TableRef, mode: TableMode) -> int | None:
        """The version below which `ref`'s changes are durable in every table `mode` writes.

        The minimum of `applied_version` over `kinds_for(mode)`; None when any of them is None.
        """
        ...

    def write(
        self, ref: TableRef, batch: pa.Table, *, spec: TableSpec, version: int
    ) -> WriteResult:
        """Make `batch` durable in every table `spec.mode` writes, once (see module docstring)."""
        ...

    def maintain(self, ref: TableRef, kind: TableKind) -> MaintenanceResult:
        """Upkeep of one table between batches; never changes rows or applied versions."""
        ...

    def close(self) -> None:
        """Release cached handles. Safe to call twice."""
        ...

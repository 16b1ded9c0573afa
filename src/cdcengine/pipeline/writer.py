"""`BatchWriter`: commits change batches to Delta on its own thread, one at a time, in order.

Why a thread: a Delta MERGE (or a compaction) can take seconds, and the replication connection
must keep being read and answered meanwhile, or the walsender times out; decoding the next
batch also overlaps the commit of the previous one. The queue holds at most `depth` batches,
which is the back-pressure: a slow destination stops the reader, never grows memory.

Exactly once, per Delta table: every table kind (append, consolidated) has its own applied
version, read from its Delta log at start. A batch's rows at or below it are filtered out
(after a restart batches are cut differently, so a replayed batch can straddle the applied
version), and what is left is committed with the batch's version as the transaction action.
Upkeep (compaction, checkpoints, vacuum) runs here too, between writes, so it never races a
write to the same table.

Metrics (`cdcengine.metrics`) are recorded here because only the writer knows what really became
durable: rows and bytes per table after the already-applied filter, each Delta commit's duration,
and per batch the time from `submit` to durable and from its newest source commit to durable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from cdcengine import failpoints
from cdcengine.config import TableConfig
from cdcengine.lsn import format_lsn
from cdcengine.metrics import Metrics
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import ChangeBatch, StoppedTable
from cdcengine.sink.base import SinkSchemaError, SinkWriteError, TableKind, kinds_for
from cdcengine.sink.columns import COMMITTED_AT, LSN
from cdcengine.sink.delta import DeltaSink
from cdcengine.sink.fold import data_columns
from cdcengine.source.adapter import ColumnDefault

log = structlog.get_logger("cdcengine.pipeline.writer")

Applied = dict[tuple[TableRef, TableKind], int]

#: Pauses between in-place retries of one Delta table's commit before its failure is judged:
#: a passing hiccup clears within them, a failure that stays is the table's or the destination's.
TABLE_RETRY_PAUSES_S = (0.5, 1.0, 2.0)
#: The stop reason of a table whose rows the destination keeps refusing.
TABLE_WRITE_FAILED = "table_write_failed"
DefaultsFn = Callable[[TableRef, Sequence[str]], Mapping[str, ColumnDefault]]
"""What rows existing before an ADD COLUMN hold in it (`SourceAdapter.added_column_defaults`)."""


@dataclass(frozen=True, slots=True)
class Durable:
    """A batch whose every Delta commit is done: the slot may be confirmed up to `version`."""

    version: int
    rows: int  # rows committed (after filtering what was already applied)
    skipped: int  # rows that were already in Delta
    transactions: int
    duration_ms: int
    stopped: tuple[StoppedTable, ...] = ()  # tables whose changes Delta refused


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    transactions: int = 0
    rows: int = 0
    rows_by_table: dict[str, int] = field(default_factory=dict)
    commit_seconds: float = 0.0


_STOP = object()


class BatchWriter:
    """Start with `start()`; `submit` batches in version order; poll `durable()`; `close()`."""

    def __init__(self, sink: DeltaSink, *, source: str, tables: Mapping[TableRef, TableConfig],
                 applied: Applied, hard_deletes: bool, stats: WriterStats | None = None,
                 maintenance_interval_s: float = 600.0, depth: int = 1,
                 on_durable: Callable[[ChangeBatch, Durable], None] | None = None,
                 defaults: DefaultsFn | None = None, metrics: Metrics | None = None,
                 on_commit: Callable[[], None] | None = None) -> None:
        self._sink = sink
        self._metrics = metrics or Metrics()
        self._defaults = defaults
        self._source = source
        self._tables = dict(tables)
        self._applied = applied
        self._hard_deletes = hard_deletes
        self.stats = stats or WriterStats()
        self._maintenance_s = maintenance_interval_s
        self._maintained: dict[tuple[TableRef, TableKind], float] = {}
        self._on_durable = on_durable
        self._on_commit = on_commit  # after each Delta commit (upkeep too): for the watchdog
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._done: queue.SimpleQueue[Durable] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._busy = 0  # batches submitted and not yet durable
        self._stopped: set[TableRef] = set()
        self._aborting = False
        self._abort_wait = threading.Event()  # cuts a retry pause short on abort
        self._thread = threading.Thread(target=self._loop, name=f"writer-{source}", daemon=True)

    # ---- reader side ----------------------------------------------------------------------
    def start(self) -> BatchWriter:
        self._thread.start()
        return self

    @property
    def in_flight(self) -> int:
        return self._busy

    def submit(self, batch: ChangeBatch, *, waiting: Callable[[], None]) -> None:
        """Queue a batch; while the queue is full call `waiting()` every half second (keep the
        source connection alive there). Raises the writer's error, if it failed."""
        self.check()
        self._busy += 1
        item = (batch, time.monotonic())  # when it was taken: the batch latency starts here
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self.check()
                waiting()

    def durable(self) -> list[Durable]:
        """Batches that became durable since the last call, in order. Raises on failure."""
        out: list[Durable] = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._busy -= len(out)
        if not out:
            self.check()
        return out

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, *, waiting: Callable[[], None], timeout_s: float | None = None) -> None:
        """Finish every queued batch, then stop the thread (after an error: just stop)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.5)
                break
            except queue.Full:
                waiting()
                if deadline is not None and time.monotonic() > deadline:
                    break
        while self._thread.is_alive():
            self._thread.join(0.5)
            if self._thread.is_alive():
                waiting()
            if deadline is not None and time.monotonic() > deadline:
                break

    def abort(self) -> None:
        """After a failure: let the commit in progress finish, drop the queued batches, and
        return only once the thread is gone, so no write of this run lands after the caller
        moved on (a restart would replay those batches, cut differently). Never touches the
        source connection."""
        self._aborting = True
        self._abort_wait.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_STOP)
        self._thread.join()

    # ---- writer thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._aborting:
                return
            assert isinstance(item, tuple)
            batch, taken = item
            try:
                done = self._write(batch, taken)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                self._error = exc
                return
            self._done.put(done)
            if self._on_durable is not None:
                self._on_durable(batch, done)

    def _write(self, batch: ChangeBatch, taken: float) -> Durable:
        started = time.monotonic()
        metrics, newest_us = self._metrics, None
        written = 0
        touched: list[tuple[TableRef, TableKind]] = []
        tables = list(batch.tables.items())
        stopped: list[StoppedTable] = []
        for i, (ref, table) in enumerate(tables):
            if ref in self._stopped:
                continue
            tc = self._tables[ref]
            kinds = kinds_for(tc.mode)
            table, refused = self._added_columns(batch, ref, tc, table)
            if refused is not None:
                self._stopped.add(ref)
                stopped.append(refused)
                continue
            for j, kind in enumerate(kinds):
                rows = _after(table if kind is TableKind.CONSOLIDATED else batch.tables[ref],
                              self._applied.get((ref, kind), 0))
                if rows.num_rows == 0:
                    continue  # replayed after a restart: already in this Delta table
                commit_started = time.monotonic()
                refused = self._commit(ref, kind, rows, batch, kinds)
                if refused is not None:
                    # this table cannot take its changes: it stops here, the others go on
                    self._stopped.add(ref)
                    stopped.append(refused)
                    break
                metrics.observe_commit(self._source, time.monotonic() - commit_started)
                if self._on_commit is not None:
                    self._on_commit()
                self._applied[(ref, kind)] = batch.version
                touched.append((ref, kind))
                if j == 0:
                    written += rows.num_rows
                    by_table = self.stats.rows_by_table
                    by_table[tc.name] = by_table.get(tc.name, 0) + rows.num_rows
                    metrics.count_applied(self._source, tc.name, rows=rows.num_rows,
                                          nbytes=rows.nbytes)
                    newest_us = _newest(rows, newest_us)
                if j < len(kinds) - 1:
                    failpoints.hit("between_kinds")
            if i < len(tables) - 1:
                failpoints.hit("between_tables")
        failpoints.hit("after_commit")
        metrics.observe_batch(
            self._source, seconds=time.monotonic() - taken,
            commit_to_delta_s=None if newest_us is None else time.time() - newest_us / 1e6)
        elapsed = time.monotonic() - started
        self.stats.batches += 1
        self.stats.transactions += batch.transactions
        self.stats.rows += written
        self.stats.commit_seconds += elapsed
        done = Durable(version=batch.version, rows=written, skipped=batch.rows - written,
                       transactions=batch.transactions, duration_ms=round(elapsed * 1000),
                       stopped=tuple(stopped))
        log.info("batch_committed", source=self._source, rows=done.rows, skipped=done.skipped,
                 transactions=done.transactions, lsn=format_lsn(done.version),
                 duration_ms=done.duration_ms)
        self._upkeep(touched)
        return done

    def _commit(self, ref: TableRef, kind: TableKind, rows: pa.Table, batch: ChangeBatch,
                kinds: Sequence[TableKind]) -> StoppedTable | None:
        """Commit one Delta table's rows of the batch; a StoppedTable when the table must stop.

        A schema the sink refuses stops the table at once. A failure that looks like the
        table's own (`SinkWriteError.table_specific`: its rows or its statement refused) is
        retried in place a few times (`TABLE_RETRY_PAUSES_S`), then stops the table alone, so
        one table's deterministic failure never stalls the others; a failure of the destination
        itself (storage, network, a conflict) is raised after the same retries and the source
        retries it with backoff."""
        pauses = iter(TABLE_RETRY_PAUSES_S)
        while True:
            try:
                if kind is TableKind.APPEND:
                    # `both`: the consolidated table is written after this, so it still holds
                    # the values as of before the batch
                    self._sink.write_append(
                        ref, rows, version=batch.version, key=batch.keys[ref],
                        fill_from_consolidated=TableKind.CONSOLIDATED in kinds)
                else:
                    self._sink.write_consolidated(ref, rows, key=batch.keys[ref],
                                                  version=batch.version,
                                                  hard_deletes=self._hard_deletes)
                return None
            except SinkSchemaError as exc:
                return StoppedTable(ref=ref, reason=str(exc.reason), message=exc.message,
                                    remedy="resync the table", lsn=batch.version)
            except SinkWriteError as exc:
                pause = next(pauses, None)
                if pause is None or self._aborting:
                    if not exc.table_specific or self._aborting:
                        raise
                    return StoppedTable(
                        ref=ref, reason=TABLE_WRITE_FAILED,
                        message=f"{exc.message}; {len(TABLE_RETRY_PAUSES_S) + 1} attempts",
                        remedy=f"fix what the destination refuses in the Delta {kind} table "
                               f"of {ref.qualified} (see the message), then `cdcengine resync "
                               f"--source {self._source} --table {ref.qualified}`",
                        lsn=batch.version)
                log.warning("table_write_retry", source=self._source, table=ref.qualified,
                            kind=str(kind), table_specific=exc.table_specific,
                            message=exc.message, detail=exc.detail, retry_in_s=pause)
                self._abort_wait.wait(pause)

    def _added_columns(self, batch: ChangeBatch, ref: TableRef, tc: TableConfig,
                       table: pa.Table) -> tuple[pa.Table, StoppedTable | None]:
        """Columns added at the source since the consolidated table was last written: rows that
        existed before hold the column's default without any WAL saying so (SPEC §6).

        A constant default is backfilled into the stored rows older than the change (one commit
        carrying the table's current version, so a replay is harmless) and into this batch's
        rows from before it; a rewritten table (volatile default, identity) stops the table
        (remedy: resync). The added columns are those the batch reports, plus batch columns the
        Delta table lacks (after a restart the stream no longer shows the shape change: then
        every stored row predates it, as no row of the new shape was committed)."""
        if self._defaults is None or TableKind.CONSOLIDATED not in kinds_for(tc.mode):
            return table, None
        changes = [c for c in batch.schema_changes if c.ref == ref and c.added]
        stored = self._sink.data_columns(ref, TableKind.CONSOLIDATED)
        if stored is None:
            return table, None  # a new Delta table: no old rows
        known = {c.lower() for c in stored}
        added = {c for change in changes for c in change.added}
        added |= {c for c in data_columns(table) if c.lower() not in known}
        if tc.columns is not None:
            added &= set(tc.columns)
        added &= set(table.column_names)
        if not added:
            return table, None
        applied = self._applied.get((ref, TableKind.CONSOLIDATED), 0)
        upto = min((c.lsn for c in changes), default=applied)
        found = self._defaults(ref, sorted(added))
        rewritten = sorted(c for c, d in found.items() if d.kind == "rewritten")
        if rewritten:
            return table, StoppedTable(
                ref=ref, reason="schema_incompatible",
                message=f"column(s) {rewritten} of {ref.qualified} were added with a volatile "
                        "default (or as identity): PostgreSQL rewrote the table and gave each "
                        "existing row its own value, which the change stream does not carry.",
                remedy="resync the table", lsn=batch.version)
        for column, default in sorted(found.items()):
            if default.kind != "fast" or default.value is None:
                continue
            self._sink.backfill_column(ref, TableKind.CONSOLIDATED, column, default.value,
                                       upto_lsn=upto)
            table = _fill_before(table, column, default.value, upto)
        return table, None

    def _upkeep(self, touched: list[tuple[TableRef, TableKind]]) -> None:
        """Compact, checkpoint and vacuum each written table once per maintenance interval."""
        if self._maintenance_s <= 0:
            return
        now = time.monotonic()
        for ref, kind in touched:
            last = self._maintained.setdefault((ref, kind), now)
            if now - last >= self._maintenance_s:
                self._sink.maintain(ref, kind)
                self._maintained[(ref, kind)] = time.monotonic()
                if self._on_commit is not None:  # upkeep commits too: still moving
                    self._on_commit()


def _fill_before(table: pa.Table, column: str, value: pa.Scalar, upto: int) -> pa.Table:
    """`column` set to `value` where null in the rows with `_cdc_lsn <= upto`."""
    col = table.column(column)
    fill = pa.scalar(value.as_py(), col.type)
    old = pc.less_equal(table[LSN], pa.scalar(upto, pa.int64()))
    mask = pc.and_(old, pc.is_null(col))
    if not pc.any(mask).as_py():
        return table
    filled = pc.if_else(mask, fill, col)
    return table.set_column(table.schema.get_field_index(column), column, filled)


def _newest(rows: pa.Table, newest_us: int | None) -> int | None:
    """The later of `newest_us` and the rows' newest source commit time (µs since the epoch).

    Read from the `_cdc_committed_at` column of the rows actually written, so rows replayed after
    a restart (already in Delta) never count as a long commit-to-Delta delay."""
    found = pc.max(rows[COMMITTED_AT].cast(pa.int64())).as_py()
    if found is None:
        return newest_us
    value = int(found)
    return value if newest_us is None else max(value, newest_us)


def _after(table: pa.Table, applied: int) -> pa.Table:
    if applied <= 0:
        return table
    return table.filter(pc.greater(table[LSN], pa.scalar(applied, pa.int64())))

"""`BatchWriter`: commits change batches to Delta on its own thread, one at a time, in order.

Why a thread: a Delta MERGE (or a compaction) can take seconds, and the replication connection
must keep being read and answered meanwhile, or the walsender times out; decoding the next
batch also overlaps the commit of the previous one. The queue holds at most `depth` batches,
which is the back-pressure: a slow destination stops the reader, never grows memory.

Exactly once: the writer hands each table's rows of a batch to the sink (`Sink.write`, the
only sink call besides upkeep), which leaves out what each of its tables already applied (after a
restart batches are cut differently, so a replayed batch can straddle the applied version) and
commits the rest with the batch's version as the progress, atomically. Upkeep (compaction,
checkpoints, vacuum) runs here too, between writes, so it never races a write to the same table.
The writer never talks to the source: what rows older than an added column hold was resolved by
the pipeline's thread and rides on the batch (`ChangeBatch.added`).

Metrics (`cdcengine.metrics`) are recorded here because only the writer knows what really became
durable: rows and bytes per table after the already-applied filter, each Delta commit's duration,
and per batch the time from `submit` to durable and from its newest source commit to durable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from cdcengine import failpoints
from cdcengine.config import TableConfig
from cdcengine.errors import StopReason
from cdcengine.lsn import format_lsn
from cdcengine.metrics import Metrics
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import ChangeBatch, StoppedTable
from cdcengine.sink.base import (
    BatchTable,
    Sink,
    SinkSchemaError,
    SinkWriteError,
    TableKind,
    TableSpec,
    WriteResult,
)

log = structlog.get_logger("cdcengine.pipeline.writer")

#: Pauses between in-place retries of one Delta table's commit before its failure is judged:
#: a passing hiccup clears within them, a failure that stays is the table's or the destination's.
TABLE_RETRY_PAUSES_S = (0.5, 1.0, 2.0)


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
    # time batches spent between `submit` and the start of their write: waiting behind the
    # write before them (near 0 with adaptive batching unless the memory budget filled up)
    queued_seconds: float = 0.0


_STOP = object()


class BatchWriter:
    """Start with `start()`; `submit` batches in version order; poll `durable()`; `close()`."""

    def __init__(self, sink: Sink, *, source: str, tables: Mapping[TableRef, TableConfig],
                 hard_deletes: bool, stats: WriterStats | None = None,
                 maintenance_interval_s: float = 600.0, depth: int = 1,
                 on_durable: Callable[[ChangeBatch, Durable], None] | None = None,
                 metrics: Metrics | None = None,
                 on_commit: Callable[[], None] | None = None) -> None:
        self._sink = sink
        self._metrics = metrics or Metrics()
        self._source = source
        self._tables = dict(tables)
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

    def batch_clock(self, clock: Callable[[], float] = time.monotonic) -> Callable[[], float]:
        """The clock the batcher's flush interval runs on: it stands still while a batch is
        being written (submitted, not yet collected by `durable`).

        Adaptive batching: a merge into a large consolidated table costs about the same for 1k
        changes as for 100k (copy-on-write rewrites every file the keys land in), so while the
        destination is the bottleneck the next batch must not be a flush-interval slice queued
        behind the running merge, but everything that arrived meanwhile. With this clock the
        interval cannot expire during a write; the batcher still closes a batch that reaches
        `max_batch_rows` / `max_batch_mb` (its memory budget; `submit` then blocks: the
        back-pressure), and once the writer is free the interval has long passed, so the
        whole backlog goes in one batch and merges per second fall as the load rises. When
        writes are quicker than the interval nothing changes: a batch per interval.
        Reader thread only, like `submit` and `durable`.
        """
        frozen: float | None = None

        def now() -> float:
            nonlocal frozen
            t = clock()
            if self._busy:
                if frozen is None:
                    frozen = t
                return frozen
            frozen = None
            return t

        return now

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
                dropped = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(dropped, tuple):
                dropped[0].release()
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
                batch.release()  # a restart replays it from the source
                return
            self._done.put(done)
            if self._on_durable is not None:
                self._on_durable(batch, done)
            batch.release()  # durable: its spill files are not needed any more

    def _write(self, batch: ChangeBatch, taken: float) -> Durable:
        started = time.monotonic()
        metrics = self._metrics
        # each source transaction that became durable with this batch, by its end LSN (one
        # transaction may touch several tables): its commit time, for commit-to-visible
        commit_us: dict[int, int] = {}
        written = 0
        touched: list[tuple[TableRef, TableKind]] = []
        tables = list(batch.tables.items())
        stopped: list[StoppedTable] = []
        for i, (ref, table) in enumerate(tables):
            if ref in self._stopped:
                continue
            tc = self._tables[ref]
            spec = TableSpec(key=batch.keys[ref], mode=tc.mode, hard_deletes=self._hard_deletes)
            result, refused = self._commit(ref, table, spec, batch)
            if refused is not None:
                # this table cannot take its changes: it stops here, the others go on
                self._stopped.add(ref)
                stopped.append(refused)
                continue
            assert result is not None
            for commit in result.commits:
                if commit.skipped:
                    continue  # replayed after a restart: already in this Delta table
                metrics.observe_commit(self._source, commit.duration_ms / 1000)
                if self._on_commit is not None:
                    self._on_commit()
                touched.append((ref, commit.kind))
            first = result.commits[0] if result.commits else None
            if first is not None and first.rows_in:
                # counted once per table (its first kind): rows and bytes that became durable
                written += first.rows_in
                by_table = self.stats.rows_by_table
                by_table[tc.name] = by_table.get(tc.name, 0) + first.rows_in
                metrics.count_applied(self._source, tc.name, rows=first.rows_in,
                                      nbytes=first.bytes_in)
                commit_us.update(first.transactions)
            if i < len(tables) - 1:
                failpoints.hit("between_tables")
        failpoints.hit("after_commit")
        now = time.time()
        metrics.observe_batch(self._source, seconds=time.monotonic() - taken,
                              commit_to_delta_s=[now - us / 1e6 for us in commit_us.values()])
        elapsed = time.monotonic() - started
        self.stats.batches += 1
        self.stats.transactions += batch.transactions
        self.stats.rows += written
        self.stats.commit_seconds += elapsed
        self.stats.queued_seconds += started - taken
        done = Durable(version=batch.version, rows=written, skipped=batch.rows - written,
                       transactions=batch.transactions, duration_ms=round(elapsed * 1000),
                       stopped=tuple(stopped))
        log.info("batch_committed", source=self._source, rows=done.rows, skipped=done.skipped,
                 transactions=done.transactions, lsn=format_lsn(done.version),
                 duration_ms=done.duration_ms, queued_ms=round((started - taken) * 1000))
        self._upkeep(touched)
        return done

    def _commit(self, ref: TableRef, rows: BatchTable, spec: TableSpec,
                batch: ChangeBatch) -> tuple[WriteResult | None, StoppedTable | None]:
        """Write one table's rows of the batch (`Sink.write`); a StoppedTable when the table
        must stop.

        A schema the sink refuses stops the table at once. A failure that looks like the
        table's own (`SinkWriteError.table_specific`: its rows or its statement refused) is
        retried in place a few times (`TABLE_RETRY_PAUSES_S`; the kinds already committed are
        skipped by the sink), then stops the table alone, so one table's deterministic failure
        never stalls the others; a failure of the destination itself (storage, network, a
        conflict) is raised after the same retries and the source retries it with backoff."""
        pauses = iter(TABLE_RETRY_PAUSES_S)
        while True:
            try:
                return self._sink.write(ref, rows, spec=spec, version=batch.version,
                                        added=batch.added.get(ref)), None
            except SinkSchemaError as exc:
                return None, StoppedTable(ref=ref, reason=str(exc.reason), message=exc.message,
                                          remedy="resync the table", lsn=batch.version)
            except SinkWriteError as exc:
                pause = next(pauses, None)
                if pause is None or self._aborting:
                    if not exc.table_specific or self._aborting:
                        raise
                    kind = f" {exc.kind}" if exc.kind is not None else ""
                    return None, StoppedTable(
                        ref=ref, reason=StopReason.TABLE_WRITE_FAILED,
                        message=f"{exc.message}; {len(TABLE_RETRY_PAUSES_S) + 1} attempts",
                        remedy=f"fix what the destination refuses in the Delta{kind} table "
                               f"of {ref.qualified} (see the message), then `cdcengine resync "
                               f"--source {self._source} --table {ref.qualified}`",
                        lsn=batch.version)
                log.warning("table_write_retry", source=self._source, table=ref.qualified,
                            kind=str(exc.kind), table_specific=exc.table_specific,
                            message=exc.message, detail=exc.detail, retry_in_s=pause)
                self._abort_wait.wait(pause)

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

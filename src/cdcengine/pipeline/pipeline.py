"""`Pipeline`: one source from its slot into Delta, exactly once (SPEC §5, §8).

Order of work in `run`:
1. the source must be enabled; the pipeline holds the source's lease while it runs;
2. the source's identity (system identifier, timeline) must be the one recorded at enable,
   else the source is `broken` (`source_changed`) — never silently "already applied";
3. each table without an applied version in Delta is snapshotted (temporary slot, version = its
   consistent point C): here and now while no table streams yet (the first sync);
4. the change stream runs from the slot's confirmed position: the batcher closes batches on
   transaction boundaries, the `BatchWriter` (its own thread) hands each table's rows to the
   sink (`Sink.write`: the rows above each Delta table's applied version, in one commit carrying
   the batch's version), and only then does the flush LSN sent to the server move (`Progress`);
5. work for some tables while others stream (a table `enable` added, a `resync`, a change log
   for a table switched to `both`) runs on a `_Backfill` thread beside a stream session that
   leaves those tables out and confirms nothing; when it is done the session ends between
   transactions and the next one replays from the unconfirmed position, so the backfilled
   tables get their changes after their own C and the others skip what they applied.
A crash at any point leaves Delta and the slot consistent: the slot is never confirmed past what
is durable, and what is durable is never applied twice (`failpoints` names the moments the
tests kill the process at).

Every sink comes from the pipeline's `sink_factory` (default: Delta, `cdcengine.sink.delta_sink`);
the writer thread calls only the `Sink` protocol and never the source (added columns' defaults
are resolved on the reading thread, `pipeline.defaults`). The reading thread alone touches the
replication connection; while a Delta commit runs it goes
on reading (one batch queued at most: the back-pressure) and keeps the walsender answered. The
state store is shared by the reading, writer and backfill threads (its calls are serialised).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from cdcengine import failpoints
from cdcengine.config import SourceConfig, TableConfig
from cdcengine.errors import CDCError, NotEnabled, Reason, reason_of
from cdcengine.events import Commit
from cdcengine.lsn import format_lsn
from cdcengine.metrics import Metrics
from cdcengine.names import TableRef
from cdcengine.pipeline.activity import Activity
from cdcengine.pipeline.batcher import Batcher, CaptureSpec, ChangeBatch, StoppedTable
from cdcengine.pipeline.defaults import AddedColumnDefaults, DefaultsFn
from cdcengine.pipeline.failures import record_failure
from cdcengine.pipeline.progress import Progress
from cdcengine.pipeline.resync import is_requested, run_resync
from cdcengine.pipeline.runlog import RunLog
from cdcengine.pipeline.snapshots import snapshot_table
from cdcengine.pipeline.tablesets import Registrations, registered_changes, registrations
from cdcengine.pipeline.writer import BatchWriter, Durable, WriterStats
from cdcengine.sink import delta_sink
from cdcengine.sink.base import SinkFactory, SnapshotSink, TableKind, kinds_for
from cdcengine.source.adapter import ChangeSession, SourceAdapter
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, open_store
from cdcengine.state.base import Lease, SourceState, StateStore, TableState, hold_lease

log = structlog.get_logger("cdcengine.pipeline.pipeline")

STREAM_LEASE_TTL_S = 60.0  # renewed every third of it while streaming
READ_TIMEOUT_S = 0.5
# The source said nothing for this long while many committed rows wait (at least 1/20 of
# max_batch_rows: the end of a burst or of a backlog) and the writer is free: write them now
# instead of waiting out the flush interval. A trickle of small transactions still batches by
# the flush interval (one Delta commit per transaction would cost files and object-store
# requests); while the writer is busy, rows keep accumulating into the next batch as before.
IDLE_FLUSH_S = 0.05
IDLE_FLUSH_FRACTION = 20
WORK_POLL_S = 2.0  # how often a session looks for `resync` requests and table-set changes

Applied = dict[tuple[TableRef, TableKind], int]
"""Per Delta table (source table, kind) its applied version, as read when the table loaded."""


@dataclass(slots=True)
class RunStats(WriterStats):
    snapshot_rows: int = 0
    flush_lsn: int = 0


class Pipeline:
    def __init__(self, source: SourceConfig, *, state: StateArg = None,
                 adapter: SourceAdapter | None = None, spill_dir: Path | None = None,
                 on_batch: Callable[[ChangeBatch, RunStats], None] | None = None,
                 metrics: Metrics | None = None, resume_lsn: int = 0,
                 activity: Activity | None = None,
                 sink_factory: SinkFactory = delta_sink) -> None:
        self.source = source
        # every sink of this pipeline (the stream's, a backfill's, a resync's staging area)
        # comes from here: the only way the pipeline reaches a destination
        self.sink_factory = sink_factory
        # The highest flush position this process told the server (a reconnect within the
        # daemon passes the last run's): every change session starts there explicitly, not at
        # whatever the slot says (0/0). The server starts at the later of the two; ours is
        # never ahead of what is durable in Delta.
        self.confirmed_lsn = resume_lsn
        self._state = state
        self._adapter = adapter or adapter_for(source)
        self._spill_dir = spill_dir
        self._on_batch = on_batch
        # the daemon passes its one `Metrics` (served on /metrics); alone, a private instance
        self.metrics = metrics or Metrics()
        # what is pending and what became durable, for the daemon's watchdog (serve.watchdog)
        self.activity = activity or Activity()
        self.stats = RunStats()
        self._applied: Applied = {}
        # set while this run holds the source's lease: the daemon's monitor acts for it then
        self.holding = threading.Event()
        self._runlog: RunLog
        self._seen: Registrations = {}  # the table registrations at the last look
        self._stopped_refs: set[TableRef] = set()  # tables recorded as stopped
        # when the last change session started streaming (monotonic), for `good_session`
        self._streaming_since: float | None = None

    def good_session(self, min_s: float) -> bool:
        """Did this run stream well: a change session that made a batch durable, or stayed up
        `min_s`? (The daemon then starts a reconnect's backoff afresh.)"""
        since = self._streaming_since
        if since is None:
            return False
        return self.stats.batches > 0 or time.monotonic() - since >= min_s

    def run(self, stop_event: threading.Event | None = None) -> RunStats:
        """Snapshot where needed, then stream until `stop_event` is set (or an error).

        A requested stop finishes the current Delta commit and confirms what is durable. Errors
        are `CDCError`s; the caller (the daemon) decides on retries. Non-retryable slot and
        identity problems mark the source `broken` before they are raised.
        """
        stop = stop_event or threading.Event()
        src = self.source
        with open_store(self._state) as store, hold_lease(store, src.name, purpose="daemon",
                                                      ttl_s=STREAM_LEASE_TTL_S, wait_s=0) as lease:
            self.holding.set()
            self._runlog = RunLog(store, src.name, kind="stream", holder=lease.holder)
            error: BaseException | None = None
            try:
                self._run_leased(store, lease, stop)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._runlog.end(error)
                self.holding.clear()
        return self.stats

    def _run_leased(self, store: StateStore, lease: Lease, stop: threading.Event) -> None:
        src = self.source
        rec = store.get_source(src.name)
        if not (rec and rec.enabled):
            raise NotEnabled(f"source {src.name!r} is not enabled; run `cdcengine enable`")
        if rec.broken is not None and rec.broken.reason != Reason.CRITICAL_LAG_SELF_MANAGED:
            raise CDCError(f"source {src.name!r} is broken ({rec.broken.reason}): "
                           f"{rec.broken.message}", reason=reason_of(rec.broken.reason),
                           retryable=False, fix="Run `cdcengine repair` for this source.")
        try:
            self._check_identity(store, rec.system_identifier, rec.timeline)
            sink = self.sink_factory(src)
            self._seen = registrations(store.list_tables(src.name))
            unlisted = sorted(set(self._seen) - {tc.name for tc in src.table_configs})
            if unlisted:
                log.warning("tables_not_in_config", source=src.name, tables=unlisted,
                            fix="add them to `tables`, or run `cdcengine enable` with this "
                                "config to stop capturing them")
            renew = lambda: store.renew_lease(lease, STREAM_LEASE_TTL_S)  # noqa: E731
            while not stop.is_set():
                self._take_registrations(store)
                self._stopped_refs = {TableRef.parse(t.name) for t in store.list_tables(src.name)
                                      if t.state is TableState.STOPPED}
                job = self._backfill(store, sink, stop)
                if stop.is_set():
                    break
                # a session ends early when work for some table comes up (a resync request, a
                # table added by `enable`) or when the backfill beside it finished: the next
                # session replays from the slot's confirmed position
                try:
                    again = self._stream(store, sink, stop, renew, job)
                except BaseException:
                    if job is not None:
                        job.cancel()
                    raise
                if job is not None:
                    self._backfilled(sink, job)
                if not again:
                    break
        except CDCError as exc:
            record_failure(store, self.source.name, exc)
            raise

    # ---- identity -----------------------------------------------------------------------------
    def _check_identity(self, store: StateStore, sysid: str | None, timeline: int | None) -> None:
        ident = self._adapter.identify(self.source)
        moved = timeline is not None and ident.timeline != timeline
        if sysid and (ident.system_identifier != sysid or moved):
            raise CDCError(
                f"source {self.source.name!r}: the database's identity changed (system "
                f"identifier {sysid} timeline {timeline} at enable, now "
                f"{ident.system_identifier} timeline {ident.timeline}): it was restored, failed "
                "over or recreated, so applied positions no longer describe it.",
                reason=Reason.SOURCE_CHANGED)

    # ---- table set, snapshots and resyncs ----------------------------------------------------
    def _take_registrations(self, store: StateStore) -> None:
        """Apply what `enable` registered since the last look (see `pipeline.tablesets`)."""
        now = registrations(store.list_tables(self.source.name))
        change = registered_changes(self.source, self._seen, now)
        self._seen = now
        if not change:
            return
        self.source = change.source
        for name in change.removed:
            ref = TableRef.parse(name)
            self._applied = {k: v for k, v in self._applied.items() if k[0] != ref}
        log.info("tables_changed", source=self.source.name, added=list(change.added),
                 removed=list(change.removed), mode_changed=list(change.remoded))

    def _pending(self, store: StateStore, sink: SnapshotSink) -> list[TableConfig]:
        """Tables to (re-)snapshot: never loaded in some table kind, or a queued `resync`."""
        records = {t.name: t for t in store.list_tables(self.source.name)}
        def wanted(tc: TableConfig) -> bool:
            rec = records.get(tc.name)
            if rec is not None and is_requested(rec):
                return True
            stopped = rec is not None and rec.state is TableState.STOPPED
            return not stopped and not self._load_applied(sink, tc)
        return [tc for tc in self.source.table_configs if wanted(tc)]

    def _work_waiting(self, store: StateStore) -> bool:
        """Between transactions of a session: is there a table to (re-)snapshot or a change of
        the table set to apply? (Read from the state store: requests come from other
        processes.)"""
        records = store.list_tables(self.source.name)
        return any(is_requested(t) for t in records) \
            or bool(registered_changes(self.source, self._seen, registrations(records)))

    def _backfill(self, store: StateStore, sink: SnapshotSink,
                  stop: threading.Event) -> _Backfill | None:
        """Snapshot or resync the tables that need it: here and now when no other table
        streams yet (the first sync), else on a `_Backfill` thread beside the stream."""
        pending = self._pending(store, sink)
        if not pending:
            return None
        if self._live(skip={tc.ref for tc in pending}):
            return _Backfill(self, store, pending).start()
        _set_state(store, self.source.name, SourceState.SNAPSHOTTING)
        for tc in pending:
            if stop.is_set() or self._snapshot_one(store, sink, tc, stop) is None:
                return None
            self._load_applied(sink, tc)
        return None

    def _snapshot_one(self, store: StateStore, sink: SnapshotSink, tc: TableConfig,
                      stop: threading.Event) -> int | None:
        """`_backfill_one`, seen by the watchdog as a snapshot running."""
        with self.activity.snapshotting(tc.name):
            return self._backfill_one(store, sink, tc, stop)

    def _backfill_one(self, store: StateStore, sink: SnapshotSink, tc: TableConfig,
                      stop: threading.Event) -> int | None:
        """Load one table's snapshot, or swap in its re-snapshot; returns the rows loaded, None
        when stopped first (what is committed stays for the next run). Thread-safe: it touches
        no state of the running stream."""
        src = self.source
        started = time.monotonic()
        rec = next((t for t in store.list_tables(src.name) if t.name == tc.name), None)
        if rec is not None and is_requested(rec):
            again = run_resync(self._adapter, src, tc, sink, store, stop=stop,
                               sink_factory=self.sink_factory)
            if not again.finished:
                return None
            rows, version = again.rows, again.version
        else:
            store.upsert_table(src.name, tc.name, str(tc.mode))
            store.set_table_state(src.name, tc.name, TableState.SNAPSHOTTING)
            done = snapshot_table(self._adapter, src, tc, sink, store, stop=stop)
            if not done.finished:  # stopped: the finished chunks stay in Delta for the next run
                return None
            failpoints.hit("after_snapshot")
            if done.masked:
                log.warning("values_masked", source=src.name, table=tc.name, columns=done.masked)
            store.set_table_state(src.name, tc.name, TableState.STREAMING)
            rows, version = done.rows_copied, done.version
            log.info("table_snapshotted", source=src.name, table=tc.name, rows=done.rows_copied,
                     rows_total=done.rows_total, chunks=done.chunks_total,
                     chunks_copied=done.chunks_copied, resumed=done.resumed,
                     lsn=format_lsn(done.version or 0),
                     duration_ms=round((time.monotonic() - started) * 1000))
        self._runlog.snapshot(tc.name, rows=rows, version=version,
                              duration_s=time.monotonic() - started)
        self.stats.snapshot_rows += rows
        return rows

    def _backfilled(self, sink: SnapshotSink, job: _Backfill) -> None:
        """After a backfill thread: the loaded tables stream from their new versions on."""
        job.join()
        for tc in job.loaded:
            self._load_applied(sink, tc)
        if job.error is not None:
            raise job.error

    def _live(self, skip: set[TableRef]) -> dict[TableRef, TableConfig]:
        """The tables a session streams: every Delta table of theirs loaded, not in `skip`, not
        stopped (a stopped table stays out until a resync reloads it: streaming it again from
        a later position would leave a gap nobody sees)."""
        return {tc.ref: tc for tc in self.source.table_configs
                if tc.ref not in skip and tc.ref not in self._stopped_refs
                and all((tc.ref, kind) in self._applied for kind in kinds_for(tc.mode))}

    def _load_applied(self, sink: SnapshotSink, tc: TableConfig) -> bool:
        """Read each Delta table's applied version; True when every kind of the table has one."""
        versions = {kind: sink.applied_version(tc.ref, kind) for kind in kinds_for(tc.mode)}
        if any(v is None for v in versions.values()):
            return False
        for kind, version in versions.items():
            assert version is not None
            self._applied[(tc.ref, kind)] = version
        return True

    # ---- streaming ----------------------------------------------------------------------------
    def _stream(self, store: StateStore, sink: SnapshotSink, stop: threading.Event,
                renew: Callable[[], object], job: _Backfill | None) -> bool:
        """Stream until `stop` (False), or (True: the session ended cleanly between
        transactions, everything complete committed) until `job` finished, or, without a job,
        until work for a table comes up. While `job` runs its tables are left out and nothing
        is confirmed to the server (`Progress.held`)."""
        src = self.source
        live = self._live(skip=set() if job is None else job.refs)
        specs = {ref: CaptureSpec(ref=ref, key=tc.primary_key, columns=tc.columns)
                 for ref, tc in live.items()}
        spill = self._spill_dir or Path(tempfile.gettempdir())
        start = self.confirmed_lsn
        # a slot far behind may be caught up faster than streaming, chunk by chunk, each made
        # durable before the next: only when this session confirms as it goes (nothing held)
        with self._adapter.changes(src, spill_dir=spill, start_lsn=start,
                                   catchup=job is None) as changes:
            progress = Progress(held=job is not None)
            defaults = self._added_column_defaults(sink, live)  # before the writer owns the sink
            writer = BatchWriter(sink, source=src.name, tables=live,
                                 hard_deletes=src.hard_deletes, stats=self.stats,
                                 maintenance_interval_s=src.maintenance_interval_s,
                                 on_durable=self._durable_hook(), metrics=self.metrics,
                                 on_commit=self.activity.stream.moved).start()
            # the flush interval does not run while a batch is written: a slow destination
            # gets bigger batches, not a queue of small ones (`BatchWriter.batch_clock`)
            batcher = Batcher(specs, changes.converters, max_rows=src.max_batch_rows,
                              max_bytes=src.max_batch_mb * 1024 * 1024,
                              flush_interval_s=src.flush_interval_ms / 1000, spill_dir=spill,
                              clock=writer.batch_clock())
            loop = _Loop(self, store, changes, batcher, progress, writer, defaults)
            _set_state(store, src.name, SourceState.STREAMING)
            self._streaming_since = time.monotonic()
            log.info("stream_started", source=src.name, start_lsn=format_lsn(start),
                     tables=sorted(ref.qualified for ref in live), held=job is not None)
            renewed = polled = time.monotonic()
            again = False
            try:
                add = batcher.add
                while not stop.is_set() and not again:
                    idle = True
                    # with rows waiting, a short silence already means the source is idle
                    for event in changes.events(IDLE_FLUSH_S if loop.idle_flush_rows()
                                                else READ_TIMEOUT_S):
                        idle = False
                        add(event)
                        # batches close only between transactions: look only after commits
                        if type(event) is Commit:
                            progress.received(event.end_lsn)
                            if batcher.ready():
                                loop.submit()
                    if batcher.ready() or (changes.draining and not batcher.in_transaction) \
                            or (idle and loop.idle_flush()):
                        loop.submit()
                    loop.settle()
                    if time.monotonic() - renewed > STREAM_LEASE_TTL_S / 3:
                        renew()
                        renewed = time.monotonic()
                    if batcher.in_transaction:
                        continue
                    if job is not None:
                        again = job.done.is_set()
                    elif time.monotonic() - polled > WORK_POLL_S:
                        polled = time.monotonic()
                        again = self._work_waiting(store)
                # a requested stop: commit what is complete, confirm what is durable, leave
                if not batcher.in_transaction and batcher.version is not None:
                    loop.submit()
                writer.close(waiting=loop.keep_alive)
            except BaseException:
                writer.abort()  # nothing of this run may commit after it raised
                raise
            loop.settle()
            changes.send_status()
            writer.check()
        return again

    def _added_column_defaults(self, sink: SnapshotSink,
                               live: dict[TableRef, TableConfig]) -> AddedColumnDefaults:
        """The session's resolver of added columns' defaults (`pipeline.defaults`): the
        adapter's answer to "what do old rows hold in an added column" (SPEC §6), asked from
        this thread, with the columns each consolidated table stores now."""
        ask = getattr(self._adapter, "added_column_defaults", None)
        if ask is None:
            return AddedColumnDefaults(None, live, {})
        src = self.source
        fn: DefaultsFn = lambda ref, columns: ask(src, ref, columns)  # noqa: E731
        stored = {ref: sink.data_columns(ref, TableKind.CONSOLIDATED)
                  for ref, tc in live.items() if TableKind.CONSOLIDATED in kinds_for(tc.mode)}
        return AddedColumnDefaults(fn, live, stored)

    def _durable_hook(self) -> Callable[[ChangeBatch, Durable], None]:
        on_batch, runlog = self._on_batch, self._runlog

        def durable(batch: ChangeBatch, done: Durable) -> None:
            runlog.durable(batch, done)
            if on_batch is not None:
                on_batch(batch, self.stats)
        return durable

    def _record_stop(self, store: StateStore, stopped: StoppedTable) -> None:
        store.set_table_state(self.source.name, stopped.ref.qualified, TableState.STOPPED,
                              reason=f"{stopped.reason}: {stopped.message}",
                              remedy=stopped.remedy)
        log.warning("table_stopped", source=self.source.name, table=stopped.ref.qualified,
                    reason=stopped.reason, message=stopped.message, lsn=format_lsn(stopped.lsn))

    def _stopped(self, store: StateStore, batch: ChangeBatch) -> None:
        for stopped in batch.stopped:
            self._record_stop(store, stopped)
        for (ref, column), count in batch.masked.items():
            log.warning("values_masked", source=self.source.name, table=ref.qualified,
                        column=column, count=count)

class _Loop:
    """The reader side of one streaming run: hand batches to the writer, confirm what is durable.

    Everything here runs on the reading thread, which alone touches the replication connection
    and the state store.
    """

    STATUS_EVERY_S = 5.0

    def __init__(self, pipeline: Pipeline, store: StateStore, changes: ChangeSession,
                 batcher: Batcher, progress: Progress, writer: BatchWriter,
                 defaults: AddedColumnDefaults) -> None:
        self.pipeline, self.store, self.changes = pipeline, store, changes
        self.batcher, self.progress, self.writer = batcher, progress, writer
        self.defaults = defaults
        self._status_at = time.monotonic()

    def submit(self) -> None:
        batch = self.batcher.take()
        if batch is None:
            return
        self.pipeline.activity.stream.pending = True  # taken: pending, before anything can fail
        failpoints.hit("batch_taken")
        batch, stopped = self.defaults.resolve(batch)  # may ask the source: this thread's job
        for stop in stopped:
            self.batcher.stop_table(stop.ref)
        self.pipeline._stopped(self.store, batch)
        self.progress.batch_started()
        self.writer.submit(batch, waiting=self.keep_alive)

    def idle_flush_rows(self) -> bool:
        """Enough rows wait for a quiet source to be worth a batch of their own."""
        enough = max(1, self.pipeline.source.max_batch_rows // IDLE_FLUSH_FRACTION)
        return self.batcher.pending_rows >= enough

    def idle_flush(self) -> bool:
        """The source went quiet: take what is committed now if the writer has nothing to do
        and enough rows wait (see `IDLE_FLUSH_S`)."""
        b = self.batcher
        return self.idle_flush_rows() and not b.in_transaction and b.version is not None \
            and self.progress.in_flight == 0

    def settle(self) -> None:
        """Move the flush LSN over what became durable; tell the server promptly."""
        confirmed = self.progress.flush_lsn
        done = self.writer.durable()
        for batch in done:
            for stopped in batch.stopped:
                self.batcher.stop_table(stopped.ref)
                self.pipeline._record_stop(self.store, stopped)
        self.pipeline._runlog.flush()
        # the buffer is read after the durable batches were collected: one consistent step
        confirmable = self.progress.settle(
            durable=[batch.version for batch in done],
            open_transaction=self.batcher.in_transaction,
            pending_rows=self.batcher.pending_rows, keepalive_lsn=self.changes.keepalive_lsn)
        self.changes.set_flush_lsn(confirmable)
        # for the watchdog: received and not yet durable is pending; a durable batch is progress
        rows, in_flight = self.batcher.pending_rows, self.progress.in_flight
        self.pipeline.activity.stream.report(
            pending=bool(in_flight or rows or self.batcher.in_transaction), moved=bool(done),
            batches_in_flight=in_flight, rows_buffered=rows,
            open_transaction=self.batcher.in_transaction)
        if confirmable:  # held: the last position confirmed stays the figure
            self.pipeline.stats.flush_lsn = confirmable
            self.pipeline.confirmed_lsn = max(self.pipeline.confirmed_lsn, confirmable)
        if self.progress.flush_lsn > confirmed \
                or time.monotonic() - self._status_at > self.STATUS_EVERY_S:
            self.changes.send_status()
            self._status_at = time.monotonic()
            failpoints.hit("after_confirm")

    def keep_alive(self) -> None:
        """While the writer is busy: confirm what it finished and keep the walsender content."""
        self.settle()


class _Backfill:
    """Snapshots and resyncs of some tables on their own thread while the others stream.

    It writes only its own tables' Delta tables (through its own sink) and their state
    records; the stream leaves those tables out and confirms nothing meanwhile, so when the
    backfill is done the next session replays their changes from before each snapshot's
    consistent point. A table that cannot be loaded for a lasting reason (it was dropped, no
    SELECT permission) is stopped with that reason, the others go on; a passing failure (a lost
    connection) ends the backfill and is raised by the stream's thread.
    """

    def __init__(self, pipeline: Pipeline, store: StateStore, tables: list[TableConfig]) -> None:
        self._pipeline, self._store, self.tables = pipeline, store, tables
        self.refs = {tc.ref for tc in tables}
        self.loaded: list[TableConfig] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._sink = pipeline.sink_factory(pipeline.source)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"backfill-{pipeline.source.name}")

    def start(self) -> _Backfill:
        log.info("backfill_started", source=self._pipeline.source.name,
                 tables=[tc.name for tc in self.tables])
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop after the chunks being copied (they stay committed for the next run); wait."""
        self._stop.set()
        self._thread.join()

    def join(self) -> None:
        if not self.done.is_set():
            self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pipeline, store = self._pipeline, self._store
        try:
            for tc in self.tables:
                if self._stop.is_set():
                    return
                try:
                    rows = pipeline._snapshot_one(store, self._sink, tc, self._stop)
                except CDCError as exc:
                    if exc.retryable:
                        raise
                    pipeline._record_stop(store, StoppedTable(
                        ref=tc.ref, reason=str(exc.reason), message=exc.message,
                        remedy=exc.fix or "fix the cause, then resync the table", lsn=0))
                    continue
                if rows is None:
                    return
                self.loaded.append(tc)
        except BaseException as exc:  # noqa: BLE001 - raised by the stream's thread
            self.error = exc
        finally:
            self.done.set()


def _set_state(store: StateStore, source: str, state: SourceState) -> None:
    """The pipeline's progress state, unless something more important is showing: a marker
    (broken, paused) or the monitor's lag states, which only the monitor lifts."""
    rec = store.get_source(source)
    if rec is None or rec.broken or rec.paused \
            or rec.state in (SourceState.WARNING, SourceState.ERROR):
        return
    store.set_source_state(source, state)

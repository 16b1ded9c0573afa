"""Chunked, parallel, resumable table snapshots (SPEC §8), engine-neutral.

`snapshot_table` loads one table's initial snapshot into its Delta table(s):

1. The adapter opens a snapshot session (a temporary slot exporting a snapshot at its
   consistent point C; the exporting connection stays open until the session ends).
2. The Delta log decides whether an interrupted snapshot can be resumed: each Delta table keeps
   the plan of its current attempt (a table property), an attempt marker txn and one txn per
   finished chunk (see `SnapshotSink`). A resume needs the same plan in every Delta
   table still to load, the same layout (columns, key, leaves) now as when it was planned, a
   usable chunk key (key-range chunks) and the source slot not confirmed past the earliest
   finished chunk's point. Otherwise the table starts from scratch: a new plan at C, the
   Delta tables emptied in the commit that records the new attempt.
3. The missing chunks are copied by `workers` threads, each on its own connection importing the
   exported snapshot, and streamed into Delta: per chunk and Delta table ONE commit carrying the
   chunk's txn (version = C of the run that copied it). Memory stays bounded: pieces of
   ~100k rows flow from COPY through Arrow into the chunk's spool (in memory up to 64 MB per
   Delta table, then a local file), which is committed once the chunk is read — deltalake is
   never handed a reader that pulls through Python (see `cdcengine.sink.delta`, issue 12).
4. When every chunk is in, each Delta table gets its app id at the earliest finished chunk's point,
   so the stream replays the table's changes from there; the consolidated merge applies a
   replayed change only when it is newer than the stored row's `_cdc_lsn`, which keeps the rows
   of chunks copied at a later point exact. A table without a usable key is one chunk per leaf
   copied at one point, and restarts whole when interrupted.

Chunk progress (planned/finished, rows) and the table's rows, rows/s and ETA go to the state
store (display only: the Delta log stays the truth) and to `snapshot_progress` log events.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import structlog

from cdcengine import failpoints
from cdcengine.config import SourceConfig, TableConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine.sink.base import SnapshotSink, TableKind, kinds_for
from cdcengine.source.adapter import (
    ChunkRange,
    SnapshotLayout,
    SnapshotSession,
    SnapshotStopped,
    SourceAdapter,
)
from cdcengine.state.base import ChunkState, SnapshotChunkRecord, SnapshotProgress, StateStore

log = structlog.get_logger("cdcengine.pipeline.snapshots")

PLAN_FORMAT = 1
PROGRESS_EVERY_S = 2.0
SEQ_BITS = 32  # append-table `_cdc_seq` of snapshot rows: chunk id << 32 | row in chunk


# ---- pure planning ------------------------------------------------------------------------------
def split_points(values: Sequence[str], chunks: int) -> list[str]:
    """At most `chunks - 1` cut points from `values` (sorted by the source, possibly repeating),
    at evenly spaced positions; equal neighbours collapse and the first value is never a cut.
    """
    m = len(values)
    if chunks <= 1 or m == 0:
        return []
    out: list[str] = []
    for i in range(1, chunks):
        value = values[min(m - 1, round(i * m / chunks))]
        # the first value is (about) the minimum: cutting there leaves an empty first range
        if value != values[0] and (not out or out[-1] != value):
            out.append(value)
    return out


def ranges_from_points(points: Sequence[str]) -> list[tuple[str | None, str | None]]:
    """[None, p1), [p1, p2), …, [pk, None): ranges covering the whole key space, in order."""
    bounds: list[str | None] = [None, *points, None]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def chunk_name(attempt: int, chunk_id: int) -> str:
    """A chunk's name in its txn app id: unique per attempt (the attempt's consistent point)."""
    return f"{attempt:x}-{chunk_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotPlan:
    attempt: int  # consistent point of the run that planned it
    layout: SnapshotLayout
    chunks: tuple[ChunkRange, ...]

    def name(self, chunk: ChunkRange) -> str:
        return chunk_name(self.attempt, chunk.id)

    def to_json(self) -> str:
        return json.dumps({
            "format": PLAN_FORMAT, "attempt": self.attempt,
            "columns": list(self.layout.columns), "key": list(self.layout.key),
            "chunk_key": self.layout.chunk_key, "leaves": list(self.layout.leaves),
            "chunks": [c.to_json() for c in self.chunks]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SnapshotPlan | None:
        """The plan, or None when absent or unreadable (then the table starts afresh)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            if data.get("format") != PLAN_FORMAT:
                return None
            layout = SnapshotLayout(columns=tuple(data["columns"]), key=tuple(data["key"]),
                                    chunk_key=data["chunk_key"], leaves=tuple(data["leaves"]))
            return cls(attempt=int(data["attempt"]), layout=layout,
                       chunks=tuple(ChunkRange.from_json(c) for c in data["chunks"]))
        except (ValueError, KeyError, TypeError):
            return None


def resumable_plan(
    stored: Mapping[TableKind, tuple[str | None, int | None]], layout: SnapshotLayout
) -> tuple[SnapshotPlan | None, str]:
    """The plan an interrupted snapshot can continue, or None and why it must restart.

    `stored`: per Delta table still to load, its (plan JSON, attempt marker)."""
    plans = {kind: SnapshotPlan.from_json(text) for kind, (text, _) in stored.items()}
    if not plans or any(p is None for p in plans.values()):
        return None, "no plan"
    texts = {text for text, _ in stored.values()}
    if len(texts) != 1:
        return None, "the Delta tables hold different plans"
    plan = next(iter(plans.values()))
    assert plan is not None
    if any(marker != plan.attempt for _, marker in stored.values()):
        return None, "the plan's attempt was not started in Delta"
    if not plan.layout.resumable:
        return None, "no usable key: the table restarts whole"
    if plan.layout != layout:
        return None, "the table's columns, key or partitions changed"
    return plan, "resumable"


def remaining_chunks(
    plan: SnapshotPlan, finished: Mapping[TableKind, Mapping[str, int]]
) -> list[tuple[ChunkRange, tuple[TableKind, ...]]]:
    """The chunks still to copy, each with the Delta tables that still lack it (in order)."""
    out: list[tuple[ChunkRange, tuple[TableKind, ...]]] = []
    for chunk in plan.chunks:
        name = plan.name(chunk)
        missing = tuple(kind for kind, done in finished.items() if name not in done)
        if missing:
            out.append((chunk, missing))
    return out


def partial_chunks(
    plan: SnapshotPlan, finished: Mapping[TableKind, Mapping[str, int]]
) -> dict[tuple[TableKind, int], dict[str, ChunkRange]]:
    """Chunks committed to some of the Delta tables but not to all (the process died between
    a chunk's commits), grouped by (Delta table lacking them, point they were copied under)."""
    out: dict[tuple[TableKind, int], dict[str, ChunkRange]] = {}
    for chunk in plan.chunks:
        name = plan.name(chunk)
        points = {done[name] for done in finished.values() if name in done}
        if not points:
            continue
        point = min(points)
        for kind, done in finished.items():
            if name not in done:
                out.setdefault((kind, point), {})[name] = chunk
    return out


def seq_range(chunk: ChunkRange) -> tuple[int, int]:
    """The `_cdc_seq` range [lo, hi) of a chunk's append `R` rows."""
    return chunk.id << SEQ_BITS, (chunk.id + 1) << SEQ_BITS


@dataclass(slots=True)
class Meter:
    """Rows, rows/s and ETA of one snapshot run (`clock`: monotonic seconds)."""

    rows_total: int
    rows_before: int = 0  # rows of chunks finished by earlier runs
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    copied: int = 0

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def rows_done(self) -> int:
        return self.rows_before + self.copied

    def rate(self) -> float | None:
        elapsed = self.clock() - self.started
        return self.copied / elapsed if elapsed > 0 and self.copied else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        if rate is None:
            return None
        return max(0.0, (self.rows_total - self.rows_done) / rate)


# ---- orchestration ------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class SnapshotOutcome:
    finished: bool  # False: stopped before every chunk was in (nothing marked loaded)
    version: int | None = None  # min over the Delta tables' app id versions once finished
    rows_copied: int = 0  # by this run
    rows_total: int = 0
    chunks_total: int = 0
    chunks_copied: int = 0  # by this run
    resumed: bool = False
    masked: dict[str, int] = field(default_factory=dict)
    key: tuple[str, ...] = ()  # the columns rows are keyed by (declared or the table's key)


def snapshot_table(
    adapter: SourceAdapter,
    source: SourceConfig,
    table: TableConfig,
    sink: SnapshotSink,
    store: StateStore,
    *,
    stop: threading.Event | None = None,
    workers: int | None = None,
    chunk_rows: int | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> SnapshotOutcome:
    """Load (or finish loading) one table's snapshot into its Delta tables; see the module doc.

    Returns unfinished only when `stop` was set (the chunks committed so far stay; the next
    call resumes them where that is exact)."""
    stop = stop or threading.Event()
    ref = table.ref
    kinds = [k for k in kinds_for(table.mode) if sink.applied_version(ref, k) is None]
    if not kinds:
        return SnapshotOutcome(finished=True, version=sink.resume_version(ref, table.mode))
    workers = workers or source.snapshot_workers
    chunk_rows = chunk_rows or source.snapshot_chunk_rows
    with contextlib.ExitStack() as session:
        try:
            snap = session.enter_context(adapter.snapshot(source, table, stop=stop))
        except SnapshotStopped:  # stopped while running transactions held its start up
            return SnapshotOutcome(finished=False)
        point = snap.consistent_point
        layout = snap.layout()
        plan, finished, why = _resume(adapter, source, sink, table, kinds, layout)
        resumed = plan is not None
        if plan is None:
            plan = SnapshotPlan(attempt=point, layout=layout, chunks=tuple(snap.plan(chunk_rows)))
            empty = snap.empty()
            for kind in kinds:
                sink.begin_snapshot(ref, kind, empty=empty, key=snap.key, plan=plan.to_json(),
                                    attempt=point)
            finished = {kind: {} for kind in kinds}
        todo = remaining_chunks(plan, finished)
        before = _record_plan(store, source.name, table.name, plan, todo, finished)
        log.info("snapshot_resumed" if resumed else "snapshot_planned", source=source.name,
                 table=table.name, lsn=format_lsn(point), attempt=format_lsn(plan.attempt),
                 chunks=len(plan.chunks), chunks_remaining=len(todo), chunk_key=layout.chunk_key,
                 leaves=len(layout.leaves), workers=workers,
                 **({} if resumed else {"restart_reason": why}))
        rows_total = sum(c.estimated_rows for c in plan.chunks)
        meter = Meter(rows_total=max(rows_total, before), rows_before=before)
        run = _ChunkRun(snap, sink, store, source, table, plan, point, meter, stop,
                        progress_every_s, resumed)
        copied = run.copy(todo, workers)
        outcome = SnapshotOutcome(finished=False, rows_copied=meter.copied,
                                  rows_total=meter.rows_done, chunks_total=len(plan.chunks),
                                  chunks_copied=copied, resumed=resumed, masked=dict(snap.masked),
                                  key=tuple(snap.key))
        if copied < len(todo):
            run.report(finished=False)
            return outcome
        # every chunk is in: each Delta table's app id at its earliest chunk's point
        names = [plan.name(c) for c in plan.chunks]
        versions: dict[TableKind, int] = {}
        for kind in kinds:
            done = sink.snapshot_chunk_versions(ref, kind, names)
            if len(done) != len(names):
                raise CDCError(f"{ref}: {len(names) - len(done)} snapshot chunk(s) missing from "
                               f"the {kind} Delta table after copying", reason=Reason.UNKNOWN)
            versions[kind] = min(done.values())
        for kind in kinds:
            sink.finish_snapshot(ref, kind, version=versions[kind])
        meter.rows_total = meter.rows_done
        run.report(finished=True)
        outcome.finished = True
        outcome.version = min(versions.values())
        outcome.rows_total = meter.rows_done
        return outcome


def _resume(
    adapter: SourceAdapter, source: SourceConfig, sink: SnapshotSink, table: TableConfig,
    kinds: Sequence[TableKind], layout: SnapshotLayout,
) -> tuple[SnapshotPlan | None, dict[TableKind, dict[str, int]], str]:
    stored = {kind: sink.snapshot_plan(table.ref, kind) for kind in kinds}
    if all(text is None and marker is None for text, marker in stored.values()):
        return None, {}, "first snapshot"
    plan, why = resumable_plan(stored, layout)
    if plan is None:
        return None, {}, why
    names = [plan.name(c) for c in plan.chunks]
    finished = {kind: sink.snapshot_chunk_versions(table.ref, kind, names) for kind in kinds}
    points = [v for done in finished.values() for v in done.values()]
    if points:
        confirmed = _slot_confirmed(adapter, source)
        if confirmed is not None and min(points) < confirmed:
            return None, {}, (f"the slot is confirmed at {format_lsn(confirmed)}, past the "
                              f"earliest finished chunk ({format_lsn(min(points))})")
    for (into, point), chunks in partial_chunks(plan, finished).items():
        rows = sink.mirror_snapshot_chunks(
            table.ref, into, chunks={name: seq_range(c) for name, c in chunks.items()},
            version=point, key=plan.layout.key)
        finished[into].update(dict.fromkeys(chunks, point))
        log.info("snapshot_chunks_mirrored", source=source.name, table=table.name,
                 into=str(into), chunks=sorted(c.id for c in chunks.values()), rows=rows,
                 lsn=format_lsn(point))
    return plan, finished, why


def _slot_confirmed(adapter: SourceAdapter, source: SourceConfig) -> int | None:
    info = adapter.slot_status(source)
    if not info.exists or not info.confirmed_flush_lsn:
        return None
    return parse_lsn(info.confirmed_flush_lsn)


def _record_plan(
    store: StateStore, source: str, table: str, plan: SnapshotPlan,
    todo: Sequence[tuple[ChunkRange, tuple[TableKind, ...]]],
    finished: Mapping[TableKind, Mapping[str, int]],
) -> int:
    """Chunk records for display; returns the rows of chunks finished by earlier runs (as the
    store counted them for this attempt, else the plan's estimate)."""
    previous = {c.chunk_id: c for c in store.list_snapshot_chunks(source, table)
                if c.attempt == plan.attempt}
    remaining = {chunk.id for chunk, _ in todo}
    records: list[SnapshotChunkRecord] = []
    before = 0
    for chunk in plan.chunks:
        if chunk.id in remaining:
            records.append(SnapshotChunkRecord(
                chunk_id=chunk.id, attempt=plan.attempt, leaf=chunk.leaf, lo=chunk.lo,
                hi=chunk.hi, estimated_rows=chunk.estimated_rows, state=ChunkState.PLANNED))
            continue
        prev = previous.get(chunk.id)
        rows = prev.rows if prev is not None and prev.state is ChunkState.FINISHED \
            else chunk.estimated_rows
        lsn = min(done[plan.name(chunk)] for done in finished.values())
        before += rows
        records.append(SnapshotChunkRecord(
            chunk_id=chunk.id, attempt=plan.attempt, leaf=chunk.leaf, lo=chunk.lo, hi=chunk.hi,
            estimated_rows=chunk.estimated_rows, state=ChunkState.FINISHED, rows=rows, lsn=lsn))
    store.record_snapshot_plan(source, table, records)
    return before


#: A chunk whose rows take at most this many Arrow bytes is read whole and handed to the
#: worker's writer thread, so its next chunk is read while it is written (at most one held,
#: one queued and one being read per worker: 3 × 32 MB); a larger chunk is written as read.
HOLD_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Held:
    chunk: ChunkRange
    kinds: tuple[TableKind, ...]
    pieces: list[pa.Table]


def _put(q: queue.Queue[_Held | None], item: _Held | None, abort: threading.Event) -> bool:
    """Put, unless the snapshot is aborted meanwhile (the writer may be gone): False then."""
    while True:
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            if abort.is_set():
                return False


def _chain(first: list[pa.Table], rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield from first
    first.clear()  # handed on: not held twice
    yield from rest


class _ChunkRun:
    """Copies the missing chunks with `workers` threads; the calling thread alone talks to the
    state store, logs progress and hits the `snapshot_chunk_committed` failpoint."""

    def __init__(self, snap: SnapshotSession, sink: SnapshotSink, store: StateStore,
                 source: SourceConfig, table: TableConfig, plan: SnapshotPlan, point: int,
                 meter: Meter, stop: threading.Event, every_s: float, resumed: bool) -> None:
        self.snap, self.sink, self.store = snap, sink, store
        self.source, self.table, self.plan, self.point = source, table, plan, point
        self.meter, self.stop, self.every_s, self.resumed = meter, stop, every_s, resumed
        self.chunks_done = len(plan.chunks)
        self.started_at = datetime.now(UTC)
        self._live: list[int] = []
        self._writing: list[int] = []

    def copy(self, todo: Sequence[tuple[ChunkRange, tuple[TableKind, ...]]], workers: int) -> int:
        """Copy `todo`; returns how many chunks were committed (all unless stopped)."""
        self.chunks_done = len(self.plan.chunks) - len(todo)
        if not todo:
            return 0
        n = self.snap.open_workers(max(1, min(workers, len(todo))))
        work: queue.Queue[tuple[ChunkRange, tuple[TableKind, ...]]] = queue.Queue()
        for item in todo:
            work.put(item)
        events: queue.Queue[tuple[str, ChunkRange | None, int, BaseException | None]] = \
            queue.Queue()
        abort = threading.Event()
        self._live = [0] * n  # rows read and not handed over, per worker
        self._writing = [0] * n  # rows its writer thread is writing
        threads = [threading.Thread(target=self._worker, args=(i, work, events, abort),
                                    name=f"snapshot-worker-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        copied = 0
        error: BaseException | None = None
        reported = time.monotonic()
        try:
            while any(t.is_alive() for t in threads) or not events.empty():
                try:
                    kind, chunk, rows, exc = events.get(timeout=min(0.5, self.every_s))
                except queue.Empty:
                    kind, chunk, rows, exc = "", None, 0, None
                if kind == "error" and error is None:
                    error = exc
                elif kind == "start" and chunk is not None:
                    self.store.update_snapshot_chunk(self.source.name, self.table.name, chunk.id,
                                                     state=ChunkState.COPYING, rows=0)
                elif kind == "done" and chunk is not None:
                    copied += 1
                    self.chunks_done += 1
                    self.meter.copied += rows
                    self.store.update_snapshot_chunk(self.source.name, self.table.name, chunk.id,
                                                     state=ChunkState.FINISHED, rows=rows,
                                                     lsn=self.point)
                    log.info("snapshot_chunk_committed", source=self.source.name,
                             table=self.table.name, chunk=chunk.id, leaf=chunk.leaf, rows=rows,
                             lsn=format_lsn(self.point))
                    failpoints.hit("snapshot_chunk_committed")
                if time.monotonic() - reported >= self.every_s:
                    self.report(finished=False)
                    reported = time.monotonic()
        except BaseException:
            abort.set()
            raise
        finally:
            for t in threads:
                t.join()
        if error is not None:
            if isinstance(error, CDCError):
                raise error
            raise CDCError(f"snapshot of {self.table.name} failed: {type(error).__name__}: "
                           f"{error}", reason=Reason.UNKNOWN) from error
        return copied

    def _worker(self, i: int, work: queue.Queue[tuple[ChunkRange, tuple[TableKind, ...]]],
                events: queue.Queue[tuple[str, ChunkRange | None, int, BaseException | None]],
                abort: threading.Event) -> None:
        """Read chunks on connection `i`; a chunk that fits in `HOLD_BYTES` is handed to this
        worker's writer thread, and the next chunk's COPY starts while it is written — so the
        server is not idle while a chunk's Parquet is written and committed (with two workers
        reading, then writing, in step, it was). A larger chunk is written here, streaming, as
        it is read (bounded memory: the sink spools it)."""
        handoff: queue.Queue[_Held | None] = queue.Queue(maxsize=1)
        writer = threading.Thread(target=self._writer, args=(i, handoff, events, abort),
                                  name=f"snapshot-writer-{i}", daemon=True)
        writer.start()
        try:
            while not abort.is_set() and not self.stop.is_set():
                try:
                    chunk, kinds = work.get_nowait()
                except queue.Empty:
                    return
                events.put(("start", chunk, 0, None))
                failure: list[BaseException] = []
                pieces = self._pieces(i, chunk, abort, failure)
                held: list[pa.Table] = []
                try:
                    size = 0
                    for piece in pieces:
                        held.append(piece)
                        size += piece.nbytes
                        if size > HOLD_BYTES:
                            break
                    else:  # read whole: written by the writer while the next one is read
                        if not _put(handoff, _Held(chunk, kinds, held), abort):
                            return
                        self._live[i] -= sum(t.num_rows for t in held)
                        continue
                    rows = self._write(chunk, kinds, _chain(held, pieces))
                except BaseException as exc:  # noqa: BLE001 - handed to the coordinating thread
                    abort.set()
                    events.put(("error", chunk, 0, failure[0] if failure else exc))
                    return
                self._live[i] = 0
                events.put(("done", chunk, rows, None))
        finally:
            _put(handoff, None, abort)
            writer.join()

    def _pieces(self, i: int, chunk: ChunkRange, abort: threading.Event,
                failure: list[BaseException]) -> Iterator[pa.Table]:
        try:
            for piece in self.snap.copy_chunk(chunk, worker=i):
                if abort.is_set():
                    raise RuntimeError("snapshot aborted")
                self._live[i] += piece.num_rows
                yield piece
        except BaseException as exc:
            failure.append(exc)
            raise

    def _writer(self, i: int, handoff: queue.Queue[_Held | None],
                events: queue.Queue[tuple[str, ChunkRange | None, int, BaseException | None]],
                abort: threading.Event) -> None:
        while True:
            try:
                item = handoff.get(timeout=0.2)
            except queue.Empty:
                if abort.is_set():
                    return
                continue
            if item is None:
                return
            if abort.is_set() or self.stop.is_set():
                continue  # not written (a stop ends the copy promptly): its chunk stays missing
            rows = sum(t.num_rows for t in item.pieces)
            self._writing[i] = rows
            try:
                written = self._write(item.chunk, item.kinds, iter(item.pieces))
            except BaseException as exc:  # noqa: BLE001 - handed to the coordinating thread
                abort.set()
                events.put(("error", item.chunk, 0, exc))
                return
            finally:
                self._writing[i] = 0
            events.put(("done", item.chunk, written, None))

    def _write(self, chunk: ChunkRange, kinds: tuple[TableKind, ...],
               pieces: Iterator[pa.Table]) -> int:
        return self.sink.write_snapshot_chunk(
            self.table.ref, kinds, pieces, chunk=self.plan.name(chunk),
            seq_base=seq_range(chunk)[0], version=self.point,
            committed_at_us=int(time.time() * 1_000_000))

    def report(self, *, finished: bool) -> None:
        m = self.meter
        live = sum(self._live) + sum(self._writing)
        rows_done = m.rows_done + live
        rate = m.rate()
        if rate is not None and live:
            rate = (m.copied + live) / max(1e-9, time.monotonic() - m.started)
        eta = None if finished or rate is None else max(0.0, (m.rows_total - rows_done) / rate)
        total = max(m.rows_total, rows_done)
        progress = SnapshotProgress(
            attempt=self.plan.attempt, resumed=self.resumed, chunks_total=len(self.plan.chunks),
            chunks_done=self.chunks_done, rows_total=total, rows_done=rows_done,
            rows_copied=m.copied + live, rows_per_s=None if rate is None else round(rate, 1),
            eta_s=0.0 if finished else (None if eta is None else round(eta, 1)),
            finished=finished, started_at=self.started_at, updated_at=datetime.now(UTC))
        self.store.set_snapshot_progress(self.source.name, self.table.name, progress)
        log.info("snapshot_progress", source=self.source.name, table=self.table.name,
                 rows=rows_done, rows_total=total, rows_per_s=progress.rows_per_s,
                 eta_s=progress.eta_s, chunks_done=self.chunks_done,
                 chunks_total=len(self.plan.chunks), finished=finished)

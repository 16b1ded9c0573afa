"""The daemon's watchdog (issue 12, defect 4): a source that cannot make progress says so.

A hang is otherwise silent: a deltalake call that never returns, a COPY that stops, a deadlock
between threads leave the log quiet and `status` saying `streaming`. So each source's pipeline
reports what it has pending on an `Activity` (cheap attribute stores on its own threads), and
one watchdog thread per daemon judges every source each tick:

- **pending**: the stream holds work not yet durable (rows of an open or closed transaction in
  the batcher, a batch queued or being committed by the writer), or a table snapshot runs;
- **progress**: something became durable — a Delta commit of the writer, a batch confirmed, a
  snapshot chunk committed or snapshot rows copied (read from the store's snapshot progress,
  which the snapshot reports every couple of seconds);
- work a failed run left undone stays pending across the reconnect (`Activity.interrupted`):
  a source that fails and retries on the same changes again and again, making nothing durable,
  is stalled too. It stops counting once something becomes durable, or once the new run has
  reported nothing pending for a whole timeout (then there was nothing left to redo);
- a lane (the stream, the snapshot) pending with no progress for the source's `stall_timeout_s`
  is **stuck**, and the source is **stalled** while any lane is. An idle source (nothing
  received) is never stalled, however long it waits; a long commit or snapshot that keeps
  committing is not either. One blocking call longer than the timeout is a stall.

Last resort: a thread blocked in native code while holding the GIL (issue 12's deltalake
deadlock) stops every Python thread, this one included. The daemon's watchdog therefore also
keeps CPython's `faulthandler` timer re-armed on every tick (`LastResort`); when the watchdog
cannot run for `last_resort_s`, faulthandler's own C thread (no GIL needed) writes every
thread's stack to stderr.

A stall is recorded in the state store (`StateStore.set_stalled`, beside the state, so an
out-of-process `cdcengine status` and the daemon's `/health` both see it), logged once as
`source_stalled` with the stack of every thread, and shown by the gauge
`cdcengine_source_stalled`. It is cleared (`source_unstalled`, gauge 0) as soon as progress
resumes or the lane has nothing pending any more. The judgement itself (`StallJudge`) is pure.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from cdcengine.config import SourceConfig
from cdcengine.errors import classify_error
from cdcengine.pipeline.activity import Activity, Lane
from cdcengine.serve.background import BackgroundLoop
from cdcengine.state.access import open_store
from cdcengine.state.base import (
    STALL_REFRESH_S,
    Stall,
    StateStore,
    StuckWork,
    ThreadInfo,
    live_stall,
)

log = structlog.get_logger("cdcengine.serve.watchdog")

MAX_TICK_S = 5.0
FAILING_RUNS = 3  # runs in a row that failed on the same pending work: stalled without waiting
REFRESH_S = STALL_REFRESH_S  # a lasting stall's record (and thread picture) is renewed
HOST = socket.gethostname()
STACK_DEPTH = 16  # frames per thread kept in the store (the log gets every frame)


# ---- the pure judgement ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reading:
    """One lane at one tick: pending or not, and a mark that changes when progress is made.
    `carried`: pending only because a failed run left work undone (the lane itself reports
    nothing pending now)."""

    lane: str
    pending: bool
    mark: object
    what: str = ""
    carried: bool = False
    # the same pending work failed again and again (FAILING_RUNS runs in a row): no need to
    # wait out the timeout to know nothing moves -- the destination refusing every write says
    # so at once, by name
    failing: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    stalled: bool
    changed: bool  # it became stalled, or stopped being stalled, at this tick
    since: float | None  # monotonic: the start of the oldest stuck stretch
    stuck: tuple[tuple[Reading, float], ...] = ()  # the stuck lanes and how long each waited
    # lanes whose carried work is dropped: quiet for a whole timeout, nothing was left to redo
    settled: tuple[str, ...] = ()


@dataclass(slots=True)
class _Clock:
    since: float | None = None  # the current stretch of "pending, no progress" began
    mark: object = None
    quiet_since: float | None = None  # carried work only, the lane itself idle, since


@dataclass(slots=True)
class StallJudge:
    """Per source: stalled while any lane has been pending without progress for `timeout_s`.

    A stretch starts when a lane is first seen pending and starts again whenever its mark
    moves; a lane seen not pending has no stretch."""

    timeout_s: float
    stalled: bool = False
    _clocks: dict[str, _Clock] = field(default_factory=dict)

    def step(self, now: float, readings: Sequence[Reading]) -> Verdict:
        stuck: list[tuple[Reading, float]] = []
        settled: list[str] = []
        since: float | None = None
        for r in readings:
            clock = self._clocks.setdefault(r.lane, _Clock())
            if r.pending and r.carried:
                if clock.quiet_since is None:
                    clock.quiet_since = now
                if now - clock.quiet_since >= self.timeout_s:
                    settled.append(r.lane)
                    r = Reading(lane=r.lane, pending=False, mark=r.mark, what=r.what)
            else:
                clock.quiet_since = None
            if not r.pending:
                clock.since, clock.mark = None, r.mark
                continue
            if clock.since is None or r.mark != clock.mark:
                clock.since, clock.mark = now, r.mark
            waited = now - clock.since
            if waited >= self.timeout_s or r.failing:
                stuck.append((r, waited))
                since = clock.since if since is None else min(since, clock.since)
        was, self.stalled = self.stalled, bool(stuck)
        return Verdict(stalled=self.stalled, changed=was != self.stalled, since=since,
                       stuck=tuple(stuck), settled=tuple(settled))


# ---- thread pictures -------------------------------------------------------------------------
def thread_stacks(belongs: Callable[[str], bool] | None = None,
                  depth: int | None = None) -> list[ThreadInfo]:
    """Every live Python thread (or those whose name `belongs`), innermost frame as `doing`."""
    frames = sys._current_frames()  # the documented way to see other threads' frames
    out: list[ThreadInfo] = []
    for t in threading.enumerate():
        if belongs is not None and not belongs(t.name):
            continue
        frame = frames.get(t.ident or -1)
        if frame is None:
            continue
        summary = traceback.extract_stack(frame)
        if depth is not None:
            summary = summary[-depth:]
        stack = tuple(f"{f.filename}:{f.lineno} in {f.name}" for f in summary)
        doing = (f"{summary[-1].name} ({os.path.basename(summary[-1].filename)}:"
                 f"{summary[-1].lineno})") if summary else "?"
        out.append(ThreadInfo(name=t.name, doing=doing, stack=stack))
    return out


def source_thread(source: str, name: str, *, snapshotting: bool) -> bool:
    """Is thread `name` one of `source`'s: its reading thread (`source-<name>`), its writer,
    its backfill — and, while it snapshots, the snapshot workers (their names carry no source)."""
    prefix, _, owner = name.rpartition("-")
    if owner == source and prefix in ("source", "writer", "backfill"):
        return True
    return snapshotting and name.startswith("snapshot-worker-")


class LastResort:
    """`faulthandler.dump_traceback_later`, re-armed by `beat()`: if nothing beats for
    `after_s` (the GIL is held by a blocked native call, or the watchdog itself hangs), every
    thread's Python stack goes to stderr, written without the GIL. Process-wide (faulthandler
    has one such timer), so only the daemon arms it."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._on = False

    def beat(self) -> None:
        try:
            # faulthandler writes to a file descriptor: the real stderr, not a replacement
            faulthandler.dump_traceback_later(self.after_s, repeat=False, exit=False,
                                              file=sys.__stderr__ or sys.stderr)
            self._on = True
        except (AttributeError, OSError, ValueError, RuntimeError):
            self._on = False  # no usable stderr (an embedding host): the watchdog still works

    def cancel(self) -> None:
        if self._on:
            faulthandler.cancel_dump_traceback_later()
            self._on = False


# ---- the thread ------------------------------------------------------------------------------
class StallMetrics(Protocol):
    def set_stalled(self, source: str, stalled: bool) -> None: ...


@dataclass(slots=True)
class _Watched:
    source: SourceConfig
    activity: Activity
    judge: StallJudge
    recorded: float = 0.0  # monotonic: when the stall was last written to the store
    stall: Stall | None = None


class Watchdog(BackgroundLoop):
    """One thread judging every source of a daemon; see the module docstring."""

    thread_name = "watchdog"

    def __init__(self, sources: Sequence[SourceConfig], state: str, stop: threading.Event, *,
                 activities: Mapping[str, Activity], metrics: StallMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 last_resort_s: float | None = None) -> None:
        self.state, self.stop, self.metrics, self._clock = state, stop, metrics, clock
        self._last_resort = LastResort(last_resort_s) if last_resort_s else None
        self._watched = [_Watched(s, activities[s.name], StallJudge(s.stall_timeout_s))
                         for s in sources if s.name in activities]
        shortest = min((s.stall_timeout_s for s in sources), default=MAX_TICK_S)
        # a quarter of the shortest timeout: a stall shows within 1.25 timeouts
        self.tick_s = max(0.2, min(MAX_TICK_S, shortest / 4))

    def run(self) -> None:
        try:
            self._beat()
            # a stall recorded by an earlier daemon of this host that is gone is not ours
            self.clear_all()
            while not self.stop.wait(self.tick_s):
                self._beat()
                try:
                    with open_store(self.state) as store:
                        while not self.stop.is_set():
                            self._beat()
                            for w in self._watched:
                                self._check_one(store, w)
                            self.stop.wait(self.tick_s)
                except Exception as exc:  # noqa: BLE001 - it must outlive a store outage
                    log.warning("watchdog_store_failed", reason=str(classify_error(exc).reason))
        finally:
            if self._last_resort is not None:
                self._last_resort.cancel()

    def _beat(self) -> None:
        if self._last_resort is not None:
            self._last_resort.beat()

    def clear_all(self) -> None:
        """No source of this daemon is stalled (at start, and after a clean stop). A stall
        another live daemon recorded stays: with a shared state store a standby daemon's start
        must not hide the active one's stall."""
        try:
            with open_store(self.state) as store:
                for w in self._watched:
                    rec = store.get_source(w.source.name)
                    stall = rec.stalled if rec is not None else None
                    own = stall is not None and stall.pid == os.getpid() and stall.host == HOST
                    if stall is not None and (own or live_stall(rec) is None):
                        store.clear_stalled(w.source.name)
                    w.stall = None
                    self._gauge(w.source.name, False)
        except Exception as exc:  # noqa: BLE001 - display state only; the next tick retries
            log.warning("watchdog_store_failed", reason=str(classify_error(exc).reason))

    def _check_one(self, store: StateStore, w: _Watched) -> None:
        try:
            self.check(store, w)
        except Exception as exc:  # noqa: BLE001 - one source's failure never blinds the others
            err = classify_error(exc)
            log.warning("watchdog_check_failed", source=w.source.name, reason=str(err.reason),
                        message=err.message)

    def check(self, store: StateStore, w: _Watched) -> Verdict:
        readings = [self._reading(store, w.source.name, lane) for lane in w.activity.lanes()]
        now = self._clock()
        verdict = w.judge.step(now, readings)
        name = w.source.name
        for lane in w.activity.lanes():
            if lane.name in verdict.settled:
                lane.undone = None
        if verdict.stalled:
            # renewed at least every REFRESH_S (other hosts read an old record as stale), and
            # with a short timeout as often, so the thread picture stays current
            if verdict.changed or now - w.recorded >= min(REFRESH_S, w.judge.timeout_s):
                self._record(store, w, verdict, now, first=verdict.changed)
        elif w.stall is not None:  # progress again (or the store still holds our old record)
            if verdict.changed:
                stalled_for = (datetime.now(UTC) - w.stall.since).total_seconds()
                self._gauge(name, False)
                log.info("source_unstalled", source=name, stalled_s=round(stalled_for, 1))
            store.clear_stalled(name)
            w.stall = None
        return verdict

    def _reading(self, store: StateStore, source: str, lane: Lane) -> Reading:
        detail = dict(lane.detail)
        mark: object = lane.moves
        if lane.name == "snapshot" and lane.pending and isinstance(detail.get("table"), str):
            # snapshot workers report progress to the store (every couple of seconds): rows
            # copied and chunks committed are its progress
            progress = store.get_snapshot_progress(source, str(detail["table"]))
            if progress is not None:
                mark = (lane.moves, progress.attempt, progress.rows_done, progress.chunks_done,
                        progress.finished)
        undone = lane.undone
        if undone is not None:
            detail["retrying"] = undone
        return Reading(lane=lane.name, pending=lane.pending or undone is not None, mark=mark,
                       what=_what(lane.name, detail),
                       carried=undone is not None and not lane.pending,
                       failing=undone is not None and lane.failures >= FAILING_RUNS)

    def _record(self, store: StateStore, w: _Watched, verdict: Verdict, now: float, *,
                first: bool) -> None:
        name = w.source.name
        snapshotting = any(r.lane == "snapshot" for r, _ in verdict.stuck)
        belongs: Callable[[str], bool] = lambda t: source_thread(  # noqa: E731
            name, t, snapshotting=snapshotting)
        waited = max(s for _, s in verdict.stuck)
        since = datetime.now(UTC) - timedelta(seconds=waited)
        work = tuple(StuckWork(lane=r.lane, what=r.what, waited_s=round(s, 1))
                     for r, s in verdict.stuck)
        own = thread_stacks(belongs, depth=STACK_DEPTH)
        message = (f"nothing became durable for {waited:.0f} s (stall_timeout_s = "
                   f"{w.source.stall_timeout_s}) while "
                   + "; ".join(f"{x.lane}: {x.what}" for x in work))
        w.stall = Stall(since=w.stall.since if w.stall else since, at=datetime.now(UTC),
                        message=message, work=work, threads=tuple(own),
                        host=HOST, pid=os.getpid())
        w.recorded = now
        self._gauge(name, True)
        if first:
            # the whole picture, once: a deadlock may involve another source's threads
            everyone = thread_stacks()
            log.error("source_stalled", source=name, stalled_s=round(waited, 1),
                      stall_timeout_s=w.source.stall_timeout_s, message=message,
                      work=[{"lane": x.lane, "what": x.what, "waited_s": x.waited_s}
                            for x in work],
                      threads=[_dump(t) for t in everyone if belongs(t.name)],
                      other_threads=[_dump(t) for t in everyone if not belongs(t.name)],
                      fix="the stacks show where each thread waits; restarting the daemon "
                          "resumes from the last durable position")
        # logged first: the store may be what hangs, and a hang is never silent
        store.set_stalled(name, w.stall)

    def _gauge(self, source: str, stalled: bool) -> None:
        if self.metrics is not None:
            self.metrics.set_stalled(source, stalled)


def _what(lane: str, detail: Mapping[str, object]) -> str:
    if lane == "snapshot":
        return f"snapshot of {detail.get('table', '?')} running"
    parts = []
    batches = detail.get("batches_in_flight")
    if isinstance(batches, int) and batches:
        parts.append(f"{batches} batch(es) at the Delta writer")
    rows = detail.get("rows_buffered")
    if isinstance(rows, int) and rows:
        parts.append(f"{rows} row(s) buffered")
    if detail.get("open_transaction"):
        parts.append("a source transaction being received")
    if detail.get("retrying"):
        parts.append(f"the run making them durable failed ({detail['retrying']}) and is retried")
    return ", ".join(parts) or "changes pending"


def _dump(t: ThreadInfo) -> dict[str, object]:
    return {"name": t.name, "doing": t.doing, "stack": list(t.stack)}


__all__ = ["Activity", "Lane", "LastResort", "Reading", "StallJudge", "Verdict", "Watchdog",
           "source_thread", "thread_stacks"]

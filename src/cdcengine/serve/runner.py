"""One source inside the daemon: its pipeline, reconnects, standby, and waiting for an operator.

- A retryable error (connection lost, slot briefly in use, destination hiccup) reconnects with
  exponential backoff and resumes from the last durable position.
- Another process holding the source's lease (a second daemon sharing the config): this one
  stands by and takes over when the lease is released or expires — never two streams at once.
- A failure that left a `broken` or `paused` marker (slot lost, auth, permission …): the
  runner waits, and streams again by itself once `repair` / `resume` cleared the marker.
- Any other non-retryable failure (not enabled, invalid config) ends the runner.

The monitor stops a runner's stream before an auto-drop (`halt`) and lets it go on (`release`)
once the source is marked broken, so it cannot reconnect to a slot that is about to go.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, LeaseHeld, Reason, classify_error, reason_of
from cdcengine.pipeline.activity import Activity
from cdcengine.pipeline.pipeline import Pipeline
from cdcengine.state.access import open_store
from cdcengine.state.base import Marker, SourceRecord

log = structlog.get_logger("cdcengine.serve.daemon")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0
#: A session that streamed this long (or made a batch durable) was a good one: the next
#: failure is a fresh incident and its backoff starts from `BACKOFF_START_S` again.
GOOD_SESSION_S = 10.0
MARKER_POLL_S = 2.0  # how often a runner waiting for repair/resume looks again
STANDBY_POLL_S = 5.0  # how often a standby runner tries to take the lease


class ErrorMetrics(Protocol):
    def count_error(self, source: str, reason: str) -> None: ...


@dataclass(slots=True)
class SourceOutcome:
    name: str
    error: CDCError | None = None  # the failure the source is in now (None: running fine)
    failed_at: datetime | None = None  # when `error` stopped the source (for /health)
    restarts: int = 0
    waiting: str | None = None  # "repair" / "resume" while a marker asks for an operator


class SourceRunner:
    def __init__(self, source: SourceConfig, state: str, stop: threading.Event, *,
                 metrics: object | None = None) -> None:
        self.source, self.state, self.stop = source, state, stop
        self.metrics = metrics
        self.outcome = SourceOutcome(name=source.name)
        # what the pipeline has pending, for the daemon's watchdog; kept across reconnects
        self.activity = Activity()
        self._lock = threading.Lock()
        self._session = threading.Event()  # stops the current pipeline run
        self._pipeline: Pipeline | None = None
        self._halted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._in_standby = False
        self._last_session_good = False
        self._resume_lsn = 0  # the flush position the last run confirmed (see Pipeline)
        # set while this daemon's monitor holds the source's lease for a pass
        self.monitor_pass = threading.Event()
        # until the first pipeline run has tried to take the lease: the monitor's first pass
        # only reads meanwhile, instead of taking the lease and making the start wait for it
        # (building the first pipeline imports the adapter: the monitor's thread was often
        # first, and every start lost its health check's round trips plus a standby poll)
        self._launching = True

    # ---- for the monitor ----------------------------------------------------------------------
    def holds_lease(self) -> bool:
        p = self._pipeline
        return p is not None and p.holding.is_set()

    def starting(self) -> bool:
        """A pipeline run began (or the first one is about to) and will take the lease."""
        if self._launching:
            return True
        p = self._pipeline
        return p is not None and not p.holding.is_set()

    def halt(self, timeout_s: float = 120.0) -> bool:
        """Stop the running pipeline (it finishes its Delta commit) and start none until
        `release`; True when no pipeline runs any more."""
        with self._lock:
            self._halted.set()
            self._session.set()
        return self._idle.wait(timeout_s)

    def release(self) -> None:
        self._halted.clear()

    def wake(self) -> None:
        """The daemon stops: end the current pipeline run (after its commit)."""
        with self._lock:
            self._session.set()

    # ---- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        backoff = BACKOFF_START_S
        while not self.stop.is_set():
            if self._halted.is_set() or self._wait_for_operator():
                self._launching = False
                self.stop.wait(MARKER_POLL_S)
                continue
            try:
                self._run_pipeline()
                self._in_standby = False
                if not self._halted.is_set():
                    return  # a requested stop
            except Exception as exc:  # classified: retry, wait or give up
                self._launching = False
                err = classify_error(exc)
                if isinstance(err, LeaseHeld):
                    self._standby(err)
                    continue
                self._in_standby = False
                self._count(err)
                if self._last_session_good:
                    backoff = BACKOFF_START_S  # it streamed well: a fresh incident
                if not err.retryable:
                    # an operator's repair may re-create the slot: start where it says
                    self._resume_lsn = 0
                    self.outcome.error, self.outcome.failed_at = err, datetime.now(UTC)
                    log.error("source_stopped", source=self.source.name,
                              reason=str(err.reason), message=err.message, fix=err.fix)
                    if not self._marked():
                        return  # nothing an operator command would clear: give up
                    continue
                self.outcome.restarts += 1
                # what it had pending is still to do: the watchdog keeps counting across retries
                self.activity.interrupted(str(err.reason), err.message)
                unexpected = err.reason is Reason.UNKNOWN
                log.warning("source_reconnecting", source=self.source.name,
                            reason=str(err.reason), message=err.message, backoff_s=backoff,
                            error_type=type(exc).__name__ if unexpected else None,
                            exc_info=exc if unexpected else None)
                if self.stop.wait(backoff):
                    return
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _run_pipeline(self) -> None:
        with self._lock:
            if self.stop.is_set() or self._halted.is_set():
                return
            self._session = threading.Event()
            pipeline = Pipeline(self.source, state=self.state, metrics=self.metrics,  # type: ignore[arg-type]
                                resume_lsn=self._resume_lsn, activity=self.activity)
            self._pipeline = pipeline
            self._launching = False  # from here `starting` asks the pipeline
            self._idle.clear()
        try:
            pipeline.run(self._session)
        finally:
            self._last_session_good = pipeline.good_session(GOOD_SESSION_S)
            self._resume_lsn = pipeline.confirmed_lsn
            with self._lock:
                # tables `enable` added or removed while it ran: the next run starts with them
                self.source = pipeline.source
                self._pipeline = None
                self._idle.set()

    def _record(self) -> SourceRecord | None:
        with open_store(self.state) as store:
            return store.get_source(self.source.name)

    def _marked(self) -> bool:
        return needs_operator(self._record()) is not None

    def note_marker(self) -> None:
        """Record a marker set meanwhile (e.g. by the monitor) as this source's failure."""
        marker = needs_operator(self._record())
        if marker is not None and self.outcome.error is None:
            self.outcome.error = CDCError(marker.message, reason=reason_of(marker.reason),
                                          retryable=False)
            self.outcome.failed_at = marker.at

    def _wait_for_operator(self) -> bool:
        """True while a broken/paused marker asks for repair/resume; clears the failure once
        an operator lifted it, so the next pipeline run starts."""
        try:
            rec = self._record()
        except Exception as exc:  # noqa: BLE001 - the state store may be briefly unavailable
            log.warning("state_store_unavailable", source=self.source.name,
                        reason=str(classify_error(exc).reason))
            return True
        marker = needs_operator(rec)
        if marker is None:
            if self.outcome.waiting in ("repair", "resume"):
                log.info("source_released", source=self.source.name, was=self.outcome.waiting)
                self.outcome.error = self.outcome.failed_at = self.outcome.waiting = None
            return False
        waiting = "resume" if marker is (rec.paused if rec else None) else "repair"
        if self.outcome.waiting != waiting:
            self.outcome.waiting = waiting
            if self.outcome.error is None or self.outcome.error.reason != marker.reason:
                self.outcome.error = CDCError(marker.message, reason=reason_of(marker.reason),
                                              retryable=False)
                self.outcome.failed_at = marker.at
            log.warning("source_waiting", source=self.source.name, state=str(rec.state) if rec
                        else None, reason=marker.reason, message=marker.message,
                        fix=f"run `cdcengine {waiting} --source {self.source.name}`")
        return True

    def _standby(self, err: CDCError) -> None:
        if self.monitor_pass.is_set():  # our own monitor, for a moment
            self.stop.wait(0.2)
            return
        if not self._in_standby:
            log.info("source_standby", source=self.source.name, message=err.message)
            self._in_standby = True
        self.stop.wait(STANDBY_POLL_S)

    def _count(self, err: CDCError) -> None:
        count = getattr(self.metrics, "count_error", None)
        if count is not None:
            count(self.source.name, str(err.reason))


def needs_operator(rec: SourceRecord | None) -> Marker | None:
    """The marker that stops streaming until `repair` / `resume`; a self-managed source over
    its critical threshold is broken but keeps streaming (SPEC §7)."""
    if not (rec and rec.enabled):
        return None
    if rec.broken is not None and rec.broken.reason != Reason.CRITICAL_LAG_SELF_MANAGED:
        return rec.broken
    return rec.paused

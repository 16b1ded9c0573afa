"""Prometheus metrics of one daemon (SPEC §7 `/metrics`), names prefixed `cdcengine_`.

One `Metrics` per daemon, passed explicitly to whatever records into it (pipelines, their batch
writers, the slot-health monitor, the HTTP server): each instance owns its own
`CollectorRegistry`, so two daemons (or two tests) in one process never share a counter, and a
library user who never looks at metrics pays only for a few idle objects.

Every method is thread-safe (prometheus_client locks per metric): pipelines record from their
reading and writing threads, the monitor from its timer, the HTTP server renders from its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from cdcengine.state.base import SourceState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format `render()` produces (what `/metrics` answers with)."""

# A Delta commit is a MERGE or an append: tens of milliseconds on a local disk, seconds on an
# object store or after a large batch.
_COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
# End-to-end delays are bounded below by `flush_interval_ms` (default 1 s) and grow without
# bound while a destination is down or a snapshot runs: the upper buckets reach an hour.
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
                  3600.0)


class Metrics:
    """The daemon's metrics; `render()` is the `/metrics` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._slot_lag = Gauge(
            "cdcengine_slot_lag_bytes",
            "WAL between the server's current position and the slot's confirmed_flush_lsn.",
            ["source"], registry=r)
        self._slot_retained = Gauge(
            "cdcengine_slot_retained_wal_bytes",
            "WAL the slot keeps on the server's disk (current position - restart_lsn); the "
            "lag thresholds apply to it.", ["source"], registry=r)
        # prometheus_client names a counter's sample `<name>_total`
        self._rows = Counter(
            "cdcengine_rows_applied", "Change rows committed to Delta (a table in `both` mode "
            "counts each change once).", ["source", "table"], registry=r)
        self._bytes = Counter(
            "cdcengine_bytes_applied", "Approximate in-memory (Arrow) size of the change rows "
            "committed to Delta.", ["source", "table"], registry=r)
        self._commit = Histogram(
            "cdcengine_commit_latency_seconds", "Duration of one Delta commit (one table kind "
            "of one batch).", ["source"], buckets=_COMMIT_BUCKETS, registry=r)
        self._batch = Histogram(
            "cdcengine_batch_latency_seconds", "From a batch being handed to the writer to all "
            "its Delta commits being durable.", ["source"], buckets=_DELAY_BUCKETS, registry=r)
        self._to_delta = Histogram(
            "cdcengine_commit_to_delta_seconds", "From each source transaction's commit to "
            "all its changes being durable in Delta, one observation per transaction (clocks "
            "of the database and the engine host).", ["source"], buckets=_DELAY_BUCKETS,
            registry=r)
        self._state = Gauge(
            "cdcengine_source_state", "1 for the source's current state, 0 for the others.",
            ["source", "state"], registry=r)
        self._stalled = Gauge(
            "cdcengine_source_stalled", "1 while the daemon's watchdog finds the source unable "
            "to make progress: changes pending and nothing durable for stall_timeout_s.",
            ["source"], registry=r)
        self._auto_drops = Counter(
            "cdcengine_slot_auto_drops", "Slots dropped by the lag policy (critical retained "
            "WAL).", ["source"], registry=r)
        self._errors = Counter(
            "cdcengine_errors", "Errors that ended a pipeline run (retried or not), by stable "
            "reason code.", ["source", "reason"], registry=r)

    # ---- slot health (the monitor) ------------------------------------------------------------
    def observe_slot(self, source: str, *, lag_bytes: int | None,
                     retained_wal_bytes: int | None) -> None:
        """The slot's latest readings; None (no slot, never confirmed) removes the series, so a
        stale number never outlives the slot it described."""
        for gauge, value in ((self._slot_lag, lag_bytes),
                             (self._slot_retained, retained_wal_bytes)):
            if value is None:
                _remove(gauge, source)
            else:
                gauge.labels(source).set(value)

    def count_auto_drop(self, source: str) -> None:
        self._auto_drops.labels(source).inc()

    def set_source_state(self, source: str, state: str) -> None:
        """One series per known state, so a dashboard can alert on `state="broken" == 1`
        without knowing which states exist; an unknown state gets its own series."""
        current = str(state)
        for known in _states(current):
            self._state.labels(source, known).set(1 if known == current else 0)

    def set_stalled(self, source: str, stalled: bool) -> None:
        """The watchdog's verdict (`cdcengine.serve.watchdog`): 1 stalled, 0 not."""
        self._stalled.labels(source).set(1 if stalled else 0)

    def count_error(self, source: str, reason: str) -> None:
        self._errors.labels(source, str(reason)).inc()

    # ---- the write path (pipelines and their batch writers) -----------------------------------
    def count_applied(self, source: str, table: str, *, rows: int, nbytes: int) -> None:
        """Rows (and their approximate Arrow bytes) of `table` that became durable in Delta."""
        self._rows.labels(source, table).inc(rows)
        self._bytes.labels(source, table).inc(nbytes)

    def observe_commit(self, source: str, seconds: float) -> None:
        self._commit.labels(source).observe(max(seconds, 0.0))

    def observe_batch(self, source: str, *, seconds: float,
                      commit_to_delta_s: Sequence[float] = ()) -> None:
        """A batch became durable `seconds` after it was taken; each source transaction it made
        durable had committed `commit_to_delta_s[i]` before (one value per transaction, so the
        histogram is the commit-to-visible distribution of transactions, not of batches: a
        batch's newest transaction alone would hide how long its oldest waited). Clock skew
        between the database and this host can make a value negative: it is counted as 0."""
        self._batch.labels(source).observe(max(seconds, 0.0))
        to_delta = self._to_delta.labels(source)
        for delay in commit_to_delta_s:
            to_delta.observe(max(delay, 0.0))

    # ---- exposition ---------------------------------------------------------------------------
    def render(self) -> bytes:
        """Prometheus text exposition (`CONTENT_TYPE`) of every metric of this instance."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry without prometheus_client's `*_created` series: in the text format each is
    one more gauge per counter and histogram series, holding only a start timestamp. (Its own
    switch, `disable_created_metrics()`, is process-global.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            if family.samples or not family.name.endswith("_created"):
                yield family


def _states(current: str) -> Iterable[str]:
    known = [str(s) for s in SourceState]
    return known if current in known else [*known, current]


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set: nothing to remove
        gauge.remove(*labels)

"""The daemon's slot monitor (SPEC §7): the lag policy on its own timer, per source every
`lag_check_interval_s`, independent of the streaming threads — it keeps acting while a
destination is down or a stream is stuck, and for sources waiting for an operator.

Who acts for a source: while this daemon's runner streams it (its pipeline holds the lease),
the monitor acts for it and stops that stream before an auto-drop; otherwise the monitor takes
the lease for the pass; when another process holds it, the pass only reads (that process's
own monitor acts) and still feeds the metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import structlog

from cdcengine.config import SourceConfig
from cdcengine.control.health import HealthReport, SlotMetrics, check_source
from cdcengine.errors import LeaseHeld, classify_error
from cdcengine.serve.background import BackgroundLoop
from cdcengine.serve.runner import SourceRunner
from cdcengine.state.access import open_store
from cdcengine.state.base import StateStore

log = structlog.get_logger("cdcengine.serve.monitor")

TICK_S = 0.5
HALT_TIMEOUT_S = 120.0  # a pipeline finishing its current Delta commit before an auto-drop


class SlotMonitor(BackgroundLoop):
    thread_name = "slot-monitor"
    def __init__(self, sources: Sequence[SourceConfig], state: str, stop: threading.Event, *,
                 runners: Mapping[str, SourceRunner] | None = None,
                 metrics: SlotMetrics | None = None) -> None:
        self.sources, self.state, self.stop = list(sources), state, stop
        self.runners = dict(runners or {})
        self.metrics = metrics
        self.last: dict[str, HealthReport] = {}  # the newest report per source

    def run(self) -> None:
        due = dict.fromkeys((s.name for s in self.sources), 0.0)
        while not self.stop.is_set():
            try:
                with open_store(self.state) as store:
                    while not self.stop.is_set():
                        for src in self.sources:
                            if time.monotonic() >= due[src.name]:
                                due[src.name] = time.monotonic() + src.lag_check_interval_s
                                self.check(store, src)
                        self.stop.wait(TICK_S)
            except Exception as exc:  # noqa: BLE001 - the monitor must outlive a store outage
                log.warning("monitor_store_failed", reason=str(classify_error(exc).reason))
                self.stop.wait(5.0)

    def check(self, store: StateStore, src: SourceConfig) -> HealthReport | None:
        runner = self.runners.get(src.name)
        try:
            if runner is not None and runner.holds_lease():
                report = self._act(store, src, runner)
            elif runner is not None and runner.starting():
                # its pipeline takes the lease in a moment: read now, act from the next pass
                report = check_source(src, store, metrics=self.metrics, act=False)
            else:
                report = self._leased(store, src, runner)
        except Exception as exc:  # noqa: BLE001 - one source's failure never stops the others
            err = classify_error(exc)
            count = getattr(self.metrics, "count_error", None)
            if count is not None:
                count(src.name, str(err.reason))
            log.warning("slot_check_failed", source=src.name, reason=str(err.reason),
                        message=err.message)
            return None
        self.last[src.name] = report
        log.debug("slot_checked", source=src.name, action=report.action, level=report.level,
                  retained_wal_bytes=report.retained_wal_bytes, lag_bytes=report.lag_bytes)
        return report

    def _leased(self, store: StateStore, src: SourceConfig,
                runner: SourceRunner | None) -> HealthReport:
        """No stream of ours holds the source (backoff, waiting for an operator, standby):
        act with the lease, or only read when another process holds it."""
        if runner is not None:
            runner.monitor_pass.set()
        try:
            with store.lease(src.name, purpose="monitor", ttl_s=120.0, wait_s=0):
                return self._act(store, src, runner)
        except LeaseHeld:
            return check_source(src, store, metrics=self.metrics, act=False)
        finally:
            if runner is not None:
                runner.monitor_pass.clear()

    def _act(self, store: StateStore, src: SourceConfig,
             runner: SourceRunner | None) -> HealthReport:
        if runner is None:
            return check_source(src, store, metrics=self.metrics)
        try:
            return check_source(src, store, metrics=self.metrics,
                                stop_stream=lambda: runner.halt(HALT_TIMEOUT_S))
        finally:
            runner.release()

"""`cdcengine run`: one `SourceRunner` per source on its own thread, the slot monitor on its
own timer, and the HTTP endpoints, until asked to stop.

Per source (see `cdcengine.serve.runner`): retryable errors reconnect with backoff; a source another
daemon holds is stood by for; a source marked broken or paused waits for `repair` / `resume`
and then streams again by itself; other non-retryable failures end that source while the others
keep running. The monitor (`cdcengine.serve.monitor`) applies the lag policy to every source
meanwhile, whatever its stream is doing.
Exit codes (SPEC §3): a requested stop exits 0 after the current Delta commit unless a source is
broken, paused or failed (1: a broken source never exits 0 as if all were well); the daemon ends
by itself (1) only when every source has ended.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from cdcengine.config import Config, SourceConfig
from cdcengine.errors import CDCError
from cdcengine.metrics import Metrics
from cdcengine.serve.http import Endpoints, HttpServer
from cdcengine.serve.monitor import SlotMonitor
from cdcengine.serve.runner import SourceOutcome, SourceRunner
from cdcengine.serve.watchdog import Watchdog

log = structlog.get_logger("cdcengine.serve.daemon")

__all__ = ["DaemonResult", "SourceOutcome", "run"]


@dataclass(slots=True)
class DaemonResult:
    outcomes: list[SourceOutcome] = field(default_factory=list)
    requested_stop: bool = False

    @property
    def exit_code(self) -> int:
        """1 when a source failed; a requested stop while a source waits for `resume` (paused:
        credentials or a privilege to fix, nothing lost) is a normal end, 0 (SPEC §3). A broken
        source never ends 0."""
        failed = any(o.error is not None
                     and not (self.requested_stop and o.waiting == "resume")
                     for o in self.outcomes)
        return 1 if failed else 0


def run(cfg: Config, sources: Sequence[SourceConfig], stop: threading.Event, *,
        metrics: Metrics | None = None) -> DaemonResult:
    """Run until `stop` is set or every source has ended; see the module docstring.

    With `[engine] http_port` set, /health, /status and /metrics are served meanwhile; a port
    that cannot be bound raises `ConfigError` before any source starts."""
    result = DaemonResult()
    metrics = metrics or Metrics()
    server = _serve(cfg, sources, metrics, result)
    runners = {src.name: SourceRunner(src, cfg.engine.state, stop, metrics=metrics)
               for src in sources}
    result.outcomes.extend(r.outcome for r in runners.values())
    threads = [threading.Thread(target=r.run, name=f"source-{name}", daemon=True)
               for name, r in runners.items()]
    for t in threads:
        t.start()
    monitor = SlotMonitor(sources, cfg.engine.state, stop, runners=runners,
                          metrics=metrics).start()
    # its own stop: it keeps watching while the runners finish (a hung commit hangs the stop)
    watchdog_stop = threading.Event()
    # faulthandler's dump if even the watchdog cannot run (the GIL held by a blocked call):
    # well after the slowest source's stall would have been reported
    last_resort_s = max(60.0, 2.0 * max((s.stall_timeout_s for s in sources), default=0))
    watchdog = Watchdog(sources, cfg.engine.state, watchdog_stop, metrics=metrics,
                        activities={name: r.activity for name, r in runners.items()},
                        last_resort_s=last_resort_s).start()
    log.info("daemon_started", sources=[s.name for s in sources])
    while any(t.is_alive() for t in threads) and not stop.wait(0.5):
        pass
    result.requested_stop = stop.is_set()
    stop.set()
    for r in runners.values():
        r.wake()
    for t in threads:
        t.join()
    monitor.join()
    watchdog_stop.set()
    watchdog.join()
    watchdog.clear_all()  # every pipeline ended: none of them is stalled any more
    for r in runners.values():  # a broken source never exits 0, however recent the marker
        try:
            r.note_marker()
        except CDCError:
            log.warning("state_store_unavailable", source=r.source.name)
    if server is not None:
        server.close()
    log.info("daemon_stopped", requested=result.requested_stop,
             failed=[o.name for o in result.outcomes if o.error is not None])
    return result


def _serve(cfg: Config, sources: Sequence[SourceConfig], metrics: Metrics,
           result: DaemonResult) -> HttpServer | None:
    """The HTTP endpoints (SPEC §7), unless `http_port` is 0."""
    if not cfg.engine.http_port:
        return None

    def stopped() -> dict[str, tuple[CDCError, datetime]]:
        # a runner waiting for repair/resume is described by the store's marker, which /health
        # reads itself (and sees cleared at once, before the runner notices)
        return {o.name: (o.error, o.failed_at or datetime.now(UTC))
                for o in result.outcomes if o.error is not None and o.waiting is None}

    endpoints = Endpoints(sources=sources, state=cfg.engine.state, metrics=metrics,
                          stopped=stopped)
    return HttpServer(endpoints, port=cfg.engine.http_port, host=cfg.engine.http_host).start()

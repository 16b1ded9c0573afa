"""`cdcengine run`: one pipeline per source, each on its own thread, until asked to stop.

Per source: a retryable error (connection lost, slot briefly in use, destination hiccup)
reconnects with exponential backoff and resumes from the last durable position (the Delta log
and the slot say where); a non-retryable one ends that source (the pipeline has already marked
it `broken` or `paused` where that applies) while the others keep running.
Exit codes (SPEC §3): a requested stop exits 0 after the current Delta commit; an unrequested
end with failed sources exits 1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from cdcengine.config import Config, SourceConfig
from cdcengine.errors import CDCError, classify_error
from cdcengine.pipeline import Pipeline

log = structlog.get_logger("cdcengine.daemon")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0


@dataclass(slots=True)
class SourceOutcome:
    name: str
    error: CDCError | None = None
    restarts: int = 0


@dataclass(slots=True)
class DaemonResult:
    outcomes: list[SourceOutcome] = field(default_factory=list)
    requested_stop: bool = False

    @property
    def exit_code(self) -> int:
        failed = any(o.error is not None for o in self.outcomes)
        return 1 if failed else 0


def run_source(source: SourceConfig, state: str, stop: threading.Event,
               outcome: SourceOutcome) -> None:
    backoff = BACKOFF_START_S
    while not stop.is_set():
        started = time.monotonic()
        try:
            Pipeline(source, state=state).run(stop)
            return
        except Exception as exc:  # noqa: BLE001 - classified: retry or give up, never a crash
            err = classify_error(exc)
            if time.monotonic() - started > BACKOFF_MAX_S:
                backoff = BACKOFF_START_S  # it ran well for a while: a fresh incident
            if not err.retryable:
                outcome.error = err
                log.error("source_stopped", source=source.name, reason=str(err.reason),
                          message=err.message)
                return
            outcome.restarts += 1
            log.warning("source_reconnecting", source=source.name, reason=str(err.reason),
                        message=err.message, backoff_s=backoff)
            if stop.wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)


def run(cfg: Config, sources: Sequence[SourceConfig], stop: threading.Event) -> DaemonResult:
    """Run until `stop` is set or every source has ended; see the module docstring."""
    result = DaemonResult()
    threads = []
    for src in sources:
        outcome = SourceOutcome(name=src.name)
        result.outcomes.append(outcome)
        t = threading.Thread(target=run_source, args=(src, cfg.engine.state, stop, outcome),
                             name=f"source-{src.name}", daemon=True)
        t.start()
        threads.append(t)
    log.info("daemon_started", sources=[s.name for s in sources])
    while any(t.is_alive() for t in threads) and not stop.wait(0.5):
        pass
    result.requested_stop = stop.is_set()
    stop.set()
    for t in threads:
        t.join()
    log.info("daemon_stopped", requested=result.requested_stop,
             failed=[o.name for o in result.outcomes if o.error is not None])
    return result

"""A pipeline run's entry in the run history (`cdcengine jobs`, SPEC §3): start, batches with
rows per table and LSN range, end with the error reason.

The history is for people ("what happened last night"), never for recovery: a failure to
write it is logged and the run goes on. Batches become durable on the writer thread; they are
queued here and written by the reading thread, which owns the state store connection.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import structlog

from cdcengine.errors import classify_error
from cdcengine.pipeline.batcher import ChangeBatch
from cdcengine.pipeline.writer import Durable
from cdcengine.sink.spilled import min_lsn
from cdcengine.state.base import StateStore

log = structlog.get_logger("cdcengine.pipeline.runlog")


@dataclass(frozen=True, slots=True)
class _Entry:
    first_lsn: int | None
    last_lsn: int
    rows: dict[str, int]
    duration_s: float
    commit_latency_s: float | None


class RunLog:
    def __init__(self, store: StateStore, source: str, *, kind: str, holder: str) -> None:
        self._store, self._source = store, source
        self._queue: deque[_Entry] = deque()
        self._lock = threading.Lock()
        self.run_id: int | None = None
        try:
            self.run_id = store.start_run(source, kind=kind, holder=holder)
        except Exception as exc:  # noqa: BLE001 - history must never stop the data
            self._failed("start", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        log.warning("run_history_failed", source=self._source, step=what,
                    reason=str(classify_error(exc).reason))

    def durable(self, batch: ChangeBatch, done: Durable) -> None:
        """Writer thread: a batch's commits are done."""
        rows = {ref.qualified: t.num_rows for ref, t in batch.tables.items() if t.num_rows}
        lows = [min_lsn(t) for t in batch.tables.values()]
        entry = _Entry(first_lsn=min((v for v in lows if v is not None), default=None),
                       last_lsn=batch.version, rows=rows, duration_s=done.duration_ms / 1000,
                       commit_latency_s=None)
        with self._lock:
            self._queue.append(entry)

    def snapshot(self, table: str, *, rows: int, version: int | None, duration_s: float) -> None:
        if version is not None:
            with self._lock:
                self._queue.append(_Entry(first_lsn=None, last_lsn=version, rows={table: rows},
                                          duration_s=duration_s, commit_latency_s=None))

    def flush(self) -> None:
        """Reading thread: write what became durable."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                entry = self._queue.popleft()
            if self.run_id is None:
                continue
            try:
                self._store.record_batch(self.run_id, first_lsn=entry.first_lsn,
                                         last_lsn=entry.last_lsn, rows=entry.rows,
                                         duration_s=entry.duration_s,
                                         commit_latency_s=entry.commit_latency_s)
            except Exception as exc:  # noqa: BLE001 - history must never stop the data
                self._failed("batch", exc)

    def end(self, error: BaseException | None) -> None:
        self.flush()
        if self.run_id is None:
            return
        err = classify_error(error) if error is not None else None
        try:
            self._store.end_run(self.run_id, error_reason=str(err.reason) if err else None,
                                error_message=err.message if err else None)
        except Exception as exc:  # noqa: BLE001 - history must never stop the data
            self._failed("end", exc)

"""Run history: recent runs and batches per source, so `cdcengine jobs` can show what happened
last night without anyone reading logs.

A run is one stretch of work on one source by one process: a daemon's stream, a snapshot, a
resync, a repair, a sweep (`kind` is free text; those are the engine's). `start_run` records who
runs it (holder id, host, pid) and when; each committed batch adds a `run_batches` row and adds
to the run's own totals (rows per table in `run_tables`, batch count, LSN range); `end_run`
records the end and, on failure, the error's reason code and message.

Retention is bounded and enforced inside the write transactions that add rows, with indexed
statements only, so the history never needs a vacuum job:
- `MAX_BATCHES_PER_SOURCE` batch rows per source: each batch gets a per-source sequence number,
  and adding batch `n` deletes batch `n - MAX_BATCHES_PER_SOURCE` (a primary-key range delete).
  Totals live on the run, so a run whose batches were pruned still reports them all.
- `MAX_RUNS_PER_KIND` runs per source *and kind*: counted per kind so that a cron `sweep` every
  minute cannot push last night's stream run out of the history. Starting a run drops the
  oldest runs beyond the limit, with their batches and totals, unless they are still running.

Status. `ok` and `failed` are stored by `end_run`. A run never ended (process killed, machine
lost) is derived at read time, in this order:
1. `interrupted` when it ran on this host and its pid no longer exists;
2. `running` when its holder holds the source's live lease (a daemon renews its lease, so an idle
   stream that commits nothing for days is still running);
3. `interrupted` when a newer run of the same source and kind was started by another holder (the
   lease makes two streams of one source at once impossible, so the older one is dead);
4. `interrupted` when it has shown no sign of life (start or last batch) for `STALE_RUN_S`;
5. `running` otherwise.
A run on another host that died without a successor thus shows as running until a day passes.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from typing import TypeVar

from cdcengine.state.base import BatchRecord, RunRecord, RunStatus, holder_gone
from cdcengine.state.dialect import DialectStore
from cdcengine.state.records import Queries, Row, check_lsn, dt, dt_or_none, refuse

C = TypeVar("C")  # the driver's connection type

MAX_RUNS_PER_KIND = 100
"""Runs kept per source and kind (older ones are dropped as new ones start, unless running)."""
MAX_BATCHES_PER_SOURCE = 2000
"""Batch rows kept per source, all runs together; run totals are kept regardless."""
STALE_RUN_S = 24 * 3600.0
"""A run never ended and silent (no batch) for this long is shown as interrupted."""
MAX_ERROR_MESSAGE_CHARS = 2000
"""Error messages are user-facing summaries; a longer one is cut, never rejected."""


def check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise refuse(f"limit must be a positive integer, got {limit!r}")


def check_batch(
    first_lsn: int | None,
    last_lsn: int,
    rows: Mapping[str, int],
    duration_s: float,
    commit_latency_s: float | None,
) -> None:
    """Refuse a batch that cannot be real before it reaches the store (or a BIGINT column)."""
    check_lsn(first_lsn, "first LSN")
    check_lsn(last_lsn, "last LSN")
    if first_lsn is not None and first_lsn > last_lsn:
        raise refuse(f"first LSN {first_lsn} is after last LSN {last_lsn}")
    for table, count in rows.items():
        if not table or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise refuse(f"rows per table must be non-negative integers, got {table!r}: {count!r}")
    for what, value in (("duration", duration_s), ("commit latency", commit_latency_s)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise refuse(f"{what} must be a non-negative number of seconds, got {value!r}")


# writes (inside the store's write transaction) ------------------------------------------------


def start(tx: Queries, now: float, source: str, *, kind: str, holder: str) -> int:
    if not kind or not holder:
        raise refuse("a run needs a kind and a holder")
    # MAX + 1 is safe under the write lock, and the newest run is never pruned, so an id is
    # never handed out twice.
    row = tx.one("SELECT MAX(id) AS id FROM runs")
    run_id = 1 if row is None or row["id"] is None else int(row["id"]) + 1
    tx.run(
        "INSERT INTO runs (id, source, kind, holder, host, pid, started_at, status, batches)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
        (run_id, source, kind, holder, socket.gethostname(), os.getpid(), now, RunStatus.RUNNING),
    )
    _prune_runs(tx, now, source, kind)
    return run_id


def _prune_runs(tx: Queries, now: float, source: str, kind: str) -> None:
    cutoff = tx.one(
        "SELECT id FROM runs WHERE source = ? AND kind = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
        (source, kind, MAX_RUNS_PER_KIND),
    )
    if cutoff is None:
        return
    old = tx.all(
        "SELECT * FROM runs WHERE source = ? AND kind = ? AND id <= ?",
        (source, kind, cutoff["id"]),
    )
    lease = _lease_holder(tx, now, source)
    doomed = [
        (row["id"],)
        for row in old
        if _status(row, now, lease_holder=lease, superseded=_superseded(tx, row))
        is not RunStatus.RUNNING
    ]
    tx.many("DELETE FROM run_batches WHERE run_id = ?", doomed)
    tx.many("DELETE FROM run_tables WHERE run_id = ?", doomed)
    tx.many("DELETE FROM runs WHERE id = ?", doomed)


def add_batch(
    tx: Queries,
    now: float,
    run_id: int,
    *,
    first_lsn: int | None,
    last_lsn: int,
    rows: Mapping[str, int],
    duration_s: float,
    commit_latency_s: float | None,
) -> None:
    run = tx.one("SELECT source, first_lsn, last_lsn FROM runs WHERE id = ?", (run_id,))
    if run is None:
        return  # pruned (or never recorded): history must not fail the pipeline
    source = run["source"]
    top = tx.one("SELECT MAX(seq) AS seq FROM run_batches WHERE source = ?", (source,))
    seq = 1 if top is None or top["seq"] is None else int(top["seq"]) + 1
    tx.run(
        "INSERT INTO run_batches (source, seq, run_id, recorded_at, first_lsn, last_lsn,"
        " table_rows, duration_s, commit_latency_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (source, seq, run_id, now, first_lsn, last_lsn,
         json.dumps(dict(sorted(rows.items()))), duration_s, commit_latency_s),
    )
    tx.many(
        "INSERT INTO run_tables (run_id, table_name, row_count) VALUES (?, ?, ?)"
        " ON CONFLICT (run_id, table_name)"
        " DO UPDATE SET row_count = run_tables.row_count + excluded.row_count",
        [(run_id, table, count) for table, count in sorted(rows.items())],
    )
    low = last_lsn if first_lsn is None else first_lsn
    run_first = low if run["first_lsn"] is None else min(int(run["first_lsn"]), low)
    run_last = last_lsn if run["last_lsn"] is None else max(int(run["last_lsn"]), last_lsn)
    tx.run(
        "UPDATE runs SET batches = batches + 1, first_lsn = ?, last_lsn = ?, last_batch_at = ?"
        " WHERE id = ?",
        (run_first, run_last, now, run_id),
    )
    if seq > MAX_BATCHES_PER_SOURCE:
        tx.run(
            "DELETE FROM run_batches WHERE source = ? AND seq <= ?",
            (source, seq - MAX_BATCHES_PER_SOURCE),
        )


def end(
    tx: Queries,
    now: float,
    run_id: int,
    error_reason: str | None,
    error_message: str | None,
) -> None:
    failed = bool(error_reason or error_message)
    if error_message is not None and len(error_message) > MAX_ERROR_MESSAGE_CHARS:
        error_message = error_message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
    tx.run(
        "UPDATE runs SET ended_at = ?, status = ?, error_reason = ?, error_message = ?"
        " WHERE id = ? AND ended_at IS NULL",
        (now, RunStatus.FAILED if failed else RunStatus.OK, error_reason, error_message, run_id),
    )


# reads ----------------------------------------------------------------------------------------


def select_runs(tx: Queries, now: float, source: str, limit: int) -> list[RunRecord]:
    rows = tx.all("SELECT * FROM runs WHERE source = ? ORDER BY id DESC LIMIT ?", (source, limit))
    if not rows:
        return []
    totals: dict[int, dict[str, int]] = {}
    for t in tx.all(
        "SELECT t.run_id, t.table_name, t.row_count FROM run_tables t"
        " JOIN runs r ON r.id = t.run_id WHERE r.source = ? AND r.id >= ?"
        " ORDER BY t.run_id, t.table_name",
        (source, rows[-1]["id"]),
    ):
        totals.setdefault(int(t["run_id"]), {})[t["table_name"]] = int(t["row_count"])
    lease = _lease_holder(tx, now, source)
    newer_holders: dict[str, set[str]] = {}  # kind -> holders of the newer runs seen so far
    records = []
    for row in rows:  # newest first, so every newer run is seen before an older one
        seen = newer_holders.setdefault(row["kind"], set())
        superseded = any(holder != row["holder"] for holder in seen)
        seen.add(row["holder"])
        status = _status(row, now, lease_holder=lease, superseded=superseded)
        records.append(_run_record(row, status, now, totals.get(int(row["id"]), {})))
    return records


def select_batches(tx: Queries, run_id: int, limit: int) -> list[BatchRecord]:
    rows = tx.all(
        "SELECT * FROM run_batches WHERE run_id = ? ORDER BY seq DESC LIMIT ?", (run_id, limit)
    )
    return [
        BatchRecord(
            run_id=int(row["run_id"]),
            at=dt(row["recorded_at"]),
            first_lsn=None if row["first_lsn"] is None else int(row["first_lsn"]),
            last_lsn=int(row["last_lsn"]),
            rows={str(k): int(v) for k, v in json.loads(row["table_rows"]).items()},
            duration_s=float(row["duration_s"]),
            commit_latency_s=row["commit_latency_s"],
        )
        for row in rows
    ]


# status ---------------------------------------------------------------------------------------


def _lease_holder(tx: Queries, now: float, source: str) -> str | None:
    row = tx.one("SELECT holder FROM leases WHERE source = ? AND expires_at >= ?", (source, now))
    return None if row is None else str(row["holder"])


def _superseded(tx: Queries, row: Row) -> bool:
    newer = tx.one(
        "SELECT 1 AS newer FROM runs WHERE source = ? AND kind = ? AND id > ? AND holder <> ?"
        " LIMIT 1",
        (row["source"], row["kind"], row["id"], row["holder"]),
    )
    return newer is not None


def _last_sign_of_life(row: Row) -> float:
    last: float | None = row["last_batch_at"]
    return float(row["started_at"]) if last is None else float(last)


def _status(row: Row, now: float, *, lease_holder: str | None, superseded: bool) -> RunStatus:
    """The run's status; see the module docstring for the rules and their order."""
    stored = RunStatus(row["status"])
    if stored is not RunStatus.RUNNING:
        return stored
    if holder_gone(row["host"], row["pid"]):
        return RunStatus.INTERRUPTED
    if lease_holder is not None and lease_holder == row["holder"]:
        return RunStatus.RUNNING
    if superseded or now - _last_sign_of_life(row) > STALE_RUN_S:
        return RunStatus.INTERRUPTED
    return RunStatus.RUNNING


def _run_record(row: Row, status: RunStatus, now: float, rows: dict[str, int]) -> RunRecord:
    started = float(row["started_at"])
    if row["ended_at"] is not None:
        duration = float(row["ended_at"]) - started
    elif status is RunStatus.RUNNING:
        duration = now - started
    else:  # interrupted: it lasted at least until its last sign of life
        duration = _last_sign_of_life(row) - started
    return RunRecord(
        id=int(row["id"]),
        source=row["source"],
        kind=row["kind"],
        status=status,
        started_at=dt(started),
        ended_at=dt_or_none(row["ended_at"]),
        duration_s=max(0.0, duration),
        batches=int(row["batches"]),
        rows=rows,
        first_lsn=None if row["first_lsn"] is None else int(row["first_lsn"]),
        last_lsn=None if row["last_lsn"] is None else int(row["last_lsn"]),
        error_reason=row["error_reason"],
        error_message=row["error_message"],
        host=row["host"],
        pid=int(row["pid"]),
        holder=row["holder"],
        last_batch_at=dt_or_none(row["last_batch_at"]),
    )


class RunHistorySQL(DialectStore[C]):
    """The run history of `cdcengine.state.sql.SQLStateStore`, on the functions above."""

    def start_run(self, source: str, *, kind: str, holder: str) -> int:
        """A new run of `source`, started now by `holder` in this process; its id.

        Prunes the source's oldest ended runs of the same kind beyond the retention limit."""
        with self._write() as tx:
            return start(tx, self._clock(), source, kind=kind, holder=holder)

    def record_batch(
        self,
        run_id: int,
        *,
        first_lsn: int | None,
        last_lsn: int,
        rows: Mapping[str, int],
        duration_s: float,
        commit_latency_s: float | None = None,
    ) -> None:
        """One committed batch of the run: adds to the run's totals and keeps the batch row
        (the source's oldest batch rows beyond the retention limit are dropped). A run that no
        longer exists (pruned) is ignored: history must never stop a pipeline."""
        check_batch(first_lsn, last_lsn, rows, duration_s, commit_latency_s)
        with self._write() as tx:
            add_batch(
                tx,
                self._clock(),
                run_id,
                first_lsn=first_lsn,
                last_lsn=last_lsn,
                rows=rows,
                duration_s=duration_s,
                commit_latency_s=commit_latency_s,
            )

    def end_run(
        self, run_id: int, *, error_reason: str | None = None, error_message: str | None = None
    ) -> None:
        """The run ended now: `failed` with an error, else `ok`. The first end wins; ending an
        unknown (pruned) run is a no-op."""
        with self._write() as tx:
            end(tx, self._clock(), run_id, error_reason, error_message)

    def list_runs(self, source: str, *, limit: int = 20) -> list[RunRecord]:
        """The source's most recent runs, newest first, with their derived status."""
        check_limit(limit)
        now = self._clock()
        return self._read(lambda tx: select_runs(tx, now, source, limit))

    def list_batches(self, run_id: int, *, limit: int = 50) -> list[BatchRecord]:
        """The run's most recent batches still kept, newest first."""
        check_limit(limit)
        return self._read(lambda tx: select_batches(tx, run_id, limit))

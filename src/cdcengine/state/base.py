"""The state store's seam: what the engine remembers between runs, engine-neutral.

The store holds each source's lifecycle (enabled, state, broken/paused markers, what was
provisioned), its tables' states, tuning overrides made with `settings`, per-source leases, and a
bounded history of recent runs and their batches (`cdcengine jobs`).
Applied LSN positions are deliberately absent: they live in the Delta log, committed atomically
with the data, so the two can never disagree.

Invariants every implementation keeps (so `status` never shows a contradiction):
- `enabled` is true exactly when `state` is not `disabled`;
- a `broken` marker is set exactly when `state` is `broken`;
- a `paused` marker without a `broken` one means `state` is `paused` (broken wins over paused).

A `stalled` record (the daemon's watchdog: changes pending, nothing durable for
`stall_timeout_s`) sits beside `state` rather than in it: the stored state keeps saying what the
pipeline does (streaming, snapshotting, warning …) and comes back by itself when the stall clears,
and a stall never hides a broken or paused source. `shown_state` combines the two for display.
"""

from __future__ import annotations

import enum
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Protocol

from cdcengine.errors import LeaseHeld

SETTING_KEYS: frozenset[str] = frozenset(
    {"auto_drop_slot", "lag_warning_threshold_mb", "lag_critical_threshold_mb"}
)
"""The tuning keys `settings` may override; everything else is fixed by the config file."""


class SourceState(enum.StrEnum):
    DISABLED = "disabled"
    SNAPSHOTTING = "snapshotting"
    STREAMING = "streaming"
    WARNING = "warning"
    ERROR = "error"
    PAUSED = "paused"
    BROKEN = "broken"
    # never stored as `state`: shown while a daemon's watchdog records a stall (`shown_state`)
    STALLED = "stalled"


class TableState(enum.StrEnum):
    PENDING = "pending"
    SNAPSHOTTING = "snapshotting"
    STREAMING = "streaming"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class Marker:
    """Why a source is broken or paused, kept until an operator action clears it."""

    reason: str
    message: str
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadInfo:
    """One thread of a stalled daemon: what it is doing (its innermost frame) and its stack,
    outermost call first."""

    name: str
    doing: str
    stack: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckWork:
    """One kind of work of a source (`stream`, `snapshot`) that made nothing durable."""

    lane: str
    what: str
    waited_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Stall:
    """A daemon's watchdog found the source unable to make progress: changes pending and
    nothing durable since `since`. Recorded by the daemon running the source (`host`, `pid`);
    cleared by it as soon as something becomes durable again."""

    since: datetime
    at: datetime  # when the watchdog found it (or last refreshed the thread picture)
    message: str
    work: tuple[StuckWork, ...] = ()
    threads: tuple[ThreadInfo, ...] = ()
    host: str = ""
    pid: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceRecord:
    name: str
    state: SourceState
    enabled: bool
    management_mode: str | None
    slot_name: str | None
    publication_name: str | None
    consistent_point: int | None
    system_identifier: str | None
    timeline: int | None
    enabled_at: datetime | None
    updated_at: datetime
    broken: Marker | None
    paused: Marker | None
    stalled: Stall | None = None


STALL_REFRESH_S = 30.0
"""How often a daemon renews the stall it recorded (`Stall.at`)."""


def live_stall(rec: SourceRecord | None) -> Stall | None:
    """The record's stall, unless the daemon that recorded it is gone, or the source needs an
    operator anyway (broken, paused) or is disabled.

    A daemon killed while stalled cannot clear its record: on this host its pid tells that it
    is gone; a daemon on another host renews the record every `STALL_REFRESH_S` while the stall
    lasts, so one not renewed for three times that is taken as gone."""
    if rec is None or rec.stalled is None or rec.state in _NOT_STALLABLE:
        return None
    stall = rec.stalled
    if stall.host == socket.gethostname():
        return None if holder_gone(stall.host, stall.pid) else stall
    age = datetime.now(UTC) - stall.at
    return stall if age.total_seconds() <= 3 * STALL_REFRESH_S else None


def shown_state(rec: SourceRecord | None) -> SourceState:
    """The state `status`, `/health` and `/metrics` show: `stalled` over a running state."""
    if rec is None:
        return SourceState.DISABLED
    return SourceState.STALLED if live_stall(rec) is not None else rec.state


_NOT_STALLABLE = frozenset({SourceState.DISABLED, SourceState.BROKEN, SourceState.PAUSED})


@dataclass(frozen=True, slots=True, kw_only=True)
class TableRecord:
    source: str
    name: str
    mode: str
    state: TableState
    reason: str | None
    remedy: str | None
    updated_at: datetime
    # as `enable` registered them (None: every column / the table's own key, or not recorded)
    columns: tuple[str, ...] | None = None
    primary_key: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TableOptions:
    """A table's options as `enable` registers them with its record."""

    columns: tuple[str, ...] | None = None
    primary_key: tuple[str, ...] | None = None


class ChunkState(enum.StrEnum):
    PLANNED = "planned"
    COPYING = "copying"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotChunkRecord:
    """One planned chunk of a table snapshot, for progress display (the Delta log decides
    which chunks are really finished; see `cdcengine.pipeline.snapshots`)."""

    chunk_id: int
    attempt: int  # the consistent point of the attempt that planned the chunks
    leaf: str  # the partition (or the table itself) the chunk reads
    lo: str | None  # key range [lo, hi) as the source prints the key; None: unbounded
    hi: str | None
    estimated_rows: int
    state: ChunkState
    rows: int = 0
    lsn: int | None = None  # the consistent point the chunk was copied under, once finished
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotProgress:
    """A table snapshot's progress (`status`, `snapshot_progress` log events)."""

    attempt: int
    resumed: bool  # this run continued an interrupted snapshot
    chunks_total: int
    chunks_done: int
    rows_total: int  # estimate (planner statistics) until finished
    rows_done: int  # rows in finished chunks plus rows copied so far in running chunks
    rows_copied: int  # rows copied by this run (a resumed run copies only what was missing)
    rows_per_s: float | None
    eta_s: float | None
    finished: bool
    started_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingValue:
    value: bool | int
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """A time-limited claim on one source; `holder` identifies the claimant across processes."""

    source: str
    holder: str
    purpose: str
    host: str
    pid: int
    acquired_at: datetime
    expires_at: datetime


class RunStatus(enum.StrEnum):
    """How a run ended, or that it has not (see `cdcengine.state.runs` for how it is derived)."""

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # never ended: its process is gone, or it went silent


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One run (a daemon's stream, a snapshot, a resync, a repair, a sweep) of one source.

    `rows` and the LSN range are totals over every batch of the run, kept on the run itself so
    they survive the pruning of old batch rows. `duration_s` is up to now while running, up to
    the last batch (or the start) when interrupted.
    """

    id: int
    source: str
    kind: str
    status: RunStatus
    started_at: datetime
    ended_at: datetime | None
    duration_s: float
    batches: int
    rows: dict[str, int]
    first_lsn: int | None
    last_lsn: int | None
    error_reason: str | None
    error_message: str | None
    host: str
    pid: int
    holder: str
    last_batch_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRecord:
    """One committed batch of a run: rows per table, its LSN range and how long it took."""

    run_id: int
    at: datetime
    first_lsn: int | None
    last_lsn: int
    rows: dict[str, int]
    duration_s: float
    commit_latency_s: float | None


class StateStore(Protocol):
    """What the engine needs from a state store. Implementations are safe to share by threads."""

    def close(self) -> None: ...
    def __enter__(self) -> StateStore: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def install_id(self) -> str: ...

    # sources
    def get_source(self, name: str) -> SourceRecord | None: ...
    def list_sources(self) -> list[SourceRecord]: ...
    def record_enabled(
        self,
        name: str,
        *,
        management_mode: str,
        slot_name: str,
        publication_name: str,
        consistent_point: int | None,
        system_identifier: str | None,
        timeline: int | None,
        tables: Mapping[str, str],
    ) -> SourceRecord: ...
    def record_reprovisioned(
        self,
        name: str,
        *,
        consistent_point: int | None,
        system_identifier: str | None,
        timeline: int | None,
    ) -> SourceRecord: ...
    def record_disabled(self, name: str) -> SourceRecord: ...
    def set_source_state(self, name: str, state: SourceState) -> SourceRecord: ...
    def set_broken(self, name: str, reason: str, message: str) -> SourceRecord: ...
    def clear_broken(self, name: str) -> SourceRecord: ...
    def set_paused(self, name: str, reason: str, message: str) -> SourceRecord: ...
    def clear_paused(self, name: str) -> SourceRecord: ...
    def set_stalled(self, name: str, stall: Stall) -> SourceRecord: ...
    def clear_stalled(self, name: str) -> SourceRecord | None: ...

    # tables
    def list_tables(self, source: str) -> list[TableRecord]: ...
    def upsert_table(self, source: str, table: str, mode: str, *,
                     options: TableOptions | None = None) -> TableRecord: ...
    def set_table_state(
        self,
        source: str,
        table: str,
        state: TableState,
        *,
        reason: str | None = None,
        remedy: str | None = None,
    ) -> TableRecord: ...
    def remove_table(self, source: str, table: str) -> None: ...

    # snapshot progress (display only; the Delta log is the truth)
    def record_snapshot_plan(
        self, source: str, table: str, chunks: Sequence[SnapshotChunkRecord]
    ) -> None: ...
    def update_snapshot_chunk(
        self,
        source: str,
        table: str,
        chunk_id: int,
        *,
        state: ChunkState,
        rows: int,
        lsn: int | None = None,
    ) -> None: ...
    def list_snapshot_chunks(self, source: str, table: str) -> list[SnapshotChunkRecord]: ...
    def set_snapshot_progress(
        self, source: str, table: str, progress: SnapshotProgress
    ) -> None: ...
    def get_snapshot_progress(self, source: str, table: str) -> SnapshotProgress | None: ...

    # settings overrides
    def set_setting(self, source: str, key: str, value: bool | int) -> SettingValue: ...
    def clear_setting(self, source: str, key: str) -> None: ...
    def get_settings(self, source: str) -> dict[str, SettingValue]: ...

    # leases
    def acquire_lease(self, source: str, *, holder: str, purpose: str, ttl_s: float) -> Lease: ...
    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease: ...
    def release_lease(self, lease: Lease) -> None: ...
    def get_lease(self, source: str) -> Lease | None: ...
    def lease(
        self, source: str, *, purpose: str, ttl_s: float = 60.0, wait_s: float = 0.0
    ) -> AbstractContextManager[Lease]: ...

    # run history (bounded; `cdcengine jobs`)
    def start_run(self, source: str, *, kind: str, holder: str) -> int: ...
    def record_batch(
        self,
        run_id: int,
        *,
        first_lsn: int | None,
        last_lsn: int,
        rows: Mapping[str, int],
        duration_s: float,
        commit_latency_s: float | None = None,
    ) -> None: ...
    def end_run(
        self, run_id: int, *, error_reason: str | None = None, error_message: str | None = None
    ) -> None: ...
    def list_runs(self, source: str, *, limit: int = 20) -> list[RunRecord]: ...
    def list_batches(self, run_id: int, *, limit: int = 50) -> list[BatchRecord]: ...


def new_holder_id() -> str:
    """A holder id unique across hosts, processes and calls, readable in `LeaseHeld` messages."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_gone(host: str, pid: int | None) -> bool:
    """True when a lease's holder was a process on this host that no longer exists.

    A daemon killed with -9 cannot release its lease; waiting out the TTL would delay the
    restart for nothing. Holders on other hosts are trusted until their lease expires.
    """
    if host != socket.gethostname() or not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def lease_held_message(lease: Lease) -> str:
    """The `LeaseHeld` text: who holds the source, where, and since when, so an operator can act."""
    return (
        f"source {lease.source!r} is held by {lease.purpose!r} (host {lease.host}, pid "
        f"{lease.pid}) since {lease.acquired_at:%Y-%m-%d %H:%M:%S} UTC, until "
        f"{lease.expires_at:%Y-%m-%d %H:%M:%S} UTC unless renewed"
    )


@contextmanager
def hold_lease(
    store: StateStore,
    source: str,
    *,
    purpose: str,
    ttl_s: float,
    wait_s: float,
    poll_s: float = 0.1,
) -> Iterator[Lease]:
    """Hold the source's lease for the `with` body, under a fresh holder id.

    Retries while another live holder has the lease, for up to `wait_s`, then re-raises its
    `LeaseHeld` so the caller can report who holds it. On exit the lease is released (if still
    ours), so a crash-free caller never leaves a source blocked until the TTL runs out.
    """
    holder = new_holder_id()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            acquired = store.acquire_lease(source, holder=holder, purpose=purpose, ttl_s=ttl_s)
            break
        except LeaseHeld:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            time.sleep(min(poll_s, remaining))
    try:
        yield acquired
    finally:
        store.release_lease(acquired)

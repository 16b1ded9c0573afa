"""Replication slots: status and lag, creation with a bounded wait, dropping a held slot.

Slot names are validated by the config (`[a-z0-9_]{1,63}`) and still passed as parameters.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog

from cdcengine.errors import PermissionDenied, Reason, ReplicationResourceError, SlotCreationBlocked
from cdcengine.source.adapter import SlotInfo

log = structlog.get_logger("cdcengine.postgres.slots")

T = TypeVar("T")

SLOTS_SELECT = (
    "SELECT s.slot_name, s.plugin, s.slot_type, s.database, s.temporary, s.active,"
    " s.active_pid, s.restart_lsn::text, s.confirmed_flush_lsn::text,"
    " pg_wal_lsn_diff(c.lsn, s.confirmed_flush_lsn)::bigint,"
    " pg_wal_lsn_diff(c.lsn, s.restart_lsn)::bigint,"
    " s.wal_status, s.safe_wal_size"
    " FROM pg_replication_slots s"
    # On a standby pg_current_wal_lsn() raises; the receive position is "current" there.
    " CROSS JOIN (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()"
    " ELSE pg_current_wal_lsn() END AS lsn) c"
    " WHERE "
)
"""Rows of `slot_info`; the caller appends its condition on `s`."""

_TEMP_KINDS = {"snapshot": ("snap", 44), "verify": ("vfy", 42)}


def temp_slot_prefix(slot_name: str, kind: str) -> str:
    """The prefix of the engine's temporary slots of one kind for a source's slot."""
    tag, keep = _TEMP_KINDS[kind]
    return f"{slot_name[:keep]}_{tag}_"


def temp_slot_name(slot_name: str, kind: str) -> str:
    """A unique temporary slot name derived from the source's slot (≤ 63 chars)."""
    return f"{temp_slot_prefix(slot_name, kind)}{uuid.uuid4().hex[:12]}"


def temp_slot_prefixes(slot_name: str) -> tuple[str, ...]:
    return tuple(temp_slot_prefix(slot_name, kind) for kind in _TEMP_KINDS)


def slot_info(row: Sequence[Any]) -> SlotInfo:
    return SlotInfo(
        name=row[0], exists=True, plugin=row[1], temporary=row[4], active=row[5],
        active_pid=row[6], restart_lsn=row[7], confirmed_flush_lsn=row[8], lag_bytes=row[9],
        retained_wal_bytes=row[10], wal_status=row[11], safe_wal_size=row[12],
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotState:
    """`SlotInfo` plus what adoption decisions need (type, database)."""

    info: SlotInfo
    slot_type: str | None = None
    database: str | None = None

    @property
    def exists(self) -> bool:
        return self.info.exists


def read_slot(conn: psycopg.Connection, name: str) -> SlotState:
    row = conn.execute(SLOTS_SELECT + "s.slot_name = %s", [name]).fetchone()
    if row is None:
        return SlotState(info=SlotInfo(name=name, exists=False))
    return SlotState(info=slot_info(row), slot_type=row[2], database=row[3])


def read_temp_slots(conn: psycopg.Connection, slot_name: str) -> list[SlotInfo]:
    """The engine's temporary (snapshot, verify) slots of a source that exist right now."""
    rows = conn.execute(
        SLOTS_SELECT + "s.temporary AND (" + " OR ".join(
            "starts_with(s.slot_name, %s)" for _ in _TEMP_KINDS) + ") ORDER BY s.slot_name",
        list(temp_slot_prefixes(slot_name))).fetchall()
    return [slot_info(r) for r in rows]


@dataclass(frozen=True, slots=True, kw_only=True)
class Blocker:
    pid: int
    user: str | None
    database: str | None
    application: str | None
    state: str | None
    xact_age_s: float | None
    query_start: str | None

    def describe(self) -> str:
        age = f"{self.xact_age_s:.0f}s" if self.xact_age_s is not None else "?"
        return (f"pid {self.pid} (user {self.user}, database {self.database}, "
                f"application {self.application or '-'}, {self.state}, transaction open "
                f"{age}, query started {self.query_start})")


def blocking_backends(conn: psycopg.Connection, waiting_pid: int) -> list[Blocker]:
    """Backends a slot creation waits for: pg_blocking_pids() of the waiting backend.

    Logical slot creation waits (XactLockTableWait) for every transaction that holds an xid, in
    any database; pg_blocking_pids names exactly those. The query text is not shown, because it
    can contain data.
    """
    rows = conn.execute(
        "SELECT a.pid, a.usename, a.datname, a.application_name, a.state,"
        " extract(epoch FROM now() - a.xact_start)::float8, a.query_start::text"
        " FROM pg_stat_activity a WHERE a.pid = ANY (pg_blocking_pids(%s))"
        " ORDER BY a.xact_start",
        [waiting_pid],
    ).fetchall()
    return [Blocker(pid=r[0], user=r[1], database=r[2], application=r[3], state=r[4],
                    xact_age_s=r[5], query_start=r[6]) for r in rows]


class WaitAbandoned(Exception):
    """`run_watched` cancelled its command because `keep_waiting` said so."""


def run_watched(conn: psycopg.Connection, command: Callable[[], T], *,
                keep_waiting: Callable[[float], bool], poll_s: float = 0.2) -> T:
    """Run `command` (a statement on `conn` that may wait for other transactions, such as a
    logical slot creation) on a worker thread, asking `keep_waiting(seconds waited)` every
    `poll_s` while it runs. When that says no, the statement is cancelled and `WaitAbandoned`
    raised (unless it finished meanwhile); the command's own errors are raised as they are."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = command()
        except BaseException as exc:  # noqa: BLE001 - raised by the calling thread
            result["error"] = exc

    worker = threading.Thread(target=run, name="watched-command", daemon=True)
    started = time.monotonic()
    worker.start()
    while True:
        worker.join(poll_s)
        if not worker.is_alive():
            break
        if not keep_waiting(time.monotonic() - started):
            conn.cancel_safe()
            worker.join(30)
            if "value" not in result:
                raise WaitAbandoned from result.get("error")
            break
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


def create_slot(
    connect: Callable[[], psycopg.Connection], name: str, *, wait_s: float
) -> str:
    """Create the pgoutput slot and return its consistent point (X/Y).

    When the creation has not finished after `wait_s` (a running transaction holds it up), the
    blocking backends are read, the creation is cancelled, and `SlotCreationBlocked` names
    them. A cancelled creation leaves no slot behind (the slot is ephemeral until it is ready).
    Must not run inside a transaction that wrote (PostgreSQL forbids it): the connection is
    autocommit.
    """
    conn = connect()
    pid = conn.info.backend_pid
    blockers: list[Blocker] = []

    def keep_waiting(waited_s: float) -> bool:
        if waited_s < wait_s:
            return True
        with connect() as watcher:
            blockers.extend(blocking_backends(watcher, pid))
        return False

    try:
        row = run_watched(conn, lambda: conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
            [name]).fetchone(), keep_waiting=keep_waiting)
    except (WaitAbandoned, psycopg.errors.QueryCanceled) as exc:
        listed = "; ".join(b.describe() for b in blockers) or "none found any more"
        raise SlotCreationBlocked(
            f"Creating replication slot {name!r} waited more than {wait_s:.0f}s for running "
            f"transactions to finish. Blocking backends: {listed}.",
            fix="Let these transactions commit or roll back (or end them with "
                "pg_terminate_backend(pid)), then run `cdcengine enable` again.",
        ) from exc
    finally:
        conn.close()
    if row and row[0]:
        return str(row[0])
    raise ReplicationResourceError(f"Creating replication slot {name!r} returned nothing.",
                                   reason=Reason.UNKNOWN)


def drop_slot(conn: psycopg.Connection, name: str, *, wait_s: float) -> tuple[bool, list[int]]:
    """Drop the slot, first terminating a walsender that holds it (bounded wait).

    Returns (dropped, terminated pids). A slot that does not exist is not an error (idempotent).
    """
    terminated: list[int] = []
    deadline = time.monotonic() + wait_s
    while True:
        state = read_slot(conn, name)
        if not state.exists:
            return False, terminated
        pid = state.info.active_pid
        if not state.info.active or pid is None:
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
                log.info("slot_dropped", slot=name, terminated=terminated)
                return True, terminated
            except psycopg.errors.UndefinedObject:
                return False, terminated
            except psycopg.errors.ObjectInUse:
                pass  # grabbed again between our read and the drop: loop and terminate
        elif pid not in terminated:
            try:
                conn.execute("SELECT pg_terminate_backend(%s)", [pid])
            except psycopg.errors.InsufficientPrivilege as exc:
                raise PermissionDenied(
                    f"Replication slot {name!r} is held by backend pid {pid}, and this user "
                    "may not terminate it.",
                    fix="Stop that consumer, or run disable as a role with pg_signal_backend.",
                ) from exc
            terminated.append(pid)
            log.info("slot_holder_terminated", slot=name, pid=pid)
        if time.monotonic() > deadline:
            raise ReplicationResourceError(
                f"Replication slot {name!r} is still in use by pid {pid} after {wait_s:.0f}s.",
                reason=Reason.SLOT_IN_USE,
            )
        time.sleep(0.05)

"""What a source looks like now and what it did (SPEC §3 `status`, `jobs`): read-only, no
lease; a destination that cannot be read is reported, not raised."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime

from cdcengine.config import SourceConfig, TableConfig
from cdcengine.control.lag import effective_thresholds, level_of
from cdcengine.errors import classify_error
from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine.sink.base import kinds_for
from cdcengine.sink.delta import DeltaSink
from cdcengine.source.adapter import HealthProbe, PublicationInfo, SlotInfo
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, as_enabled, open_store
from cdcengine.state.base import Stall, StateStore, TableState, live_stall, shown_state
from cdcengine.state.settings import effective_settings


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkerView:
    reason: str
    message: str
    at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StallView:
    """A running daemon's watchdog finds the source unable to make progress (see
    `cdcengine.serve.watchdog`): since when, why, and what each of its threads is doing."""

    since: str
    at: str  # when the watchdog found it, or last renewed the thread picture
    seconds: float  # stalled for, as of `at`
    message: str
    work: tuple[dict[str, object], ...]  # lane (stream | snapshot), what, waited_s
    threads: tuple[dict[str, object], ...]  # name, doing, stack (outermost call first)
    host: str
    pid: int

    @classmethod
    def of(cls, stall: Stall) -> StallView:
        return cls(since=stall.since.isoformat(), at=stall.at.isoformat(),
                   seconds=round((stall.at - stall.since).total_seconds(), 1),
                   message=stall.message, host=stall.host, pid=stall.pid,
                   work=tuple(dataclasses.asdict(w) for w in stall.work),
                   threads=tuple({"name": t.name, "doing": t.doing, "stack": list(t.stack)}
                                 for t in stall.threads))


@dataclass(frozen=True, slots=True, kw_only=True)
class TableStatus:
    name: str
    mode: str
    state: str
    applied_lsn: str | None = None  # from the Delta log: every change up to it is in Delta
    rows: int | None = None  # consolidated: live (not deleted) rows; append: change rows
    reason: str | None = None
    remedy: str | None = None
    delta: tuple[DeltaTableView, ...] = ()  # per Delta table of this source table
    delta_error: str | None = None  # the destination could not be read
    # the table's last snapshot run (rows, rows_total, rows_per_s, eta_s, chunks_done,
    # chunks_total, resumed, finished); None when never snapshotted with chunk progress
    snapshot: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaTableView:
    kind: str  # consolidated | append
    path: str
    exists: bool
    version: int | None = None  # the Delta table's own version
    applied_lsn: str | None = None
    rows: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingsView:
    auto_drop_slot: bool
    lag_warning_threshold_mb: int
    lag_critical_threshold_mb: int
    origin: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """One source as `cdcengine status --json` prints it (SPEC §3), plus a few useful keys."""

    name: str
    state: str
    enabled: bool
    management_mode: str
    dsn: str  # masked
    destination: str
    broken: MarkerView | None
    paused: MarkerView | None
    slot: SlotInfo
    publication: PublicationInfo
    settings: SettingsView
    tables: tuple[TableStatus, ...]
    enabled_at: str | None = None
    consistent_point: str | None = None
    system_identifier: str | None = None
    lease: dict[str, object] | None = None
    # SPEC §7 as this source sees it: effective thresholds and where retained WAL stands
    lag: dict[str, object] = field(default_factory=dict)
    temporary_slots: tuple[SlotInfo, ...] = ()
    extra: dict[str, object] = field(default_factory=dict)
    # set while `state` is `stalled` (a running daemon's watchdog recorded it)
    stalled: StallView | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _snapshot_view(store: StateStore, source: str, table: str) -> dict[str, object] | None:
    p = store.get_snapshot_progress(source, table)
    if p is None:
        return None
    return {"rows": p.rows_done, "rows_total": p.rows_total, "rows_per_s": p.rows_per_s,
            "eta_s": p.eta_s, "chunks_done": p.chunks_done, "chunks_total": p.chunks_total,
            "resumed": p.resumed, "finished": p.finished,
            "updated_at": p.updated_at.isoformat()}


def cdc_status(source: SourceConfig, *, state: StateArg = None) -> Status:
    """State, slot (lag, retained WAL), publication, settings with origin, broken reason, tables.

    Raises a `CDCError` when the source cannot be reached; a broken source is reported, not
    raised.
    """
    with open_store(state) as store:
        rec = store.get_source(source.name)
        target = as_enabled(rec, source)
        adapter = adapter_for(source)
        probe = adapter.probe_health(target, install_id=store.install_id())
        slot, pub = probe.slot, probe.publication
        eff = effective_settings(source, store)
        settings = {k: v for k, (v, _) in eff.items()}
        lag = _lag_view(probe, int(settings["lag_warning_threshold_mb"]),  # type: ignore[call-overload]
                        int(settings["lag_critical_threshold_mb"]))  # type: ignore[call-overload]
        records = {t.name: t for t in store.list_tables(source.name)} if rec else {}
        tables = []
        for tc in source.table_configs:
            tr = records.get(tc.name)
            state_ = tr.state if tr else (TableState.PENDING if rec and rec.enabled else None)
            tables.append(TableStatus(name=tc.name, mode=str(tc.mode),
                                      state=str(state_) if state_ else "disabled",
                                      reason=tr.reason if tr else None,
                                      remedy=tr.remedy if tr else None,
                                      snapshot=_snapshot_view(store, source.name, tc.name),
                                      **_delta_status(source, tc)))
        lease = store.get_lease(source.name)
        return Status(
            name=source.name,
            state=str(shown_state(rec)),
            enabled=bool(rec and rec.enabled),
            management_mode=str(target.management_mode),
            dsn=source.masked_dsn,
            destination=source.destination,
            broken=_marker(rec.broken if rec else None),
            paused=_marker(rec.paused if rec else None),
            slot=slot, publication=pub,
            settings=SettingsView(
                auto_drop_slot=bool(settings["auto_drop_slot"]),
                lag_warning_threshold_mb=int(settings["lag_warning_threshold_mb"]),  # type: ignore[call-overload]
                lag_critical_threshold_mb=int(settings["lag_critical_threshold_mb"]),  # type: ignore[call-overload]
                origin={k: o for k, (_, o) in eff.items()}),
            tables=tuple(tables),
            enabled_at=rec.enabled_at.isoformat() if rec and rec.enabled_at else None,
            consistent_point=format_lsn(rec.consistent_point) if rec and rec.consistent_point
            else None,
            system_identifier=rec.system_identifier if rec else None,
            lease={"purpose": lease.purpose, "host": lease.host, "pid": lease.pid,
                   "since": lease.acquired_at.isoformat()} if lease else None,
            lag=lag, temporary_slots=probe.temporary_slots,
            stalled=StallView.of(stall) if (stall := live_stall(rec)) is not None else None,
        )


def _lag_view(probe: HealthProbe, warning_mb: int, critical_mb: int) -> dict[str, object]:
    t = effective_thresholds(warning_mb, critical_mb, probe.retention_cap_mb)
    retained = probe.retained_wal_bytes
    return {"retained_wal_bytes": retained, "lag_bytes": probe.slot.lag_bytes,
            "warning_mb": t.warning_mb, "critical_mb": t.critical_mb,
            "configured_critical_mb": t.configured_critical_mb,
            "max_slot_wal_keep_size_mb": t.cap_mb, "lowered_by_cap": t.lowered_by_cap,
            "level": str(level_of(retained, t)) if retained is not None else None}


def _delta_status(source: SourceConfig, tc: TableConfig) -> dict[str, object]:
    """What the Delta log says of one source table: applied LSN (the minimum over its Delta
    tables: everything up to it is in all of them) and row counts. A destination that cannot
    be read is reported, never raised: status must work while the lake is down."""
    sink = DeltaSink.for_source(source)
    views: list[DeltaTableView] = []
    try:
        for kind in kinds_for(tc.mode):
            info = sink.table_info(tc.ref, kind)
            views.append(DeltaTableView(kind=str(kind), path=info.path, exists=info.exists,
                                        version=info.version,
                                        applied_lsn=format_lsn(info.applied_version)
                                        if info.applied_version is not None else None,
                                        rows=info.rows))
    except Exception as exc:  # noqa: BLE001 - reported in the status, with its reason
        return {"delta_error": classify_error(exc).message}
    applied = [v.applied_lsn for v in views]
    lsn = (format_lsn(min(parse_lsn(a) for a in applied if a is not None))
           if applied and all(a is not None for a in applied) else None)
    rows = views[-1].rows if views else None  # consolidated when written, else the log
    return {"applied_lsn": lsn, "rows": rows, "delta": tuple(views)}


def _marker(m: object) -> MarkerView | None:
    if m is None:
        return None
    return MarkerView(reason=m.reason, message=m.message, at=m.at.isoformat())  # type: ignore[attr-defined]


# ---- jobs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JobView:
    """One recent run of a source (`cdcengine jobs`): LSNs as X/Y text, times in UTC."""

    id: int
    source: str
    kind: str
    status: str  # running | ok | failed | interrupted
    started_at: datetime
    ended_at: datetime | None
    duration_s: float | None
    batches: int
    rows: dict[str, int]
    first_lsn: str | None
    last_lsn: str | None
    error_reason: str | None
    error_message: str | None
    host: str
    pid: int
    recent_batches: tuple[dict[str, object], ...] = ()

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for key in ("started_at", "ended_at"):
            value = d[key]
            d[key] = value.isoformat() if value is not None else None
        return d


def list_jobs(source: SourceConfig, *, state: StateArg = None, limit: int = 20,
              batches: int = 5) -> list[JobView]:
    """Recent runs of `source`, newest first, each with its `batches` newest batches; from the
    state store's bounded run history (SPEC §3 `jobs`). Reads only; takes no lease."""
    def lsn(value: int | None) -> str | None:
        return format_lsn(value) if value is not None else None

    with open_store(state) as store:
        out = []
        for r in store.list_runs(source.name, limit=limit):
            recent = tuple({"at": b.at.isoformat(), "first_lsn": lsn(b.first_lsn),
                            "last_lsn": lsn(b.last_lsn), "rows": dict(b.rows),
                            "duration_s": b.duration_s}
                           for b in (store.list_batches(r.id, limit=batches) if batches else ()))
            out.append(JobView(
                id=r.id, source=r.source, kind=r.kind, status=str(r.status),
                started_at=r.started_at, ended_at=r.ended_at, duration_s=r.duration_s,
                batches=r.batches, rows=dict(r.rows), first_lsn=lsn(r.first_lsn),
                last_lsn=lsn(r.last_lsn), error_reason=r.error_reason,
                error_message=r.error_message, host=r.host, pid=r.pid, recent_batches=recent))
        return out

"""The library API (SPEC §4): plain functions over a `SourceConfig`, safe to call from a web
request.

No hidden globals: each call opens what it needs (the state store unless one is passed, the
adapter's short-lived connections) and closes it. Results are JSON-safe dataclasses
(`dataclasses.asdict`) without secrets. Commands that change a source take its lease in the state
store first, so a CLI call and a running daemon never act on one source at once; a held lease
raises `LeaseHeld` (retryable) naming the holder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime

import structlog

from cdcengine.config import (
    MAX_THRESHOLD_MB,
    SETTINGS_KEYS,
    SourceConfig,
    TableConfig,
)
from cdcengine.control.lag import effective_thresholds, level_of
from cdcengine.control.verify import DEFAULT_EXAMPLES as DEFAULT_VERIFY_EXAMPLES
from cdcengine.control.verify import DEFAULT_WAIT_S as DEFAULT_VERIFY_WAIT_S
from cdcengine.control.verify import Comparison as Comparison  # re-exported: verify's results
from cdcengine.control.verify import RowDifference as RowDifference
from cdcengine.control.verify import TableVerify as TableVerify
from cdcengine.control.verify import VerifyResult, verify_table
from cdcengine.errors import (
    CDCError,
    ConfigError,
    NotEnabled,
    PrerequisitesFailed,
    Reason,
    ReplicationResourceError,
    classify_error,
)
from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine.names import TableRef
from cdcengine.sink.base import kinds_for
from cdcengine.sink.delta import DeltaSink
from cdcengine.sink.destination import check_destination
from cdcengine.source.adapter import Check, HealthProbe, PublicationInfo, SlotInfo, TableInfo
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, as_enabled, open_store, with_overrides
from cdcengine.state.base import (
    SourceRecord,
    Stall,
    StateStore,
    TableOptions,
    TableState,
    hold_lease,
    live_stall,
    shown_state,
)

log = structlog.get_logger("cdcengine.api")

# A command's lease outlives a slow statement; the slot-creation wait is added on top.
COMMAND_LEASE_TTL_S = 120.0


def _known_slot(rec: SourceRecord | None, source: SourceConfig) -> bool:
    """The state store recorded that this install created the source's slot."""
    return bool(rec and rec.enabled and rec.slot_name == source.slot_name)


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EnableResult:
    source: str
    already_enabled: bool
    management_mode: str
    slot_name: str
    publication_name: str
    slot_created: bool
    slot_adopted: bool
    publication_created: bool
    publication_adopted: bool
    consistent_point: str | None
    tables: tuple[str, ...]
    checks: tuple[Check, ...] = ()
    # on an enabled source: the table list's changes (a table whose mode changed is `changed`)
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    daemon_running: bool = False  # a running daemon takes the changes up while it streams

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DisableResult:
    source: str
    already_disabled: bool
    slot_dropped: bool
    publication_dropped: bool
    terminated_pids: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingsResult:
    source: str
    changed: tuple[str, ...]  # keys whose effective value changed; empty when unchanged
    settings: dict[str, object]

    @property
    def unchanged(self) -> bool:
        return not self.changed

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"unchanged": self.unchanged}


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


# ---- functions ------------------------------------------------------------------------------


def check_prerequisites(source: SourceConfig, *, state: StateArg = None) -> list[Check]:
    """Every prerequisite check, all reported (SPEC §3 `check`). Raises only when unreachable."""
    with open_store(state) as store:
        rec = store.get_source(source.name)
        checks = adapter_for(source).check_prerequisites(
            as_enabled(rec, with_overrides(source, store)), install_id=store.install_id(),
            known_slot=_known_slot(rec, source))
    return [*checks, *check_destination(source.name, source.destination)]


def discover_tables(source: SourceConfig) -> list[TableInfo]:
    """The source database's tables and whether (and why not) each can be captured."""
    return adapter_for(source).discover_tables(source)


def enable_cdc(
    source: SourceConfig, *, state: StateArg = None, slot_wait_s: float = 30.0
) -> EnableResult:
    """Provision CDC for a source: re-run the checks, then publication (managed) and slot.

    Safe to call repeatedly: on an enabled source it adopts what exists, brings the managed
    publication's table list in line with the config, registers the tables (added, removed, mode
    changed: `added` / `removed` / `changed`), and returns `already_enabled=True` — also while a
    daemon streams the source (`daemon_running`): that daemon snapshots added tables beside its
    stream and stops writing removed ones within seconds. It refuses (changing nothing) when any
    check fails (`PrerequisitesFailed` with `.checks`), when slot name, publication name or mode
    differ from what was enabled (`immutable_setting`), when a slot or publication of that name
    is not provably this install's, and when an enabled source lost its slot (that needs
    `repair`, which re-snapshots; recreating the slot silently would leave a gap). It never
    removes tables from Delta, never drops anything it did not create, and on failure undoes
    exactly what it created.
    """
    with open_store(state) as store, _enable_lease(store, source.name, slot_wait_s) as leased:
        rec = store.get_source(source.name)
        if rec and rec.enabled:
            for key in ("slot_name", "publication_name", "management_mode"):
                was, now = getattr(rec, key), str(getattr(source, key))
                if was != now:
                    raise CDCError(
                        f"source {source.name!r}: {key} is {now!r} in the config but CDC was "
                        f"enabled with {was!r}; it cannot change while enabled.",
                        reason=Reason.IMMUTABLE_SETTING)
        adapter = adapter_for(source)
        install_id = store.install_id()
        known = _known_slot(rec, source)
        checks = adapter.check_prerequisites(source, install_id=install_id, known_slot=known)
        refuse_failed_checks(source, checks)
        if rec and rec.enabled and not adapter.slot_status(source).exists:
            raise ReplicationResourceError(
                f"source {source.name!r} is enabled but its replication slot "
                f"{source.slot_name!r} is gone; changes made since were not captured.",
                reason=Reason.SLOT_MISSING)
        result = adapter.provision(source, install_id=install_id, known_slot=known,
                                   slot_wait_s=slot_wait_s)
        tables = {tc.name: str(tc.mode) for tc in source.table_configs}
        have = {t.name: t.mode for t in store.list_tables(source.name)} \
            if rec and rec.enabled else {}
        try:
            if rec and rec.enabled:
                # a daemon streaming this source picks these changes up (a table added, removed
                # or switched to another mode) at its next check, see `cdcengine.pipeline.tablesets`
                for name in set(have) - set(tables):  # left the config: no longer captured
                    store.remove_table(source.name, name)
            else:
                lsn = result.consistent_point
                store.record_enabled(
                    source.name, management_mode=str(source.management_mode),
                    slot_name=source.slot_name, publication_name=source.publication_name,
                    consistent_point=parse_lsn(lsn) if lsn else None,
                    system_identifier=result.identity.system_identifier,
                    timeline=result.identity.timeline, tables=tables)
            for tc in source.table_configs:
                store.upsert_table(source.name, tc.name, str(tc.mode), options=TableOptions(
                    columns=tc.columns, primary_key=tc.primary_key))
        except BaseException:
            adapter.undo_provision(source, result)
            raise
        log.info("cdc_enabled", source=source.name, slot=source.slot_name,
                 publication=source.publication_name, slot_created=result.slot_created,
                 already_enabled=bool(rec and rec.enabled))
        return EnableResult(
            source=source.name, already_enabled=bool(rec and rec.enabled),
            management_mode=str(source.management_mode), slot_name=source.slot_name,
            publication_name=source.publication_name, slot_created=result.slot_created,
            slot_adopted=result.slot_adopted, publication_created=result.publication_created,
            publication_adopted=result.publication_adopted,
            consistent_point=result.consistent_point, tables=tuple(tables), checks=tuple(checks),
            added=tuple(n for n in tables if have and n not in have),
            removed=tuple(sorted(set(have) - set(tables))),
            changed=tuple(n for n, m in tables.items() if n in have and have[n] != m),
            daemon_running=not leased)


def refuse_failed_checks(source: SourceConfig, checks: Sequence[Check], *,
                         action: str | None = None,
                         ignore: frozenset[str] = frozenset()) -> None:
    """`PrerequisitesFailed` (carrying every check) when a check not in `ignore` failed."""
    failed = [c for c in checks if not c.ok and c.name not in ignore]
    if failed:
        names = ", ".join(sorted({c.name + (f" ({c.table})" if c.table else "")
                                  for c in failed}))
        refused = f"{action} refused: " if action else ""
        raise PrerequisitesFailed(
            f"source {source.name!r}: {refused}{len(failed)} prerequisite check(s) failed: "
            f"{names}. Nothing was changed.", checks=list(checks))


def disable_cdc(source: SourceConfig, *, state: StateArg = None, wait_s: float = 10.0
                ) -> DisableResult:
    """Drop what the engine owns for this source and record it disabled. Idempotent.

    Managed: the slot and the marked publication; self_managed: the slot only (the user's
    publication is never touched). A slot still held by another backend is freed by terminating
    that walsender, waiting at most `wait_s`. A slot or publication this install cannot prove it
    created is left alone, and `notes` says so.
    """
    with open_store(state) as store, hold_lease(store, source.name, purpose="disable",
                                            ttl_s=COMMAND_LEASE_TTL_S + wait_s, wait_s=0):
        rec = store.get_source(source.name)
        target = as_enabled(rec, source)
        td = adapter_for(source).teardown(target, install_id=store.install_id(),
                                          known_slot=_known_slot(rec, target), wait_s=wait_s)
        was_enabled = bool(rec and rec.enabled)
        if rec is not None:
            store.record_disabled(source.name)
        log.info("cdc_disabled", source=source.name, slot_dropped=td.slot_dropped,
                 publication_dropped=td.publication_dropped)
        return DisableResult(
            source=source.name,
            already_disabled=not (was_enabled or td.slot_dropped or td.publication_dropped),
            slot_dropped=td.slot_dropped, publication_dropped=td.publication_dropped,
            terminated_pids=td.terminated_pids, notes=td.notes)


@contextmanager
def _enable_lease(store: StateStore, source: str, slot_wait_s: float) -> Iterator[bool]:
    """`enable` holds the lease (True), except on an enabled source a daemon streams (False):
    then it only adopts the slot, brings the publication in line and registers the tables,
    which the daemon reads at its next check."""
    rec = store.get_source(source)
    if rec is not None and rec.enabled:
        with _lease_unless_daemon(store, source, "enable", wait_s=0) as leased:
            yield leased
        return
    with hold_lease(store, source, purpose="enable", ttl_s=COMMAND_LEASE_TTL_S + slot_wait_s,
                    wait_s=0):
        yield True


@contextmanager
def _lease_unless_daemon(store: StateStore, source: str, purpose: str, *,
                         wait_s: float = 5) -> Iterator[bool]:
    """The source's lease for a change a running daemon also accepts queued in the state store
    (it reads settings and resync requests there): with a daemon holding the lease, the change
    is written without it (False) and the daemon applies it at its next check."""
    held = store.get_lease(source)
    if held is not None and held.purpose == "daemon":
        yield False
        return
    with hold_lease(store, source, purpose=purpose, ttl_s=COMMAND_LEASE_TTL_S, wait_s=wait_s):
        yield True


def _effective_settings(source: SourceConfig, store: StateStore) -> dict[str, tuple[object, str]]:
    overrides = store.get_settings(source.name)
    out: dict[str, tuple[object, str]] = {}
    for key in SETTINGS_KEYS:
        if key in overrides:
            ov = overrides[key]
            out[key] = (ov.value, f"settings ({ov.updated_at:%Y-%m-%d %H:%M:%S} UTC)")
        else:
            out[key] = (getattr(source, key), source.setting_origin(key))
    return out


def update_cdc_settings(
    source: SourceConfig, *, state: StateArg = None, **changes: object
) -> SettingsResult:
    """Change tuning only: auto_drop_slot and the two lag thresholds (ints >= 1, warning <
    critical, checked against the effective values). Kept in the state store, where it wins over
    the file; a running daemon applies it at its next lag check. Slot name, publication and mode
    are immutable here. `.changed` is empty when nothing changed."""
    unknown = sorted(set(changes) - set(SETTINGS_KEYS))
    if unknown:
        immutable = unknown[0] in ("slot_name", "publication_name", "management_mode")
        raise ConfigError(f"settings: {unknown[0]!r} cannot be changed here; only "
                          f"{', '.join(SETTINGS_KEYS)} (slot name, publication and mode are "
                          "immutable: disable, then enable)",
                          reason=Reason.IMMUTABLE_SETTING if immutable else Reason.CONFIG_INVALID)
    for key, value in changes.items():
        if key == "auto_drop_slot":
            if not isinstance(value, bool):
                raise ConfigError(f"settings: auto_drop_slot must be true or false "
                                  f"(got {value!r})")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"settings: {key} must be an integer (got {value!r})")
        elif value < 1:
            raise ConfigError(f"settings: {key} must be >= 1 (got {value})")
        elif value > MAX_THRESHOLD_MB:
            raise ConfigError(f"settings: {key} must be at most {MAX_THRESHOLD_MB} (1 PiB; got "
                              f"{value})")
    with open_store(state) as store, _lease_unless_daemon(store, source.name, "settings"):
        rec = store.get_source(source.name)
        if not (rec and rec.enabled):
            raise NotEnabled(f"source {source.name!r}: CDC is not enabled; settings apply to "
                             "enabled sources (run `cdcengine enable`).")
        current = {k: v for k, (v, _) in _effective_settings(source, store).items()}
        new = current | changes
        if new["lag_warning_threshold_mb"] >= new["lag_critical_threshold_mb"]:  # type: ignore[operator]
            raise ConfigError(
                f"settings: the warning threshold ({new['lag_warning_threshold_mb']} MB) must be "
                f"less than the critical threshold ({new['lag_critical_threshold_mb']} MB)")
        changed = tuple(k for k in SETTINGS_KEYS if k in changes and changes[k] != current[k])
        for key in changed:
            store.set_setting(source.name, key, new[key])  # type: ignore[arg-type]
        if changed:
            log.info("settings_updated", source=source.name, changed=list(changed))
        return SettingsResult(source=source.name, changed=changed,
                              settings={k: new[k] for k in SETTINGS_KEYS})


@dataclass(frozen=True, slots=True, kw_only=True)
class ResyncResult:
    source: str
    table: str
    queued: bool
    daemon_running: bool  # a running daemon holds the lease and performs it while streaming

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def resync_table(source: SourceConfig, table: str, *, state: StateArg = None) -> ResyncResult:
    """Queue a re-snapshot of one table (SPEC §3 `resync`): the table becomes `pending` with a
    resync request in the state store. A running daemon (which holds the source's lease)
    performs it within seconds, beside the stream: the other tables keep streaming meanwhile;
    without a daemon the next `run` does it. The swap into Delta is one commit per Delta table.
    """
    from cdcengine.pipeline.resync import request_resync  # pipeline-side module: imported lazily

    tc = tables_to_verify(source, table)[0]
    with open_store(state) as store:
        rec = store.get_source(source.name)
        if not (rec and rec.enabled):
            raise NotEnabled(f"source {source.name!r}: CDC is not enabled; run "
                             "`cdcengine enable` first.")
        held = store.get_lease(source.name)
        daemon = held is not None and held.purpose == "daemon"
        with _lease_unless_daemon(store, source.name, "resync"):
            request_resync(store, source.name, tc)
    log.info("resync_requested", source=source.name, table=tc.name, daemon_running=daemon)
    return ResyncResult(source=source.name, table=tc.name, queued=True, daemon_running=daemon)


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
        eff = _effective_settings(source, store)
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



# ---- verify ---------------------------------------------------------------------------------


def tables_to_verify(source: SourceConfig, table: str | None = None) -> list[TableConfig]:
    """The source's table configs `verify` covers: all, or the one named (`schema.table`, bare
    → public). Raises `ConfigError` for a table that is not in the source's config."""
    if table is None:
        return list(source.table_configs)
    try:
        wanted = TableRef.parse(table).qualified
    except ValueError as exc:
        raise ConfigError(f"verify: {exc}") from None
    tcs = [tc for tc in source.table_configs if tc.name == wanted]
    if not tcs:
        raise ConfigError(f"verify: table {table!r} is not one of source {source.name!r}'s "
                          f"tables ({', '.join(tc.name for tc in source.table_configs)})")
    return tcs


def verify(
    source: SourceConfig,
    table: str | None = None,
    *,
    state: StateArg = None,
    wait_s: float = DEFAULT_VERIFY_WAIT_S,
    examples: int = DEFAULT_VERIFY_EXAMPLES,
) -> VerifyResult:
    """Compare the source tables (or one, `table`) with their Delta tables (SPEC §3 `verify`).

    Safe while the daemon streams: each table is read under an exactly positioned source
    snapshot C; the comparison waits at most `wait_s` for Delta to hold every change up to C
    (else that table is `not_caught_up`), and rows changed in Delta after C are in flux, not
    differences. Per table: counts and up to `examples` keys of rows missing in Delta, extra in
    Delta and different (with the columns). Read-only: takes no lease, changes nothing. Raises
    `ConfigError` for a table not in the source's config, a `CDCError` when the source cannot
    be reached. See `cdcengine.control.verify`.
    """
    tcs = tables_to_verify(source, table)
    with open_store(state) as store:
        rec = store.get_source(source.name)
        target = as_enabled(rec, source)
    adapter = adapter_for(source)

    def confirmed() -> int | None:
        if not (rec and rec.enabled):
            return None
        lsn = adapter.slot_status(target).confirmed_flush_lsn
        return parse_lsn(lsn) if lsn else None

    return VerifyResult(source=source.name, tables=tuple(
        verify_table(adapter, target, tc, confirmed_lsn=confirmed, wait_s=wait_s,
                     examples=examples, enabled=bool(rec and rec.enabled)) for tc in tcs))


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

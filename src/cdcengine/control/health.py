"""Slot health (SPEC §7): one pass of the lag policy over one source, and `sweep`.

A pass reads the source's slot, the engine's temporary slots, the publication and the server's
WAL retention cap in one probe, then:

- a slot that is gone, or invalidated by PostgreSQL (`wal_status = lost`), or a publication that
  is gone or no longer covers a captured table → `broken` with the reason (never re-created
  behind the user's back: changes were lost, `repair` re-snapshots);
- retained WAL (`current − restart_lsn`: what fills the disk) against the effective thresholds
  (critical lowered to 80 % of `max_slot_wal_keep_size`) → `lag.decide` says what to do.

The thresholds and auto_drop come from the config with the `settings` overrides of the state
store applied at every pass, so a change reaches a running daemon at its next check.

Who may act: the caller holds the source's lease, or is the daemon whose pipeline holds it
(`act=False` only reads and reports, for a source another process streams).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import structlog

from cdcengine.config import SourceConfig
from cdcengine.control.lag import (
    MB,
    Action,
    Level,
    Thresholds,
    decide,
    effective_thresholds,
    level_of,
)
from cdcengine.control.prune import PruneReport, prune_removed
from cdcengine.errors import LeaseHeld, Reason, StopReason, classify_error
from cdcengine.source.adapter import HealthProbe, SourceAdapter
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, as_enabled, open_store
from cdcengine.state.base import SourceRecord, SourceState, StateStore, TableState
from cdcengine.state.settings import with_overrides

log = structlog.get_logger("cdcengine.control.health")


class SlotMetrics(Protocol):
    """What a pass reports to the daemon's metrics (`cdcengine.metrics.Metrics`)."""

    def observe_slot(self, source: str, *, lag_bytes: int | None,
                     retained_wal_bytes: int | None) -> None: ...
    def count_auto_drop(self, source: str) -> None: ...
    def set_source_state(self, source: str, state: str) -> None: ...


DROP_WAIT_S = 10.0  # bounded wait for another walsender holding the slot to go

# Broken reasons that describe the slot itself: the lag policy has nothing left to act on.
_SLOT_GONE = frozenset({Reason.SLOT_MISSING, Reason.SLOT_INVALIDATED,
                        Reason.AUTO_DROPPED_CRITICAL_LAG})
# A broken state a pass may lift again by itself.
_SELF_CLEARING = str(Reason.CRITICAL_LAG_SELF_MANAGED)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """What one pass saw and did for one source (JSON-safe)."""

    source: str
    checked: bool  # False: not enabled, or nothing could be read
    action: str  # lag.Action, or slot_missing / slot_invalidated / publication_missing / none
    state: str | None = None  # the source's state after the pass
    level: str | None = None  # ok | warning | critical
    lag_bytes: int | None = None
    retained_wal_bytes: int | None = None
    wal_status: str | None = None
    warning_mb: int | None = None
    critical_mb: int | None = None  # effective
    configured_critical_mb: int | None = None
    retention_cap_mb: int | None = None
    dropped: bool = False
    message: str = ""
    error: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def thresholds_for(source: SourceConfig, cap_mb: int | None) -> Thresholds:
    return effective_thresholds(source.lag_warning_threshold_mb,
                                source.lag_critical_threshold_mb, cap_mb)


def check_source(
    source: SourceConfig,
    store: StateStore,
    *,
    adapter: SourceAdapter | None = None,
    metrics: SlotMetrics | None = None,
    stop_stream: Callable[[], object] | None = None,
    act: bool = True,
    drop_wait_s: float = DROP_WAIT_S,
) -> HealthReport:
    """One pass of the policy for `source` (see the module doc). Raises when the source cannot
    be reached; a broken or lagging source is reported, not raised.

    `stop_stream` stops this process's own stream of the source (finishing its commit) before an
    auto-drop, so it does not simply reconnect to a slot that is about to go.
    """
    rec = store.get_source(source.name)
    if not (rec and rec.enabled):
        return HealthReport(source=source.name, checked=False, action="none",
                            state=str(rec.state if rec else SourceState.DISABLED),
                            message="CDC is not enabled")
    eff = as_enabled(rec, with_overrides(source, store))
    adapter = adapter or adapter_for(source)
    probe = adapter.probe_health(eff, install_id=store.install_id())
    t = thresholds_for(eff, probe.retention_cap_mb)
    retained = probe.retained_wal_bytes
    if metrics is not None:
        metrics.observe_slot(source.name, lag_bytes=probe.slot.lag_bytes,
                             retained_wal_bytes=retained)
    base = dict(source=source.name, checked=True, lag_bytes=probe.slot.lag_bytes,
                retained_wal_bytes=retained, wal_status=probe.slot.wal_status,
                warning_mb=t.warning_mb, critical_mb=t.critical_mb,
                configured_critical_mb=t.configured_critical_mb,
                retention_cap_mb=t.cap_mb)
    pass_ = _Pass(eff, store, rec, probe, t, adapter=adapter, metrics=metrics,
                  stop_stream=stop_stream, act=act, drop_wait_s=drop_wait_s)
    action, level, message, dropped = pass_.run()
    after = store.get_source(source.name)
    state = str(after.state) if after else None
    if metrics is not None and state is not None:
        metrics.set_source_state(source.name, state)
    return HealthReport(action=action, level=level, message=message, dropped=dropped,
                        state=state, **base)  # type: ignore[arg-type]


def resources_lost(store: StateStore, source: SourceConfig, probe: HealthProbe
                   ) -> tuple[Reason, str] | None:
    """Why the source's changes are (or were) no longer captured, if they are not: slot gone
    or invalidated, publication gone or no longer covering a captured table."""
    slot, pub = probe.slot, probe.publication
    if not slot.exists:
        return Reason.SLOT_MISSING, (
            f"replication slot {slot.name!r} is gone (dropped outside the engine); "
            "changes made since it went were not captured")
    if slot.wal_status == "lost":
        return Reason.SLOT_INVALIDATED, (
            f"PostgreSQL invalidated replication slot {slot.name!r} (wal_status lost: it "
            "retained more WAL than max_slot_wal_keep_size); changes were lost")
    if not pub.exists:
        return Reason.PUBLICATION_MISSING, (
            f"publication {pub.name!r} is gone; changes are no longer published")
    # a table that left the config (and so the managed publication) is no longer captured
    configured = {tc.name for tc in source.table_configs}
    captured = {t.name for t in store.list_tables(source.name)
                if t.state in (TableState.STREAMING, TableState.SNAPSHOTTING)
                and t.name in configured}
    missing = sorted(captured - set(pub.tables) - set(probe.gone_tables))
    if missing:
        return Reason.PUBLICATION_MISSING, (
            f"publication {pub.name!r} no longer covers {', '.join(missing)}; their "
            "changes are no longer published")
    return None


class _Pass:
    def __init__(self, source: SourceConfig, store: StateStore, rec: SourceRecord,
                 probe: HealthProbe, t: Thresholds, *, adapter: SourceAdapter,
                 metrics: SlotMetrics | None, stop_stream: Callable[[], object] | None,
                 act: bool, drop_wait_s: float) -> None:
        self.source, self.store, self.rec, self.probe, self.t = source, store, rec, probe, t
        self.adapter, self.metrics, self.stop_stream = adapter, metrics, stop_stream
        self.act, self.drop_wait_s = act, drop_wait_s

    @property
    def name(self) -> str:
        return self.source.name

    def run(self) -> tuple[str, str | None, str, bool]:
        broken = self.rec.broken
        if broken is not None and broken.reason in _SLOT_GONE:
            return "none", None, f"broken ({broken.reason}): run `cdcengine repair`", False
        if self.act:
            self._stop_gone_tables()
        lost = resources_lost(self.store, self.source, self.probe)
        if lost is not None:
            reason, message = lost
            if self.act and (broken is None or broken.reason != reason):
                self.store.set_broken(self.name, str(reason), message)
                log.error("source_broken", source=self.name, reason=str(reason),
                          message=message)
            return str(reason), None, message, False
        retained = self.probe.retained_wal_bytes
        if retained is None:
            return "none", None, "the slot reports no retained WAL yet", False
        level = level_of(retained, self.t)
        action = decide(level, managed=str(self.source.management_mode) == "managed",
                        auto_drop=self.source.auto_drop_slot)
        message = self._describe(level, retained)
        if not self.act:
            return str(action), str(level), message, False
        dropped = self._apply(action, message)
        return str(action), str(level), message, dropped

    def _stop_gone_tables(self) -> None:
        """A captured table dropped (or renamed) at the source stops alone with why and what to
        do; its Delta tables keep their last state, the other tables stream on."""
        gone = set(self.probe.gone_tables)
        for rec in self.store.list_tables(self.name):
            if rec.name not in gone or rec.state is TableState.STOPPED:
                continue
            self.store.set_table_state(
                self.name, rec.name, TableState.STOPPED,
                reason=f"{StopReason.TABLE_GONE}: no table named {rec.name} exists at the source "
                       "any more (dropped or renamed); its Delta tables keep their last state",
                remedy=f"remove {rec.name} from tables and run `cdcengine enable`, or "
                       f"recreate it and run `cdcengine resync --source {self.name} --table "
                       f"{rec.name}`")
            log.warning("table_stopped", source=self.name, table=rec.name,
                        reason=str(StopReason.TABLE_GONE),
                        message="the table no longer exists at the source")

    # ---- lag ----------------------------------------------------------------------------------
    def _describe(self, level: Level, retained: int) -> str:
        held = f"retained WAL {retained / MB:.1f} MB"
        cap = (f" (lowered to 80 % of max_slot_wal_keep_size {self.t.cap_mb} MB)"
               if self.t.lowered_by_cap else "")
        if level is Level.CRITICAL:
            return f"{held} >= critical threshold {self.t.critical_mb} MB{cap}"
        if level is Level.WARNING:
            return f"{held} >= warning threshold {self.t.warning_mb} MB"
        return f"{held} < warning threshold {self.t.warning_mb} MB"

    def _apply(self, action: Action, message: str) -> bool:
        rec, name = self.rec, self.name
        marked = rec.broken is not None or rec.paused is not None
        if action is Action.AUTO_DROP:
            self._auto_drop(message)
            return True
        if action is Action.BROKEN_SELF_MANAGED:
            if rec.broken is None or rec.broken.reason != _SELF_CLEARING:
                self.store.set_broken(name, _SELF_CLEARING, (
                    f"{message}; the source is self-managed, so nothing was dropped and "
                    "streaming continues. Drop the slot yourself if the disk is at risk."))
                log.error("slot_lag_critical", source=name, action=str(action), message=message)
            return False
        if action is Action.ERROR:
            if not marked and rec.state is not SourceState.ERROR:
                self.store.set_source_state(name, SourceState.ERROR)
                log.error("slot_lag_critical", source=name, action=str(action),
                          message=f"{message}; auto_drop_slot is off, nothing was dropped")
            return False
        if action is Action.WARN:
            # a self-managed critical marker clears only below warning
            if not marked and rec.state is not SourceState.WARNING:
                self.store.set_source_state(name, SourceState.WARNING)
                log.warning("slot_lag_warning", source=name, message=message)
            return False
        if rec.broken is not None and rec.broken.reason == _SELF_CLEARING:
            self.store.clear_broken(name)
            log.info("slot_lag_recovered", source=name, message=message)
        elif not marked and rec.state in (SourceState.WARNING, SourceState.ERROR):
            self.store.set_source_state(name, self._running_state())
            log.info("slot_lag_recovered", source=name, message=message)
        return False

    def _running_state(self) -> SourceState:
        busy = any(t.state in (TableState.SNAPSHOTTING, TableState.PENDING)
                   for t in self.store.list_tables(self.name))
        return SourceState.SNAPSHOTTING if busy else SourceState.STREAMING

    def _auto_drop(self, message: str) -> None:
        """Stop our stream, drop slot and publication (terminating another holder, bounded),
        and only then say `broken`: a failed drop must not claim the slot is gone."""
        name = self.name
        log.error("slot_lag_critical", source=name, action=str(Action.AUTO_DROP), message=message)
        if self.stop_stream is not None:
            self.stop_stream()
        td = self.adapter.teardown(self.source, install_id=self.store.install_id(),
                                   known_slot=True, wait_s=self.drop_wait_s)
        was = (f" (it was already broken: {self.rec.broken.reason})"
               if self.rec.broken is not None else "")
        pub = (f" and publication {self.source.publication_name!r}"
               if td.publication_dropped else "")
        self.store.set_broken(name, str(Reason.AUTO_DROPPED_CRITICAL_LAG), (
            f"{message}: the engine dropped replication slot {self.source.slot_name!r}{pub}"
            f" before it could fill the database's disk{was}. Run `cdcengine repair` to "
            "recreate them and re-snapshot every table."))
        if self.metrics is not None:
            self.metrics.count_auto_drop(name)
        log.error("slot_auto_dropped", source=name, slot=self.source.slot_name,
                  slot_dropped=td.slot_dropped, publication_dropped=td.publication_dropped,
                  terminated=list(td.terminated_pids), message=message)


# ---- sweep --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepResult:
    reports: tuple[HealthReport, ...]
    pruned: tuple[PruneReport, ...] = ()
    failed: tuple[str, ...] = field(default=())  # sources that could not be checked

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sweep_source(source: SourceConfig, store: StateStore, *,
                 metrics: SlotMetrics | None = None) -> HealthReport:
    """One pass with the source's lease; a source another process holds (a daemon streaming
    it, whose own monitor acts) is read and reported, not acted on."""
    try:
        with store.lease(source.name, purpose="sweep", ttl_s=120.0, wait_s=0):
            return check_source(source, store, metrics=metrics)
    except LeaseHeld as held:
        report = check_source(source, store, metrics=metrics, act=False)
        return replace(report, message=f"{report.message} (read only: {held.message})")


def sweep(configs: Sequence[SourceConfig], *, state: StateArg = None, prune: bool = False,
          metrics: SlotMetrics | None = None) -> SweepResult:
    """`cdcengine sweep`: one pass of the lag policy over every configured source (for cron
    when no daemon runs). Per-source failures are reported and do not stop the sweep.

    `prune` also drops the managed slot and publication of sources this state store recorded
    as enabled that are no longer configured (see `prune_removed`)."""
    reports: list[HealthReport] = []
    failed: list[str] = []
    with open_store(state) as store:
        for src in configs:
            try:
                reports.append(sweep_source(src, store, metrics=metrics))
            except Exception as exc:  # noqa: BLE001 - reported per source; the sweep goes on
                err = classify_error(exc)
                failed.append(src.name)
                reports.append(HealthReport(source=src.name, checked=False, action="none",
                                            message=err.message, error=err.to_dict()))
                log.error("sweep_source_failed", source=src.name, reason=str(err.reason),
                          message=err.message)
        pruned: list[PruneReport] = []
        if prune:
            pruned, prune_failed = prune_removed(configs, store)
            failed.extend(prune_failed)
    return SweepResult(reports=tuple(reports), pruned=tuple(pruned), failed=tuple(failed))


__all__ = [
    "HealthReport",
    "PruneReport",
    "SweepResult",
    "check_source",
    "resources_lost",
    "sweep",
    "sweep_source",
    "thresholds_for",
]

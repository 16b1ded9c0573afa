"""Slot-health policy (SPEC §7) as pure functions; the monitor and `check` wrap them with I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Act before PostgreSQL invalidates the slot at max_slot_wal_keep_size.
RETENTION_CAP_SAFETY = 0.8


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    warning_mb: int
    critical_mb: int  # effective: already lowered under max_slot_wal_keep_size
    configured_critical_mb: int
    cap_mb: int | None  # max_slot_wal_keep_size in MB, None when unlimited

    @property
    def lowered_by_cap(self) -> bool:
        return self.critical_mb < self.configured_critical_mb

    @property
    def critical_below_warning(self) -> bool:
        return self.critical_mb <= self.warning_mb


def effective_thresholds(warning_mb: int, critical_mb: int, cap_mb: int | None) -> Thresholds:
    """Effective critical = min(configured critical, 80 % of max_slot_wal_keep_size when set).

    `cap_mb` below 0 (PostgreSQL's -1) means unlimited.
    """
    cap = cap_mb if cap_mb is not None and cap_mb >= 0 else None
    effective = critical_mb if cap is None else min(critical_mb, int(cap * RETENTION_CAP_SAFETY))
    return Thresholds(warning_mb=warning_mb, critical_mb=max(effective, 0),
                      configured_critical_mb=critical_mb, cap_mb=cap)


MB = 1024 * 1024


class Level(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"


class Action(enum.StrEnum):
    """What one pass of the policy does to a source (SPEC §7)."""

    NONE = "none"  # below warning: nothing to do (a warning/error state is lifted)
    WARN = "warning"  # state `warning`, streaming continues
    ERROR = "error"  # managed without auto_drop: state `error`, nothing dropped
    AUTO_DROP = "auto_drop"  # managed + auto_drop: stop, drop slot and publication, broken
    BROKEN_SELF_MANAGED = "broken_self_managed"  # broken but streaming, nothing dropped


def level_of(retained_bytes: int, t: Thresholds) -> Level:
    """Thresholds apply to retained WAL: restart_lsn is what keeps segments on disk."""
    if retained_bytes >= t.critical_mb * MB:
        return Level.CRITICAL
    if retained_bytes >= t.warning_mb * MB:
        return Level.WARNING
    return Level.OK


def decide(level: Level, *, managed: bool, auto_drop: bool) -> Action:
    if level is Level.OK:
        return Action.NONE
    if level is Level.WARNING:
        return Action.WARN
    if not managed:
        return Action.BROKEN_SELF_MANAGED
    return Action.AUTO_DROP if auto_drop else Action.ERROR

"""Slot-health policy (SPEC §7) as pure functions; the monitor and `check` wrap them with I/O."""

from __future__ import annotations

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

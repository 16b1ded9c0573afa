"""The lag policy's pure part (SPEC §7): level from retained WAL, action per mode."""

from __future__ import annotations

import pytest

from cdcengine.control.lag import MB, Action, Level, decide, effective_thresholds, level_of
from cdcengine.source.adapter import HealthProbe, PublicationInfo, SlotInfo

T = effective_thresholds(512, 2048, None)


@pytest.mark.parametrize(("retained", "level"), [
    (0, Level.OK),
    (512 * MB - 1, Level.OK),
    (512 * MB, Level.WARNING),
    (2048 * MB - 1, Level.WARNING),
    (2048 * MB, Level.CRITICAL),
    (10**12, Level.CRITICAL),
])
def test_level_from_retained_wal(retained: int, level: Level) -> None:
    assert level_of(retained, T) is level


def test_cap_below_warning_makes_critical_win() -> None:
    t = effective_thresholds(512, 2048, 100)  # effective critical 80 MB < warning 512 MB
    assert t.critical_mb == 80 and t.critical_below_warning
    assert level_of(80 * MB, t) is Level.CRITICAL
    assert level_of(79 * MB, t) is Level.OK


@pytest.mark.parametrize(("level", "managed", "auto_drop", "action"), [
    (Level.OK, True, True, Action.NONE),
    (Level.OK, False, False, Action.NONE),
    (Level.WARNING, True, True, Action.WARN),
    (Level.WARNING, False, True, Action.WARN),
    (Level.CRITICAL, True, True, Action.AUTO_DROP),
    (Level.CRITICAL, True, False, Action.ERROR),
    (Level.CRITICAL, False, True, Action.BROKEN_SELF_MANAGED),  # never dropped
    (Level.CRITICAL, False, False, Action.BROKEN_SELF_MANAGED),
])
def test_action_per_mode(level: Level, managed: bool, auto_drop: bool, action: Action) -> None:
    assert decide(level, managed=managed, auto_drop=auto_drop) is action


def test_retained_wal_is_the_worst_of_the_sources_slots() -> None:
    pub = PublicationInfo(name="p", exists=True)
    main = SlotInfo(name="s", exists=True, retained_wal_bytes=5 * MB, lag_bytes=1)
    snap = SlotInfo(name="s_snap_1", exists=True, temporary=True, retained_wal_bytes=9 * MB)
    assert HealthProbe(slot=main, temporary_slots=(snap,), publication=pub
                       ).retained_wal_bytes == 9 * MB
    gone = SlotInfo(name="s", exists=False)
    assert HealthProbe(slot=gone, publication=pub).retained_wal_bytes is None

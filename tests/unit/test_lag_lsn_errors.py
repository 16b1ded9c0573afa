"""Pure helpers: effective lag thresholds (SPEC §7), LSN text, and the typed errors (SPEC §4)."""

from __future__ import annotations

import pickle

import pytest

from cdcengine.control.lag import RETENTION_CAP_SAFETY, Thresholds, effective_thresholds
from cdcengine.errors import (
    POLICY,
    CDCError,
    ConfigError,
    LeaseHeld,
    NotEnabled,
    PrerequisitesFailed,
    Reason,
    SlotCreationBlocked,
    SourceUnreachable,
    UnknownSource,
    classify_error,
    iter_chain,
)
from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine.source.adapter import Check

# ---- lag thresholds --------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, -1, -100])
def test_unlimited_cap_keeps_configured(cap: int | None) -> None:
    t = effective_thresholds(512, 2048, cap)
    assert t == Thresholds(warning_mb=512, critical_mb=2048, configured_critical_mb=2048,
                           cap_mb=None)
    assert t.lowered_by_cap is False
    assert t.critical_below_warning is False


def test_cap_lowers_critical_to_80_percent() -> None:
    assert RETENTION_CAP_SAFETY == 0.8
    t = effective_thresholds(512, 2048, 1000)
    assert (t.warning_mb, t.critical_mb, t.configured_critical_mb, t.cap_mb) == (
        512, 800, 2048, 1000)
    assert t.lowered_by_cap is True
    assert t.critical_below_warning is False


@pytest.mark.parametrize(("cap", "critical"), [
    (1001, 800),  # floored, never rounded up past the cap's 80 %
    (1004, 803),
    (2560, 2048),  # exactly the configured value: not lowered
    (10_000, 2048),
    (100_000_000, 2048),
])
def test_cap_arithmetic(cap: int, critical: int) -> None:
    t = effective_thresholds(512, 2048, cap)
    assert t.critical_mb == critical
    assert t.lowered_by_cap is (critical < 2048)
    assert t.cap_mb == cap


@pytest.mark.parametrize(("warning", "cap", "below"), [
    (512, 1000, False),  # 800 > 512
    (799, 1000, False),
    (800, 1000, True),  # equal counts: the warning state could never be seen
    (900, 1000, True),
    (512, 640, True),  # 512 == 512
])
def test_critical_below_warning(warning: int, cap: int, below: bool) -> None:
    t = effective_thresholds(warning, 2048, cap)
    assert t.critical_below_warning is below
    assert t.warning_mb == warning  # the warning threshold is never moved


def test_zero_cap_gives_zero_critical() -> None:
    t = effective_thresholds(512, 2048, 0)
    assert t.critical_mb == 0
    assert t.cap_mb == 0
    assert t.lowered_by_cap and t.critical_below_warning


# ---- LSNs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("0/0", 0),
    ("0/1", 1),
    ("16/B374D848", 0x16_B374D848),
    ("16/b374d848", 0x16_B374D848),
    ("1/0", 1 << 32),
    ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
    ("00000000/00000010", 16),
    ("  0/A8  ", 0xA8),
])
def test_parse_lsn(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize(("value", "text"), [
    (0, "0/0"),
    (1, "0/1"),
    (0x16_B374D848, "16/B374D848"),
    (1 << 32, "1/0"),
    ((1 << 32) - 1, "0/FFFFFFFF"),
    ((1 << 64) - 1, "FFFFFFFF/FFFFFFFF"),
])
def test_format_lsn(value: int, text: str) -> None:
    assert format_lsn(value) == text
    assert parse_lsn(text) == value


@pytest.mark.parametrize("value", [0, 1, 255, 0x1_0000_0000, 0xDEAD_BEEF_CAFE, (1 << 64) - 1])
def test_lsn_round_trip(value: int) -> None:
    assert parse_lsn(format_lsn(value)) == value
    assert format_lsn(parse_lsn(format_lsn(value))) == format_lsn(value)


@pytest.mark.parametrize("text", [
    "", "0", "16", "16/", "/1", "1/2/3", "G/0", "0/G", "123456789/0", "0/123456789",
    "-1/0", "0x1/0", "1 / 2", "1/2 junk", "0/+1",
])
def test_parse_lsn_refusals(text: str) -> None:
    with pytest.raises(ValueError, match="not an LSN"):
        parse_lsn(text)


@pytest.mark.parametrize("value", [-1, 1 << 64, 1 << 70])
def test_format_lsn_refusals(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        format_lsn(value)


# ---- CDCError --------------------------------------------------------------------------------


def test_every_reason_has_a_policy() -> None:
    assert set(POLICY) == set(Reason)
    for policy in POLICY.values():
        assert policy.message and policy.fix


def test_defaults_come_from_the_policy() -> None:
    err = SourceUnreachable()
    assert err.reason is Reason.CONNECTION_FAILED
    assert err.retryable is True
    assert err.message == POLICY[Reason.CONNECTION_FAILED].message
    assert err.fix == POLICY[Reason.CONNECTION_FAILED].fix
    assert str(err) == f"connection_failed: {err.message}"
    auth = SourceUnreachable("wrong password", reason=Reason.AUTH_FAILED)
    assert (auth.reason, auth.retryable, auth.message) == (Reason.AUTH_FAILED, False,
                                                          "wrong password")
    assert auth.fix == POLICY[Reason.AUTH_FAILED].fix
    assert ConfigError("x").retryable is False
    assert LeaseHeld("x").retryable is True
    assert NotEnabled().reason is Reason.NOT_ENABLED
    assert UnknownSource().reason is Reason.UNKNOWN_SOURCE
    assert SlotCreationBlocked().reason is Reason.SLOT_CREATION_BLOCKED
    assert CDCError().reason is Reason.UNKNOWN
    assert CDCError("m", retryable=False, fix="").to_dict() == {
        "reason": "unknown", "message": "m", "retryable": False, "fix": ""}


@pytest.mark.parametrize("err", [
    CDCError("boom"),
    CDCError("custom", reason=Reason.SLOT_IN_USE, retryable=False, fix="do this"),
    ConfigError("shop.toml: source 'shop': key 'dsn': required"),
    SourceUnreachable("denied", reason=Reason.AUTH_FAILED),
    LeaseHeld("held by daemon"),
    NotEnabled(),
    UnknownSource("no source named 'x'"),
    SlotCreationBlocked("waiting on pid 42", retryable=False),
    PrerequisitesFailed("2 checks failed"),
])
def test_pickle_round_trip(err: CDCError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert back.reason is err.reason
    assert back.message == err.message
    assert back.retryable == err.retryable
    assert back.fix == err.fix
    assert str(back) == str(err)
    assert back.args == err.args
    assert back.to_dict() == err.to_dict()


def test_pickle_keeps_prerequisite_checks() -> None:
    checks = [Check(name="wal_level", severity="error", message="replica", fix="set logical"),
              Check(name="slots", severity="ok", message="10 free")]
    err = PrerequisitesFailed("1 check failed", checks=list(checks))
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, PrerequisitesFailed)
    assert back.checks == checks
    assert back.reason is Reason.PREREQUISITES_FAILED


def test_pickle_keeps_extra_attributes() -> None:
    err = LeaseHeld("held")
    err.holder = "host:1:abc"  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(err)).holder == "host:1:abc"


# ---- chains ----------------------------------------------------------------------------------


def _raise_chain() -> BaseException:
    try:
        try:
            try:
                raise OSError("socket closed")
            except OSError as exc:
                raise SourceUnreachable("lost the server") from exc
        except SourceUnreachable as exc:
            raise ConfigError("config wrapper") from exc
    except ConfigError as exc:
        try:
            raise RuntimeError("outer") from exc
        except RuntimeError as outer:
            return outer
    raise AssertionError("unreachable")


def test_iter_chain_order() -> None:
    outer = _raise_chain()
    kinds = [type(e).__name__ for e in iter_chain(outer)]
    assert kinds == ["RuntimeError", "ConfigError", "SourceUnreachable", "OSError"]


def test_iter_chain_follows_implicit_context() -> None:
    try:
        try:
            raise NotEnabled()
        except NotEnabled:
            raise KeyError("while handling") from None
    except KeyError as exc:
        suppressed = exc
    assert list(iter_chain(suppressed)) == [suppressed]  # `from None` hides the context
    try:
        try:
            raise NotEnabled()
        except NotEnabled:
            raise KeyError("while handling")  # noqa: B904
    except KeyError as exc:
        implicit = exc
    assert [type(e) for e in iter_chain(implicit)] == [KeyError, NotEnabled]


def test_iter_chain_is_cycle_safe() -> None:
    a, b, c = ValueError("a"), TypeError("b"), KeyError("c")
    a.__cause__ = b
    b.__cause__ = c
    c.__cause__ = a  # a cycle
    b.__context__ = a
    assert list(iter_chain(a)) == [a, b, c]
    selfish = RuntimeError("self")
    selfish.__cause__ = selfish
    selfish.__context__ = selfish
    assert list(iter_chain(selfish)) == [selfish]


def test_iter_chain_visits_cause_and_context_once_each() -> None:
    root = OSError("root")
    cause, context = ValueError("cause"), TypeError("context")
    cause.__cause__ = root
    context.__context__ = root
    top = RuntimeError("top")
    top.__cause__ = cause
    top.__context__ = context
    top.__suppress_context__ = False
    assert list(iter_chain(top)) == [top, cause, context, root]


def test_classify_picks_the_first_cdcerror() -> None:
    outer = _raise_chain()
    found = classify_error(outer)
    assert isinstance(found, ConfigError)
    assert found.message == "config wrapper"
    inner = outer.__cause__.__cause__  # type: ignore[union-attr]
    assert classify_error(inner) is inner
    err = LeaseHeld("held")
    assert classify_error(err) is err


def test_classify_unknown_is_retryable_and_echoes_nothing() -> None:
    try:
        raise ValueError("postgresql://cdc:hunter2@db/shop failed")
    except ValueError as exc:
        found = classify_error(exc)
    assert type(found) is CDCError
    assert found.reason is Reason.UNKNOWN
    assert found.retryable is True
    assert found.message == POLICY[Reason.UNKNOWN].message
    assert "hunter2" not in str(found) + found.message + found.fix + repr(found.to_dict())


def test_classify_cyclic_chain_without_cdcerror_terminates() -> None:
    a, b = ValueError("a"), TypeError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify_error(a).reason is Reason.UNKNOWN

"""decimal, date, timestamp and timestamptz columns: one Arrow cast in the common case, and
the values PostgreSQL prints that the target cannot hold masked (see `convert` for the contract):
'NaN' and '±Infinity' decimals, 'infinity' and BC dates, years beyond 9999, offsets that move a
timestamptz outside years 1–9999."""

from __future__ import annotations

from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine_postgres.types.kernels import BIN, STR, keep, lenient_cast, non_null

__all__ = ["to_date", "to_decimal", "to_timestamp", "to_timestamptz"]

_TS_NAIVE: Final = pa.timestamp("us")
_NAN: Final = pa.scalar(b"NaN", BIN)
_DASH: Final = pa.scalar(b"-", BIN)

# Delta dates and timestamps cover years 1–9999: µs since the epoch of 0001-01-01T00:00:00Z and
# of 9999-12-31T23:59:59.999999Z.
_MIN_US: Final = -62_135_596_800_000_000
_MAX_US: Final = 253_402_300_799_999_999

# Strict forms, used only after a fast cast failed, to null the values PostgreSQL prints that the
# target cannot hold (NaN, infinity, BC, 5+ digit years) before casting the rest.
_DECIMAL_RE: Final = r"^-?[0-9]+(\.[0-9]+)?$"
_DATE_RE: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_TIMESTAMP_RE: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?$"
_TIMESTAMPTZ_RE: Final = (
    r"^(?P<local>[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)"
    r"(?P<sign>[+-])(?P<hh>[0-9]{2})(?::(?P<mm>[0-9]{2}))?(?::(?P<ss>[0-9]{2}))?$"
)


def to_decimal(raw: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    """numeric(p,s) → decimal128(p,s): the array and how many values were masked."""
    return _to_strict(raw, target, _DECIMAL_RE)


def to_date(raw: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    """date → date32: the array and how many values were masked."""
    return _to_strict(raw, target, _DATE_RE)


def to_timestamp(raw: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    """timestamp → timestamp[us]: the array and how many values were masked."""
    return _to_strict(raw, target, _TIMESTAMP_RE)


def _to_strict(raw: pa.Array, target: pa.DataType, pattern: str) -> tuple[pa.Array, int]:
    """decimal, date, timestamp: one cast in the common case.

    When it fails, the values PostgreSQL prints that the target cannot hold are nulled by a cheap
    test (`_unholdable`: 'NaN', 'infinity', BC, year > 9999) and the cast is retried, so a column
    full of 'infinity' valid-to dates stays fast. If it still fails, whatever does not match
    `pattern` is nulled too and the rest is cast leniently (malformed input only).
    """
    text = raw.view(STR)
    try:
        return pc.cast(text, target), 0
    except pa.ArrowInvalid:
        pass
    kept, masked = keep(text, pc.invert(_unholdable(raw, target)))
    try:
        return pc.cast(kept, target), masked
    except pa.ArrowInvalid:
        pass
    kept, more = keep(kept, pc.match_substring_regex(kept, pattern))
    array, bad = lenient_cast(kept, target)
    return array, masked + more + bad


def _unholdable(raw: pa.Array, target: pa.DataType) -> pa.Array:
    """True for the special values PostgreSQL prints that `target` cannot hold.

    decimal: 'NaN', 'Infinity', '-Infinity' (PG 14+). Dates and timestamps: 'infinity',
    '-infinity', '… BC', and years above 9999 — all exactly the values whose fifth byte is not
    the '-' after a four-digit year, or that end in ' BC'.
    """
    if pa.types.is_decimal(target):
        return pc.or_(pc.equal(raw, _NAN), pc.ends_with(raw, pattern=b"Infinity"))
    year_dash = pc.equal(pc.binary_slice(raw, 4, 5), _DASH)
    return pc.or_(pc.invert(year_dash), pc.ends_with(raw, pattern=b" BC"))


def to_timestamptz(raw: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    """timestamptz: Arrow's cast parses '+00', '+05:30' and '-08'. When it fails, specials are
    nulled as in `_to_strict` and the cast retried; anything else (second offsets such as LMT
    '+05:53:28' in a non-UTC session, malformed text) goes through one `extract_regex` pass where
    the local part and the offset are converted as separate columns and subtracted."""
    text = raw.view(STR)
    try:
        array, masked = pc.cast(text, target), 0
    except pa.ArrowInvalid:
        text, masked = keep(text, pc.invert(_unholdable(raw, target)))
        try:
            array = pc.cast(text, target)
        except pa.ArrowInvalid:
            array, more = _timestamptz_by_parts(text, target)
            masked += more
    # An offset can move a year-1 or year-9999 local time outside what Delta holds.
    micros = array.view(pa.int64())
    bounds = pc.min_max(micros)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low is not None and (low < _MIN_US or high > _MAX_US):
        in_range = pc.and_(pc.greater_equal(micros, _MIN_US), pc.less_equal(micros, _MAX_US))
        array, out_of_range = keep(array, in_range)
        masked += out_of_range
    return array, masked


def _timestamptz_by_parts(text: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    parts = pc.extract_regex(text, _TIMESTAMPTZ_RE)  # null where no match
    masked = non_null(text) - non_null(parts)
    local, bad = lenient_cast(pc.struct_field(parts, "local"), _TS_NAIVE)

    def number(name: str) -> pa.Array:
        return pc.cast(pc.utf8_lpad(pc.struct_field(parts, name), 2, "0"), pa.int64())

    seconds = pc.add(
        pc.add(pc.multiply(number("hh"), 3600), pc.multiply(number("mm"), 60)), number("ss")
    )
    negative = pc.equal(pc.struct_field(parts, "sign"), "-")
    seconds = pc.if_else(negative, pc.negate(seconds), seconds)
    offset = pc.cast(pc.multiply(seconds, 1_000_000), pa.duration("us"))
    utc = pc.subtract(local, offset)
    return pc.cast(utc, target), masked + bad

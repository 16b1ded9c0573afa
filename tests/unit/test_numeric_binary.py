"""`numeric_binary.decode_numeric` (through `decode_copy_binary`) on hand-built binary numeric
fields: exact values at the edges of numeric(p,s), NaN/±Infinity masked and counted, NULLs
not counted, and fields PostgreSQL cannot send for the column raising FramingError."""

from __future__ import annotations

import random
import struct
from decimal import Decimal

import pytest

from cdcengine_postgres.types.copy_binary import (
    PIECE_PAD,
    FramingError,
    decode_copy_binary,
    plan_binary,
)
from cdcengine_postgres.types.mapping import PgType

NUMERIC = PgType("numeric", 1700, "b", "N", -1)
NAN, PINF, NINF = "NaN", "Infinity", "-Infinity"


def _typmod(p: int, s: int) -> int:
    return ((p << 16) | s) + 4


def _numeric(value: Decimal | str) -> bytes:
    """numeric_send's form of `value`: stripped base-10000 digits, as PostgreSQL stores them."""
    if isinstance(value, str):
        sign = {NAN: 0xC000, PINF: 0xD000, NINF: 0xF000}[value]
        return struct.pack(">hhHh", 0, 0, sign, 0)
    sign = 0x4000 if value < 0 else 0
    t = abs(value).as_tuple()
    dscale = max(0, -int(t.exponent))
    # the digits as an integer of 10^-(4k) units, k = ceil(dscale / 4): aligned to base 10000
    frac_groups = -(-dscale // 4)
    units = int(abs(value).scaleb(4 * frac_groups))
    digits: list[int] = []
    while units:
        units, d = divmod(units, 10_000)
        digits.insert(0, d)
    weight = len(digits) - 1 - frac_groups
    while digits and digits[-1] == 0:  # strip trailing zero digits (weight unchanged)
        digits.pop()
    if not digits:
        weight = 0
    return struct.pack(f">hhHh{len(digits)}h", len(digits), weight, sign, dscale, *digits)


def _field(value: bytes | None) -> bytes:
    return struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value


def _decode(p: int, s: int, fields: list[bytes | None]) -> tuple[list[object], int]:
    plan = plan_binary([("n", NUMERIC.with_typmod(_typmod(p, s)))])
    assert plan is not None and plan[0].decoder == "numeric"
    rows = [struct.pack(">h", 1) + _field(f) for f in fields]
    out = decode_copy_binary(b"".join(rows) + PIECE_PAD, [len(r) for r in rows], plan)
    return out[0].array.to_pylist(), out[0].masked


@pytest.mark.parametrize(("p", "s", "values"), [
    (12, 2, ["0", "1.50", "-1.50", "9999999999.99", "-9999999999.99", "0.01", "-0.01",
             "10000.00", "123456.78", "100000000.00"]),
    (18, 0, ["0", "999999999999999999", "-999999999999999999", "1000000000000", "10000", "7"]),
    (18, 6, ["999999999999.999999", "-999999999999.999999", "0.000001", "-0.000001",
             "1.000000", "10000.000100", "123.450000"]),
    (5, 5, ["0.99999", "-0.99999", "0.00001", "0.10000", "0.00000"]),
    (4, 0, ["9999", "-9999", "0", "1000"]),
    (10, 4, ["999999.9999", "-999999.9999", "0.0001", "1.2300", "100000.0000"]),
    (1, 0, ["9", "-9", "0"]),
    (18, 18, ["0.999999999999999999", "-0.000000000000000001"]),
])
def test_values_decode_exactly(p: int, s: int, values: list[str]) -> None:
    decimals = [Decimal(v) for v in values]
    got, masked = _decode(p, s, [_numeric(d) for d in decimals])
    assert got == decimals and masked == 0


def test_random_values_of_every_precision_and_scale_decode_exactly() -> None:
    """Every numeric(p ≤ 18, s): seeded values with zero digits inside, at the ends, at every
    magnitude, mixed with NULLs and NaN in one piece (rows of different digit counts and
    weights side by side)."""
    rng = random.Random(18)
    for p in range(1, 19):
        for s in range(p + 1):
            values: list[Decimal | str | None] = []
            for _ in range(60):
                digits = rng.randint(0, p)
                unscaled = rng.randint(0, 10**digits - 1) * 10 ** rng.randint(0, p - digits)
                values.append(rng.choice([Decimal(rng.choice([1, -1]) * unscaled).scaleb(-s),
                                          None, NAN, Decimal(10**p - 1).scaleb(-s)]))
            fields = [None if v is None else _numeric(v) for v in values]
            got, masked = _decode(p, s, fields)
            assert got == [v if isinstance(v, Decimal) else None for v in values], (p, s)
            assert masked == values.count(NAN)


def test_specials_are_masked_and_counted_nulls_are_not() -> None:
    fields = [_numeric(Decimal("1.25")), _numeric(NAN), None, _numeric(PINF), _numeric(NINF),
              _numeric(Decimal("-3.00")), None]
    got, masked = _decode(12, 2, fields)
    assert got == [Decimal("1.25"), None, None, None, None, Decimal("-3.00"), None]
    assert masked == 3
    # a NULL as the very last field: its start is the end of the rows (the gather must not run
    # past the piece's padding)
    assert _decode(18, 6, [None]) == ([None], 0)
    assert _decode(4, 0, [_numeric(Decimal(0))]) == ([Decimal(0)], 0)
    # an unstripped trailing zero digit (PostgreSQL strips them) still means the same value
    assert _decode(12, 2, [struct.pack(">hhHhhh", 2, 0, 0, 2, 1, 0)]) == ([Decimal("1.00")], 0)


@pytest.mark.parametrize("field", [
    _numeric(Decimal("1.5"))[:-1],  # a size that does not match ndigits
    struct.pack(">hhHh", 1, 0, 0, 0),  # ndigits 1, no digit
    struct.pack(">hhHh", 7, 0, 0, 0) + b"\0\1" * 7,  # more digits than p ≤ 18 needs
    struct.pack(">hhHhh", 1, 0, 0x1234, 0, 1),  # unknown sign
    struct.pack(">hhHhh", 1, 0, 0, 0, 10_000),  # a digit ≥ 10000
    struct.pack(">hhHhh", 1, -1, 0, 4, 1),  # 0.0001 in a scale-2 column: below the scale
    struct.pack(">hhHhh", 1, 3, 0, 0, 1),  # 10^12: beyond numeric(12,2)'s precision
    struct.pack(">hhHhhh", 2, 2, 0, 0, 100, 1),  # 100 × 10^8 + 1 × 10^4: beyond (12,2)
    b"\0" * 4,  # shorter than the header
    struct.pack(">hhHhhh", 2, -2, 0, 8, 1, 1),  # 0.00010001: digits below the scale
])
def test_fields_postgresql_cannot_send_raise(field: bytes) -> None:
    with pytest.raises(FramingError):
        _decode(12, 2, [_numeric(Decimal("1.00")), field])


def test_only_small_decimals_are_decoded_here() -> None:
    """numeric(19+,s), unconstrained numeric and negative scales keep the ::text path."""
    for typmod in (_typmod(19, 2), _typmod(38, 0), -1, ((5 << 16) | 0x7FF) + 4):
        plan = plan_binary([("n", NUMERIC.with_typmod(typmod))])
        assert plan is not None and plan[0].decoder == "text"
    domain = PgType("money2", 90_000, "d", "N", -1, base=NUMERIC.with_typmod(_typmod(12, 2)))
    plan = plan_binary([("n", domain)])
    assert plan is not None and plan[0].decoder == "numeric"

"""SPEC §6 values: PostgreSQL text → Arrow (`cdcengine_postgres.types.convert`), no server needed.

Inputs are exactly what PostgreSQL prints under the pinned session settings (TimeZone=UTC,
DateStyle=ISO, IntervalStyle=iso_8601, bytea_output=hex, extra_float_digits=3); expected values
are written out by hand. Every conversion is checked for its Arrow type (`arrow_type` of the
PgType), its values, and its masked count (values the target cannot hold → null, counted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from pg_type_builders import (
    BOOL,
    FLOAT4,
    FLOAT8,
    INT2,
    INT4,
    INT8,
    NUMERIC,
    array_of,
    base,
    domain,
    numeric_typmod,
)

from cdcengine_postgres.types.convert import Converted, row_text_to_table, to_arrow
from cdcengine_postgres.types.copy_text import parse_copy_text
from cdcengine_postgres.types.mapping import PgType, arrow_type

NUMERIC_12_2 = NUMERIC.with_typmod(numeric_typmod(12, 2))
TEXT = base("text", 25, "S")
BYTEA = base("bytea", 17, "U")
DATE = base("date", 1082, "D")
TIMESTAMP = base("timestamp", 1114, "D")
TIMESTAMPTZ = base("timestamptz", 1184, "D")
BOX = base("box", 603, "G")


def conv(values: Sequence[bytes | None], pgtype: PgType) -> Converted:
    """to_arrow, checking the invariants every conversion owes: type and length."""
    out = to_arrow(values, pgtype)
    assert out.array.type == arrow_type(pgtype)
    assert len(out.array) == len(values)
    assert out.masked >= 0
    return out


def check(
    values: Sequence[bytes | None], pgtype: PgType, expected: list[Any], masked: int = 0
) -> None:
    out = conv(values, pgtype)
    assert out.array.to_pylist() == expected
    assert out.masked == masked


def ts(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


# --- bool, integers, floats -----------------------------------------------------------------


def test_bool() -> None:
    check([b"t", b"f", None, b"t"], BOOL, [True, False, None, True])


def test_bool_malformed_is_masked() -> None:
    check([b"t", b"true", b"", b"f", b"x"], BOOL, [True, None, None, False, None], masked=3)


@pytest.mark.parametrize(
    ("pgtype", "values", "expected"),
    [
        (INT2, [b"-32768", b"32767", b"0", None], [-32768, 32767, 0, None]),
        (INT4, [b"-2147483648", b"2147483647", b"-1"], [-(2**31), 2**31 - 1, -1]),
        (INT8, [b"-9223372036854775808", b"9223372036854775807"], [-(2**63), 2**63 - 1]),
    ],
    ids=["int2", "int4", "int8"],
)
def test_integers(pgtype: PgType, values: list[bytes | None], expected: list[Any]) -> None:
    check(values, pgtype, expected)


def test_integer_overflow_and_garbage_are_masked_not_wrapped() -> None:
    check([b"1", b"40000", b"2", b"abc", b"3"], INT2, [1, None, 2, None, 3], masked=2)


def test_many_bad_values_are_located_exactly() -> None:
    # The lenient path bisects: every good value survives, every bad one is counted once.
    values = [str(i).encode() if i % 7 else b"bad" for i in range(1000)]
    expected = [i if i % 7 else None for i in range(1000)]
    check(values, INT8, expected, masked=sum(1 for i in range(1000) if i % 7 == 0))


def test_float8_specials_stay_floats() -> None:
    out = conv([b"NaN", b"Infinity", b"-Infinity", b"-0", b"0.1", None], FLOAT8)
    got = out.array.to_pylist()
    assert math.isnan(got[0])
    assert got[1:3] == [math.inf, -math.inf]
    assert got[3] == 0.0 and math.copysign(1.0, got[3]) == -1.0
    assert got[4:] == [0.1, None]
    assert out.masked == 0


def test_float8_extremes_are_exact() -> None:
    check(
        [b"1.7976931348623157e+308", b"5e-324", b"2.2250738585072014e-308", b"1e+100"],
        FLOAT8,
        [1.7976931348623157e308, 5e-324, 2.2250738585072014e-308, 1e100],
    )


def test_float4_shortest_exact_text() -> None:
    out = conv([b"3.4028235e+38", b"1e-45", b"0.1", b"NaN", b"-Infinity"], FLOAT4)
    got = out.array.to_pylist()
    assert got[0] == pa.scalar(3.4028234663852886e38, pa.float32()).as_py()
    assert got[1] == pa.scalar(1.401298464324817e-45, pa.float32()).as_py()
    assert got[2] == 0.10000000149011612  # float32(0.1)
    assert math.isnan(got[3]) and got[4] == -math.inf
    assert out.masked == 0


# --- numeric ----------------------------------------------------------------------------------


def test_numeric_p_s_to_decimal() -> None:
    check(
        [b"1234567890.12", b"-0.50", b"0.00", b"-9999999999.99", None],
        NUMERIC_12_2,
        [
            Decimal("1234567890.12"),
            Decimal("-0.50"),
            Decimal("0.00"),
            Decimal("-9999999999.99"),
            None,
        ],
    )


def test_numeric_nan_and_infinity_are_masked() -> None:
    check(
        [b"1.00", b"NaN", b"2.50", b"Infinity", b"-Infinity"],
        NUMERIC_12_2,
        [Decimal("1.00"), None, Decimal("2.50"), None, None],
        masked=3,
    )


def test_numeric_38_digits() -> None:
    digits = b"12345678901234567890123456789012345678"
    check(
        [digits, b"-" + digits],
        NUMERIC.with_typmod(numeric_typmod(38, 0)),
        [Decimal(digits.decode()), Decimal("-" + digits.decode())],
    )
    frac = b"0." + digits
    check([frac], NUMERIC.with_typmod(numeric_typmod(38, 38)), [Decimal(frac.decode())])


def test_numeric_that_does_not_fit_is_masked_not_rounded() -> None:
    # Not PostgreSQL output for this typmod, but never a wrong value: masked.
    check(
        [b"1.234", b"123456789012.00", b"7.00"],
        NUMERIC_12_2,
        [None, None, Decimal("7.00")],
        masked=2,
    )


@pytest.mark.parametrize(
    "pgtype",
    [
        NUMERIC,
        NUMERIC.with_typmod(numeric_typmod(40, 2)),
        NUMERIC.with_typmod(numeric_typmod(5, -2)),
        NUMERIC.with_typmod(numeric_typmod(3, 5)),
    ],
    ids=["unconstrained", "p40", "negative-scale", "scale-gt-precision"],
)
def test_other_numerics_stay_exact_strings(pgtype: PgType) -> None:
    big = b"1" + b"0" * 60 + b".000000000000000000001"
    check(
        [b"NaN", b"Infinity", b"-0.5", big, None],
        pgtype,
        ["NaN", "Infinity", "-0.5", big.decode(), None],
    )


# --- strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pgtype", "text"),
    [
        (TEXT, "héllo wörld ✓ 🎉"),
        (TEXT, ""),
        (base("varchar", 1043, "S", typmod=14), "ten chars!"),
        (base("bpchar", 1042, "S", typmod=7), "ab "),  # char(3) keeps its padding
        (base("citext", 16390, "S"), "MiXeD"),
        (PgType("mood", 16400, "e", "E", -1), "happy"),
        (base("uuid", 2950), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (base("json", 114), '{"b": 1,  "a": [1, 2]}'),
        (base("jsonb", 3802), '{"a": [1, 2], "b": 1}'),
        (base("xml", 142), "<a>b</a>"),
        (base("inet", 869, "I"), "192.168.0.1/24"),
        (base("interval", 1186, "T"), "P1Y2M3DT4H5M6.5S"),
        (base("time", 1083, "D"), "12:34:56.789"),
        (base("timetz", 1266, "D"), "12:34:56+05:30"),
        (PgType("int4range", 3904, "r", "R", -1), "[1,10)"),
        (base("point", 600, "G"), "(1.5,-2)"),
        (base("money", 790, "N"), "$1,234.56"),
    ],
    ids=lambda v: v.name if isinstance(v, PgType) else None,
)
def test_string_types_keep_canonical_text(pgtype: PgType, text: str) -> None:
    check([text.encode(), None], pgtype, [text, None])


def test_invalid_utf8_is_masked() -> None:
    check([b"ok", b"\xff\xfe", "é".encode(), b"\xc3"], TEXT, ["ok", None, "é", None], masked=2)


def test_domain_converts_as_its_base() -> None:
    money2 = domain("money2", NUMERIC_12_2)
    check([b"1.50", b"NaN"], money2, [Decimal("1.50"), None], masked=1)
    check([b"7"], domain("posid", domain("bigid", INT8), oid=20002), [7])


# --- bytea ------------------------------------------------------------------------------------


def test_bytea_hex() -> None:
    check(
        [rb"\x0a0b", rb"\x", None, rb"\xdeadbeef", rb"\xDEADBEEF", rb"\x00"],
        BYTEA,
        [b"\n\x0b", b"", None, b"\xde\xad\xbe\xef", b"\xde\xad\xbe\xef", b"\x00"],
    )


def test_bytea_all_null_and_empty() -> None:
    check([None, None], BYTEA, [None, None])
    check([], BYTEA, [])


@pytest.mark.parametrize("bad", [rb"\x0", rb"\xzz", b"abc", rb"abc\000", rb"\x0a 0b"], ids=repr)
def test_bytea_malformed_is_masked(bad: bytes) -> None:
    check([rb"\x01", bad, rb"\x02ff"], BYTEA, [b"\x01", None, b"\x02\xff"], masked=1)


# --- dates and timestamps ----------------------------------------------------------------------


def test_date() -> None:
    check(
        [b"2024-02-29", b"0001-01-01", b"9999-12-31", None],
        DATE,
        [date(2024, 2, 29), date(1, 1, 1), date(9999, 12, 31), None],
    )


def test_date_specials_are_masked() -> None:
    check(
        [
            b"infinity",
            b"2024-01-02",
            b"-infinity",
            b"0044-03-15 BC",
            b"10000-01-01",
            b"5874897-12-31",
            None,
        ],
        DATE,
        [None, date(2024, 1, 2), None, None, None, None, None],
        masked=5,
    )


def test_date_malformed_is_masked() -> None:
    check([b"2024-02-30", b"2024-03-01"], DATE, [None, date(2024, 3, 1)], masked=1)


def test_timestamp() -> None:
    check(
        [
            b"2024-01-01 12:34:56",
            b"2024-01-01 12:34:56.5",
            b"2024-01-01 12:34:56.123456",
            b"0001-01-01 00:00:00",
            b"9999-12-31 23:59:59.999999",
            None,
        ],
        TIMESTAMP,
        [
            datetime(2024, 1, 1, 12, 34, 56),
            datetime(2024, 1, 1, 12, 34, 56, 500000),
            datetime(2024, 1, 1, 12, 34, 56, 123456),
            datetime(1, 1, 1),
            datetime(9999, 12, 31, 23, 59, 59, 999999),
            None,
        ],
    )


def test_timestamp_specials_are_masked() -> None:
    check(
        [
            b"infinity",
            b"-infinity",
            b"0044-03-15 12:00:00 BC",
            b"10000-01-01 00:00:00",
            b"2000-01-01 00:00:00",
        ],
        TIMESTAMP,
        [None, None, None, None, datetime(2000, 1, 1)],
        masked=4,
    )


def test_timestamptz_utc_session_form() -> None:
    check(
        [b"2024-01-01 00:00:00+00", b"2024-06-30 23:59:59.999999+00", None],
        TIMESTAMPTZ,
        [ts(2024, 1, 1), ts(2024, 6, 30, 23, 59, 59, 999999), None],
    )


def test_timestamptz_other_offsets() -> None:
    kolkata = timezone(timedelta(hours=5, minutes=30))
    check(
        [b"2024-01-01 05:30:00+05:30", b"2023-12-31 16:00:00.25-08", b"2024-01-01 00:00:00+00"],
        TIMESTAMPTZ,
        [
            datetime(2024, 1, 1, 5, 30, tzinfo=kolkata),
            ts(2024, 1, 1, 0, 0, 0, 250000),
            ts(2024, 1, 1),
        ],
    )


def test_timestamptz_offsets_with_seconds() -> None:
    # Historical local mean time: Asia/Kolkata before 1941 was +05:53:28. Also '+00:00:00'.
    check(
        [
            b"1900-01-01 00:00:00+05:53:28",
            b"2024-01-01 00:00:00+00:00:00",
            b"2024-01-01 00:00:00-00:25:21",
            b"infinity",
        ],
        TIMESTAMPTZ,
        [ts(1899, 12, 31, 18, 6, 32), ts(2024, 1, 1), ts(2024, 1, 1, 0, 25, 21), None],
        masked=1,
    )


def test_timestamptz_specials_and_range_are_masked() -> None:
    check(
        [
            b"infinity",
            b"-infinity",
            b"0044-03-15 00:00:00+00 BC",
            b"10000-01-01 00:00:00+00",
            b"0001-01-01 00:00:00+05:30",  # year 0 in UTC
            b"9999-12-31 23:30:00-01",  # year 10000 in UTC
            b"0001-01-01 00:00:00-01",  # fine: 01:00 UTC
            b"9999-12-31 23:59:59.999999+00",
        ],
        TIMESTAMPTZ,
        [None, None, None, None, None, None, ts(1, 1, 1, 1), ts(9999, 12, 31, 23, 59, 59, 999999)],
        masked=6,
    )


def test_specials_among_many_values() -> None:
    # A valid-to column full of 'infinity': the good values stay exact.
    values = [
        b"infinity" if i % 3 == 0 else f"2024-01-01 00:00:{i % 60:02d}+00".encode()
        for i in range(300)
    ]
    expected = [None if i % 3 == 0 else ts(2024, 1, 1, 0, 0, i % 60) for i in range(300)]
    check(values, TIMESTAMPTZ, expected, masked=100)


# --- arrays -----------------------------------------------------------------------------------


INT4_ARRAY = array_of(INT4, 1007)
TEXT_ARRAY = array_of(TEXT, 1009)


def test_int_array() -> None:
    check(
        [b"{1,2,NULL}", b"{}", None, b"{-5}", b"{NULL}"],
        INT4_ARRAY,
        [[1, 2, None], [], None, [-5], [None]],
    )


def test_text_array_quoting() -> None:
    check(
        [
            rb'{"a b","c\"d","e\\f",NULL,"NULL","",plain}',
            b'{"a,b",c}',  # delimiter inside quotes
            b'{"{x}",y}',  # braces inside quotes
            '{héllo,"wörld ✓"}'.encode(),
            b'{"line\nbreak"}',
            None,
            b"{}",
        ],
        TEXT_ARRAY,
        [
            ["a b", 'c"d', "e\\f", None, "NULL", "", "plain"],
            ["a,b", "c"],
            ["{x}", "y"],
            ["héllo", "wörld ✓"],
            ["line\nbreak"],
            None,
            [],
        ],
    )


def test_array_rows_parsed_two_ways_keep_their_order() -> None:
    # Rows needing the Python parser ('[0:1]=' bounds, quoted delimiters) interleaved with rows
    # the columnar split handles.
    values: list[bytes | None] = []
    expected: list[list[str] | None] = []
    for i in range(50):
        if i % 5 == 0:
            values.append(f'{{"x,{i}",y}}'.encode())
            expected.append([f"x,{i}", "y"])
        elif i % 5 == 1:
            values.append(f"[0:1]={{a{i},b}}".encode())
            expected.append([f"a{i}", "b"])
        elif i % 5 == 2:
            values.append(None)
            expected.append(None)
        else:
            values.append(f'{{"q {i}",r}}'.encode())
            expected.append([f"q {i}", "r"])
    check(values, TEXT_ARRAY, expected)


def test_array_with_bounds_keeps_elements() -> None:
    check([b"[0:2]={1,2,3}", b"{4}"], INT4_ARRAY, [[1, 2, 3], [4]])


def test_multidimensional_arrays_are_masked() -> None:
    check(
        [b"{{1,2},{3,4}}", b"{1}", b"[1:2][1:2]={{1,2},{3,4}}", b"{{}}"],
        INT4_ARRAY,
        [None, [1], None, None],
        masked=3,
    )


@pytest.mark.parametrize("bad", [b"{a,,b}", b'{"a}', b"junk", b"{1,}", b"{", b'{"a"b}'], ids=repr)
def test_malformed_arrays_are_masked(bad: bytes) -> None:
    check([b'{"ok"}', bad], TEXT_ARRAY, [["ok"], None], masked=1)


@pytest.mark.parametrize("bad", [b"{a,}", b"{,}", b"{a,,b}", b"{,a}"], ids=repr)
def test_malformed_bare_arrays_are_masked(bad: bytes) -> None:
    # Every row bare (the columnar split path): an empty piece is malformed, not ''.
    check([b"{ok}", bad], TEXT_ARRAY, [["ok"], None], masked=1)


def test_numeric_array_elements_masked_individually() -> None:
    arr = array_of(NUMERIC, 1231).with_typmod(numeric_typmod(5, 2))
    check(
        [b"{1.50,NaN,-3.25}", b"{NaN}", None],
        arr,
        [[Decimal("1.50"), None, Decimal("-3.25")], [None], None],
        masked=2,
    )
    check([b"{1.5,NaN}"], array_of(NUMERIC, 1231), [["1.5", "NaN"]])


def test_bytea_array() -> None:
    check(
        [rb'{"\\x0a0b",NULL,"\\x"}'],
        array_of(BYTEA, 1001),
        [[b"\n\x0b", None, b""]],
    )


def test_timestamptz_array_masks_elements() -> None:
    check(
        [b'{"2024-01-01 00:00:00+00",infinity,NULL}'],
        array_of(TIMESTAMPTZ, 1185),
        [[ts(2024, 1, 1), None, None]],
        masked=1,
    )


def test_bool_date_enum_arrays() -> None:
    check([b"{t,f,NULL}"], array_of(BOOL, 1000), [[True, False, None]])
    check([b"{2024-01-01,-infinity}"], array_of(DATE, 1182), [[date(2024, 1, 1), None]], masked=1)
    mood = PgType("mood", 16400, "e", "E", -1)
    check([b"{happy,sad}"], array_of(mood, 16401), [["happy", "sad"]])


def test_box_array_uses_semicolon_delimiter() -> None:
    check(
        [b"{(1,1),(0,0);(3,3),(2,2)}"],
        array_of(BOX, 1020),
        [["(1,1),(0,0)", "(3,3),(2,2)"]],
    )


def test_varchar_array_typmod_and_domain_array() -> None:
    check([b'{ab,"c d"}'], array_of(base("varchar", 1043, "S"), 1015, typmod=14), [["ab", "c d"]])
    ints = domain("ints", INT4_ARRAY, oid=20003)
    check([b"{1,2}"], ints, [[1, 2]])
    money2 = domain("money2", NUMERIC_12_2)
    check([b"{1.00,NaN}"], array_of(money2, 20004), [[Decimal("1.00"), None]], masked=1)


# --- inputs, empty and null columns ---------------------------------------------------------


ALL_TYPES = [
    BOOL,
    INT2,
    INT4,
    INT8,
    FLOAT4,
    FLOAT8,
    NUMERIC,
    NUMERIC_12_2,
    TEXT,
    BYTEA,
    DATE,
    TIMESTAMP,
    TIMESTAMPTZ,
    INT4_ARRAY,
    TEXT_ARRAY,
    array_of(BYTEA, 1001),
]


@pytest.mark.parametrize("pgtype", ALL_TYPES, ids=lambda t: t.name)
def test_empty_and_all_null_columns(pgtype: PgType) -> None:
    check([], pgtype, [])
    check([None, None, None], pgtype, [None, None, None])


def test_arrow_array_inputs() -> None:
    assert to_arrow(pa.array(["1", None], pa.string()), INT4).array.to_pylist() == [1, None]
    assert to_arrow(pa.array([b"2"], pa.large_binary()), INT4).array.to_pylist() == [2]
    assert to_arrow(pa.array(["3"], pa.large_string()), INT4).array.to_pylist() == [3]
    chunked = pa.chunked_array([pa.array([b"t"]), pa.array([b"f"])])
    assert to_arrow(chunked, BOOL).array.to_pylist() == [True, False]
    sliced = pa.array([b"9", rb"\x0a0b", rb"\xff", None], pa.binary()).slice(1, 2)
    assert to_arrow(sliced, BYTEA).array.to_pylist() == [b"\n\x0b", b"\xff"]
    with pytest.raises(TypeError):
        to_arrow(pa.array([1, 2]), INT4)


def test_row_text_to_table() -> None:
    table, masked = row_text_to_table(
        [[b"1", b"2"], [b"1.50", b"NaN"], [b"x", None]],
        [INT8, NUMERIC_12_2, TEXT],
        ["id", "amount", "note"],
    )
    assert table.schema == pa.schema(
        [("id", pa.int64()), ("amount", pa.decimal128(12, 2)), ("note", pa.string())]
    )
    assert table.to_pylist() == [
        {"id": 1, "amount": Decimal("1.50"), "note": "x"},
        {"id": 2, "amount": None, "note": None},
    ]
    assert masked == {"amount": 1}


def test_row_text_to_table_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        row_text_to_table([[b"1"]], [INT8, INT8], ["a"])
    with pytest.raises(ValueError, match="different lengths"):
        row_text_to_table([[b"1"], [b"1", b"2"]], [INT8, INT8], ["a", "b"])


# --- COPY text format -------------------------------------------------------------------------


def columns(chunk: bytes | bytearray | memoryview, ncols: int) -> list[list[bytes | None]]:
    out = parse_copy_text(chunk, ncols)
    assert len(out) == ncols
    assert all(col.type == pa.binary() for col in out)
    return [col.to_pylist() for col in out]


def test_copy_text_basic() -> None:
    chunk = b"1\tabc\t\\N\n2\t\t x \n"
    assert columns(chunk, 3) == [[b"1", b"2"], [b"abc", b""], [None, b" x "]]


def test_copy_text_escapes() -> None:
    fields = [
        (rb"a\tb", b"a\tb"),
        (rb"a\nb", b"a\nb"),
        (rb"a\rb", b"a\rb"),
        (rb"a\\b", b"a\\b"),
        (rb"\b\f\v", b"\b\f\v"),
        (rb"\101\0", b"A\x00"),  # octal
        (rb"\x41\x4", b"A\x04"),  # hex, 1-2 digits
        (rb"\q", b"q"),  # any other byte: itself
        (rb"\\N", b"\\N"),  # an escaped backslash + N is the text \N, not NULL
        (rb"\\x0a0b", b"\\x0a0b"),  # how COPY sends bytea
        (rb"\\\\\n", b"\\\\\n"),
        ("ünï\\tcode".encode(), "ünï\tcode".encode()),
    ]
    chunk = b"".join(raw + b"\n" for raw, _ in fields)
    assert columns(chunk, 1) == [[decoded for _, decoded in fields]]


def test_copy_text_one_column_empty_lines_are_empty_strings() -> None:
    assert columns(b"\n\\N\n\n", 1) == [[b"", None, b""]]


def test_copy_text_empty_chunk_and_memoryview() -> None:
    assert columns(b"", 2) == [[], []]
    assert columns(memoryview(bytearray(b"x\ty\n")), 2) == [[b"x"], [b"y"]]


def test_copy_text_leading_byte_order_mark_is_data() -> None:
    # Arrow's CSV reader would drop a BOM at the start of its input; here it starts a value.
    bom = "\ufeff".encode()
    assert columns(bom + b"a\tb\n" + bom + b"c\td\n", 2) == [[bom + b"a", bom + b"c"], [b"b", b"d"]]
    assert columns(bom + b"\n", 1) == [[bom]]


def test_copy_text_row_longer_than_a_block() -> None:
    big = b"x" * (9 << 20)
    assert columns(b"1\t" + big + b"\n2\t\\N\n", 2) == [[b"1", b"2"], [big, None]]


def test_copy_text_framing_errors() -> None:
    with pytest.raises(ValueError, match="newline"):
        parse_copy_text(b"1\t2", 2)
    with pytest.raises(ValueError, match="2 fields") as err:
        parse_copy_text(b"1\t2\nsecret\n", 2)
    assert "secret" not in str(err.value)
    assert err.value.__cause__ is None
    with pytest.raises(ValueError, match="fields"):
        parse_copy_text(b"1\t2\t3\n", 2)
    with pytest.raises(ValueError, match="ncols"):
        parse_copy_text(b"\n", 0)


def test_copy_text_to_typed_columns() -> None:
    chunk = b'1\t\\\\x0a0b\t{"a\\\\\\\\b",NULL}\t2024-01-01 00:00:00+00\n2\t\\N\t{}\tinfinity\n'
    cols = parse_copy_text(chunk, 4)
    table, masked = row_text_to_table(
        cols, [INT8, BYTEA, TEXT_ARRAY, TIMESTAMPTZ], ["id", "raw", "tags", "at"]
    )
    assert table.to_pylist() == [
        {"id": 1, "raw": b"\n\x0b", "tags": ["a\\b", None], "at": ts(2024, 1, 1)},
        {"id": 2, "raw": None, "tags": [], "at": None},
    ]
    assert masked == {"at": 1}

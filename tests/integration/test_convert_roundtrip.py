"""SPEC §6 round trip against a real server: COPY text → `parse_copy_text` → `to_arrow`.

The database is given hostile defaults (TimeZone=Asia/Kolkata, DateStyle 'SQL, DMY',
IntervalStyle postgres_verbose, bytea_output escape, extra_float_digits 0). Our connection
(`cdcengine_postgres.connection.connect`) pins the SPEC settings, so COPY must still render the
forms `convert` expects, and every value must come out right.

Expected values are computed independently of our text parsing: psycopg's *binary* typed fetch
of the same rows on a plain connection that has the hostile settings, with the documented
masking applied (in SQL where psycopg cannot load the value at all — infinite or BC dates — and
in Python otherwise). String-typed columns (SPEC: canonical text form) are compared with the
server's own output function (`format('%s', v)`) under the pinned settings, plus a few literal
forms pinned by hand.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from pgutil import ScratchDatabase
from psycopg import sql

from cdcengine_postgres.connection import connect
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.copy_text import parse_copy_text
from cdcengine_postgres.types.mapping import PgType, arrow_type, load_types

HOSTILE = {
    "timezone": "Asia/Kolkata",
    "datestyle": "SQL, DMY",
    "intervalstyle": "postgres_verbose",
    "bytea_output": "escape",
    "extra_float_digits": "0",
}

# Typed columns (compared with psycopg's binary typed fetch) and the expression that fetches
# the expected value, masking what psycopg cannot represent (SPEC §6 masks it too).
TYPED: dict[str, str] = {
    "b": "b",
    "i2": "i2",
    "i4": "i4",
    "i8": "i8",
    "f4": "f4",
    "f8": "f8",
    "n122": "n122",  # NaN → masked in Python
    "bya": "bya",
    "d": "CASE WHEN isfinite(d) AND d BETWEEN '0001-01-01' AND '9999-12-31' THEN d END",
    "ts": (
        "CASE WHEN isfinite(ts) AND ts >= '0001-01-01 00:00:00' AND ts < '10000-01-01 00:00:00'"
        " THEN ts END"
    ),
    "tstz": (
        "CASE WHEN isfinite(tstz) AND tstz >= '0001-01-01 00:00:00+00'"
        " AND tstz < '10000-01-01 00:00:00+00' THEN tstz END"
    ),
    "ai": "CASE WHEN array_ndims(ai) > 1 THEN NULL ELSE ai END",
    "at": "CASE WHEN array_ndims(at) > 1 THEN NULL ELSE at END",
    "an": "an",  # NaN elements → masked in Python
    "atz": (
        "CASE WHEN atz IS NOT NULL THEN ARRAY(SELECT CASE WHEN isfinite(e) THEN e END"
        " FROM unnest(atz) WITH ORDINALITY AS u(e, o) ORDER BY o) END"
    ),
}
# Columns SPEC §6 maps to string: canonical text form; `n` and `n402` are also checked as
# Decimals.
TEXTUAL = [
    "n",
    "n402",
    "t",
    "vc",
    "c3",
    "mood",
    "u",
    "js",
    "jb",
    "iv",
    "tm",
    "ttz",
    "r",
    "pt",
    "ip",
    "x",
    "ci",
]

DDL = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s "complicated"');
CREATE TABLE conv (
    id int PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    n122 numeric(12,2), n numeric, n402 numeric(40,2),
    t text, vc varchar(10), c3 char(3), mood mood,
    u uuid, js json, jb jsonb, iv interval, tm time, ttz timetz, r int4range, pt point, ip inet,
    bya bytea, d date, ts timestamp, tstz timestamptz,
    ai int4[], at text[], an numeric(5,2)[], atz timestamptz[]
)
"""

ROWS = r"""
INSERT INTO conv (id, b, i2, i4, i8, f4, f8, n122, n, n402, t, vc, c3, mood, u, js, jb, iv, tm,
                  ttz, r, pt, ip, bya, d, ts, tstz, ai, at, an, atz) VALUES
(1, true, 1, 2, 3, 1.5, 2.25, 1234.56,
 3.14159265358979323846264338327950288419716939937510,
 123456789012345678901234567890123456.12,
 'héllo ✓ 🎉', 'ten chars!', 'ab', 'happy', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": [1, 2]}', '1 year 2 months 3 days 04:05:06.5',
 '12:34:56.789', '12:34:56+05:30', '[1,10)', '(1.5,-2)', '192.168.0.1/24',
 '\x0a0b', '2024-02-29', '2024-01-01 12:34:56.123456', '2024-01-01 12:34:56.123456+00',
 '{1,2,NULL}', '{"a b","c\"d","e\\f",NULL,"NULL",""}', '{1.50,NaN,-3.25}',
 '{"2024-01-01 00:00:00+00",infinity}'),
(2, false, -32768, -2147483648, -9223372036854775808, 'NaN', 'Infinity', 'NaN', 'NaN', -0.01,
 '', '', '', 'sad', '00000000-0000-0000-0000-000000000000', '[]', '{}', '-1 days -00:00:01',
 '24:00:00', '00:00:00-12:34', 'empty', '(0,0)', '::1', '\x', 'infinity', '-infinity',
 'infinity', '{}', '{}', '{}', '{}'),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, true, 32767, 2147483647, 9223372036854775807, '-Infinity', 5e-324, -9999999999.99,
 -12345678901234567890.000000000000000000001, 0, E'tab\there\nnew\\line\r', 'x', 'abc',
 'it''s "complicated"', 'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF', '"\u00e9"', '{"k": "\u00e9"}',
 '0', '00:00:00', '23:59:59.999999+14', '[-5,)', '(1e+300,-1e-300)', '10.0.0.1',
 '\xdeadbeef00', '0044-03-15 BC', '10000-01-01 00:00:00', '1900-01-01 00:00:00',
 '[0:2]={7,8,9}', E'{"a,b","{x}",NULL,"line\nbreak","tab\there"}', '{NaN}', NULL),
(5, false, 0, 0, 0, 1e-45, -0.0, 0, 0, 0, 'NULL', '\N', ' ', 'happy',
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', 'null', 'null', '1 mon', '01:02:03', '01:02:03+00',
 '(,)', '(-1.5,2.5)', '2001:db8::/32', '\x5c4e', '10000-01-01', '0044-03-15 12:00:00 BC',
 '0001-01-01 00:00:00+05:30', '{{1,2},{3,4}}', '{{a,b},{c,d}}', '{-999.99,999.99}', NULL),
(6, true, 1, 1, 1, 3.4028235e+38, 1.7976931348623157e+308, 0.01, 'Infinity', 1, 'x', 'y', 'z',
 'sad', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a13', '1', '1', 'P1Y', '12:00', '12:00+05:30',
 '[1,2]', '(1,1)', '1.2.3.4/32', '\x00', '0001-01-01', '0001-01-01 00:00:00',
 '9999-12-31 23:30:00-01', '{}', '{"\\N",""}', NULL, NULL)
"""

BULK = r"""
INSERT INTO conv (id, b, i8, f8, n122, n, t, bya, d, ts, tstz, ai, at, an)
SELECT g, g % 2 = 0, g * 1000003, g / 7.0, (g * 12.34)::numeric(12,2),
       CASE WHEN g % 50 = 0 THEN 'NaN'::numeric ELSE g / 3.0 END,
       'row ' || g || E'\t' || repeat('ü', g % 5),
       decode(md5(g::text), 'hex'),
       '2000-01-01'::date + g,
       '2000-01-01'::timestamp + g * interval '1 hour 1.5 second',
       CASE WHEN g % 10 = 0 THEN 'infinity'::timestamptz
            ELSE '2000-01-01 00:00:00+00'::timestamptz + g * interval '1 day 1 microsecond' END,
       ARRAY[g, g + 1, NULL], ARRAY['x ' || g, 'y,' || g, g::text],
       ARRAY[(g / 3.0)::numeric(5,2)]
FROM generate_series(100, 1099) AS g
"""


@pytest.fixture
def hostile_db(db: ScratchDatabase) -> ScratchDatabase:
    """The test database with non-SPEC rendering defaults, the table and its rows."""
    for name, value in HOSTILE.items():
        db.execute(
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(db.name), sql.Identifier(name), sql.Literal(value)
            )
        )
    db.execute(DDL)
    try:
        db.execute("CREATE EXTENSION IF NOT EXISTS citext")
        db.execute("ALTER TABLE conv ADD COLUMN ci citext")
    except psycopg.Error:
        pass  # contrib not installed: the citext column is skipped
    try:
        db.execute("SELECT '<a/>'::xml")
        db.execute("ALTER TABLE conv ADD COLUMN x xml")
    except psycopg.Error:
        pass  # server built without libxml
    db.execute(ROWS)
    db.execute(BULK)
    columns = _columns(db)
    if "ci" in columns:
        db.execute("UPDATE conv SET ci = t || 'MiXeD' WHERE id < 100")
    if "x" in columns:
        db.execute("UPDATE conv SET x = '<a k=\"v\">b &amp; c</a>' WHERE id IN (1, 4)")
    return db


def _columns(db: ScratchDatabase) -> list[str]:
    rows = db.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'conv'::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    return [str(r[0]) for r in rows]


def _pg_types(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, PgType]:
    rows = conn.execute(
        "SELECT attname, atttypid::int8, atttypmod FROM pg_attribute"
        " WHERE attrelid = 'conv'::regclass AND attname = ANY(%s)",
        [names],
    ).fetchall()
    types = load_types(conn, [oid for _, oid, _ in rows])
    return {name: types[oid].with_typmod(typmod) for name, oid, typmod in rows}


def _copy_columns(dsn: str, names: list[str]) -> dict[str, pa.Array]:
    """COPY (SELECT names ORDER BY id) TO STDOUT in text format, split by parse_copy_text."""
    query = sql.SQL("COPY (SELECT {} FROM conv ORDER BY id) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(n) for n in names)
    )
    chunks: list[bytes] = []
    with connect(dsn) as conn, conn.cursor() as cur, cur.copy(query) as copy:
        for data in copy:
            chunks.append(bytes(data))
    return dict(zip(names, parse_copy_text(b"".join(chunks), len(names)), strict=True))


def _fetch(conn: psycopg.Connection[Any], exprs: list[str], binary: bool) -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT {} FROM conv ORDER BY id").format(
        sql.SQL(", ").join(sql.SQL(e) for e in exprs)
    )
    with conn.cursor(binary=binary) as cur:
        cur.execute(query)
        return cur.fetchall()


def _same(got: Any, want: Any) -> bool:
    """Equality where NaN equals NaN (floats and Decimals), recursing into lists."""
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(got, float) and isinstance(want, float) and math.isnan(got):
        return math.isnan(want)
    return bool(got == want)


def _mask_nan(value: Any) -> Any:
    """SPEC §6: NaN in a numeric(p,s) is masked (elements of arrays individually)."""
    if isinstance(value, list):
        return [_mask_nan(v) for v in value]
    if isinstance(value, Decimal) and value.is_nan():
        return None
    return value


def _nan_count(value: Any) -> int:
    if isinstance(value, list):
        return sum(_nan_count(v) for v in value)
    return 1 if isinstance(value, Decimal) and value.is_nan() else 0


def test_session_settings(hostile_db: ScratchDatabase) -> None:
    with psycopg.connect(hostile_db.dsn) as plain:
        assert plain.execute("SHOW timezone").fetchone() == ("Asia/Kolkata",)
    with connect(hostile_db.dsn) as pinned:
        assert pinned.execute("SHOW timezone").fetchone() == ("UTC",)
        assert pinned.execute("SHOW intervalstyle").fetchone() == ("iso_8601",)


def test_typed_columns_round_trip(hostile_db: ScratchDatabase) -> None:
    names = list(TYPED)
    copied = _copy_columns(hostile_db.dsn, names)
    with psycopg.connect(hostile_db.dsn) as plain:
        expected_rows = _fetch(plain, [TYPED[n] for n in names], binary=True)
        present = _fetch(plain, [f"{n} IS NOT NULL" for n in names], binary=False)
    with connect(hostile_db.dsn) as pinned:
        types = _pg_types(pinned, names)
    assert len(expected_rows) == 1006

    for j, name in enumerate(names):
        converted = to_arrow(copied[name], types[name])
        assert converted.array.type == arrow_type(types[name]), name
        got = converted.array.to_pylist()
        want = [row[j] for row in expected_rows]
        masked = 0
        if name == "an":  # element masks; whole-value masks are counted below
            masked = sum(_nan_count(w) for w in want)
        if name in ("n122", "an"):
            want = [_mask_nan(w) for w in want]
        if name == "atz":
            masked = sum(1 for w in want if w is not None for e in w if e is None)
        # A value present in the source but expected null is masked (whole-value masks).
        masked += sum(1 for w, p in zip(want, present, strict=True) if w is None and p[j])
        mismatches = [
            (i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if not _same(g, w)
        ]
        assert not mismatches, (name, mismatches[:5])
        assert converted.masked == masked, name


def test_masked_values_by_hand(hostile_db: ScratchDatabase) -> None:
    """The edge rows, spelled out: what each special becomes."""
    names = ["id", "f4", "f8", "n122", "d", "ts", "tstz", "ai", "an"]
    copied = _copy_columns(hostile_db.dsn, names)
    with connect(hostile_db.dsn) as pinned:
        types = _pg_types(pinned, names)
    got = {n: to_arrow(copied[n], types[n]).array.to_pylist()[:6] for n in names}
    assert got["id"] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(got["f4"][1]) and got["f8"][1] == math.inf and got["f4"][3] == -math.inf
    assert got["n122"][:2] == [Decimal("1234.56"), None]
    assert got["d"] == [date(2024, 2, 29), None, None, None, None, date(1, 1, 1)]
    assert got["ts"][1] is None and got["ts"][3] is None and got["ts"][4] is None
    assert got["ts"][5] == datetime(1, 1, 1)
    assert got["tstz"][0] == datetime(2024, 1, 1, 12, 34, 56, 123456, tzinfo=UTC)
    # Inserted as local time in Asia/Kolkata, whose offset in 1900 was Madras time +05:21:10
    # (tzdata): a seconds offset the session would print if it were not pinned to UTC.
    assert got["tstz"][3] == datetime(1899, 12, 31, 18, 38, 50, tzinfo=UTC)
    assert got["tstz"][1] is None and got["tstz"][4] is None and got["tstz"][5] is None
    assert got["ai"] == [[1, 2, None], [], None, [7, 8, 9], None, []]
    assert got["an"][:4] == [[Decimal("1.50"), None, Decimal("-3.25")], [], None, [None]]


def test_string_columns_round_trip(hostile_db: ScratchDatabase) -> None:
    names = [n for n in TEXTUAL if n in _columns(hostile_db)]
    copied = _copy_columns(hostile_db.dsn, names)
    with connect(hostile_db.dsn) as pinned:
        types = _pg_types(pinned, names)
        # format('%s', v) renders v with its type's output function, exactly as COPY does
        # (v::text differs for some types: bpchar drops its padding, inet shows /32).
        exprs = [f"CASE WHEN {n} IS NOT NULL THEN format('%s', {n}) END" for n in names]
        canonical = _fetch(pinned, exprs, binary=False)
    with psycopg.connect(hostile_db.dsn) as plain:
        decimals = _fetch(plain, ["n", "n402", "js", "jb"], binary=True)

    got: dict[str, list[Any]] = {}
    for j, name in enumerate(names):
        converted = to_arrow(copied[name], types[name])
        assert converted.array.type == pa.string(), name
        assert converted.masked == 0, name
        got[name] = converted.array.to_pylist()
        assert got[name] == [row[j] for row in canonical], name

    # Unconstrained and wide numerics: exact, NaN and Infinity kept (SPEC §6).
    for j, name in enumerate(["n", "n402"]):
        for text, value in zip(got[name], (row[j] for row in decimals), strict=True):
            assert (text is None) == (value is None)
            if value is not None:
                assert _same(Decimal(text), value) or (value.is_nan() and text == "NaN")
    # json keeps its input text; jsonb its normalised form; both parse to psycopg's objects.
    for j, name in ((2, "js"), (3, "jb")):
        for text, value in zip(got[name], (row[j] for row in decimals), strict=True):
            assert (text is None) or json.loads(text) == value
    assert got["js"][0] == '{"b": 1,  "a": [1, 2]}'
    assert got["jb"][0] == '{"a": [1, 2], "b": 1}'
    # Forms fixed by the pinned settings, whatever the database's defaults say.
    assert got["iv"][:2] == ["P1Y2M3DT4H5M6.5S", "P-1DT-1S"]
    assert got["tm"][:2] == ["12:34:56.789", "24:00:00"]
    assert got["ttz"][:2] == ["12:34:56+05:30", "00:00:00-12:34"]
    assert got["c3"][:2] == ["ab ", "   "]
    assert got["t"][3] == "tab\there\nnew\\line\r"
    assert got["mood"][3] == 'it\'s "complicated"'
    assert got["u"][3] == "ffffffff-ffff-ffff-ffff-ffffffffffff"
    assert got["r"][:2] == ["[1,10)", "empty"]
    assert got["n"][5] == "Infinity"
    assert got["n402"][0] == "123456789012345678901234567890123456.12"


def test_text_array_round_trip(hostile_db: ScratchDatabase) -> None:
    copied = _copy_columns(hostile_db.dsn, ["at"])
    with connect(hostile_db.dsn) as pinned:
        types = _pg_types(pinned, ["at"])
    got = to_arrow(copied["at"], types["at"])
    rows = got.array.to_pylist()
    assert rows[0] == ["a b", 'c"d', "e\\f", None, "NULL", ""]
    assert rows[3] == ["a,b", "{x}", None, "line\nbreak", "tab\there"]
    assert rows[4] is None  # two-dimensional: masked
    assert rows[5] == ["\\N", ""]
    assert rows[6] == ["x 100", "y,100", "100"]
    assert got.masked == 1

"""Binary COPY snapshots (`types.copy_binary`, `replication.copy_reader`) give exactly what the
text COPY path gives: same Arrow types, same values, same masked counts, for every type.

Each test snapshots one table twice with `TableSnapshot`: `copy_format='text'` (COPY text →
`parse_copy_text` → `to_arrow`, the reference) and the default (binary where exact), in small
pieces so rows split across many pieces, and compares the tables column by column.
"""

from __future__ import annotations

import math
import random
import string
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from cdc_util import source_for
from pgutil import ScratchDatabase
from psycopg import sql
from test_convert_roundtrip import BULK, DDL, HOSTILE, ROWS

from cdcengine_postgres.connection import connect
from cdcengine_postgres.replication.copy_reader import CopyPiece, read_copy
from cdcengine_postgres.replication.snapshot import TableSnapshot
from cdcengine_postgres.types import copy_binary


def _both(db: ScratchDatabase, tmp_path: Path, table: str, *, piece_rows: int = 97,
          columns: list[str] | None = None) -> tuple[TableSnapshot, pa.Table, TableSnapshot,
                                                      pa.Table]:
    overrides = {table: {"columns": columns}} if columns else {}
    src = source_for(db.dsn, tmp_path, [table], table=overrides)
    out: list[Any] = []
    for fmt in ("text", "auto"):
        with TableSnapshot(src, src.table_config(table), piece_rows=piece_rows,
                           copy_format=fmt) as snap:
            chunks = list(snap.chunks())
            out += [snap, pa.concat_tables(chunks).combine_chunks()]
    return out[0], out[1], out[2], out[3]


def _assert_same(text: pa.Table, binary: pa.Table) -> None:
    assert binary.schema == text.schema
    assert binary.num_rows == text.num_rows
    for name in text.column_names:
        a, b = binary.column(name), text.column(name)
        if pa.types.is_floating(a.type):  # NaN is not equal to itself: compare as Python
            assert [_nan(v) for v in a.to_pylist()] == [_nan(v) for v in b.to_pylist()], name
        else:
            assert a.equals(b), name


def _nan(v: float | None) -> float | str | None:
    return "NaN" if v is not None and math.isnan(v) else v


def test_every_convert_roundtrip_type_decodes_as_text_does(db: ScratchDatabase,
                                                           tmp_path: Path) -> None:
    """The SPEC §6 round-trip table (hostile database defaults, infinity/BC/year-10000 dates,
    NaN numerics, arrays, escapes, unicode): the columns a binary COPY can carry."""
    for name, value in HOSTILE.items():
        db.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(db.name), sql.Identifier(name), sql.Literal(value)))
    db.execute(DDL)
    db.execute(ROWS)
    db.execute(BULK)
    # ip (inet) is left out here: its cast to text is a function, so it forces the text path
    columns = ["id", "b", "i2", "i4", "i8", "f4", "f8", "n122", "n", "n402", "t", "vc", "c3",
               "mood", "u", "js", "jb", "iv", "tm", "ttz", "r", "pt", "bya", "d", "ts", "tstz",
               "ai", "at", "an", "atz"]
    ts, text, bs, binary = _both(db, tmp_path, "conv", columns=columns)
    assert (ts.copy_format, bs.copy_format) == ("text", "binary")
    _assert_same(text, binary)
    assert bs.masked == ts.masked and ts.masked  # the same values masked, and some were
    assert bs.rows == ts.rows == text.num_rows


def test_a_column_whose_text_cast_is_a_function_keeps_the_text_path(db: ScratchDatabase,
                                                                    tmp_path: Path) -> None:
    """inet::text shows the mask ('10.0.0.1/32'), unlike inet's output ('10.0.0.1'): such a
    table is copied as text; so is a domain over a type that would need ::text."""
    db.execute("CREATE TABLE n (id int PRIMARY KEY, ip inet);"
               "INSERT INTO n VALUES (1, '10.0.0.1'), (2, NULL), (3, '10.0.0.0/8');"
               "CREATE DOMAIN money30 AS numeric(30,2);"  # p > 18: read as ::text
               "CREATE TABLE m (id int PRIMARY KEY, v money30);"
               "INSERT INTO m VALUES (1, 1.5), (2, NULL)")
    for table, expected in (("n", [{"id": 1, "ip": "10.0.0.1"}, {"id": 2, "ip": None},
                                   {"id": 3, "ip": "10.0.0.0/8"}]),
                            ("m", [{"id": 1, "v": Decimal("1.50")}, {"id": 2, "v": None}])):
        src = source_for(db.dsn, tmp_path, [table])
        with TableSnapshot(src, src.table_config(table)) as snap:
            rows = sorted((r for c in snap.chunks() for r in c.to_pylist()),
                          key=lambda r: r["id"])
            assert snap.copy_format == "text"
        assert rows == expected


_ALPHABET = string.ascii_letters + string.digits + " \t\n\r\\\"',{}[]:;NULL" + "éü✓🎉\u00a0"


_JSON_STRINGS = ("a", "é", "\\\\", '\\"')  # JSON string bodies: a, é, \\, \"


def _text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 3, 11, 12, 13, 40, 300])  # around binary_view's 12-byte inline limit
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def _row(rng: random.Random, i: int, *, fixed_nulls: bool = True) -> tuple[Any, ...]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.1 else value

    day = date(2000, 1, 1) + timedelta(days=rng.randint(-700_000, 2_900_000))
    stamp = datetime(2000, 1, 1) + timedelta(microseconds=rng.randint(-6 * 10**16, 2 * 10**17))
    special_day = rng.choice(["infinity", "-infinity", "0044-03-15 BC", "10000-01-01",
                              "9999-12-31", "0001-01-01", day.isoformat()])
    special_ts = rng.choice(["infinity", "-infinity", "0044-03-15 12:00 BC",
                             "10000-01-01 00:00", "9999-12-31 23:59:59.999999",
                             "0001-01-01 00:00", stamp.isoformat(sep=" ")])
    big = Decimal(rng.randint(-10**39, 10**39)) / 100
    fixed = maybe if fixed_nulls else (lambda value: value)
    return (
        i, fixed(rng.randint(-2**15, 2**15 - 1)), fixed(rng.randint(-2**31, 2**31 - 1)),
        fixed(rng.randint(-2**63, 2**63 - 1)),
        fixed(rng.choice([0.5, -0.0, float("nan"), float("inf"), 1e-45, rng.random()])),
        fixed(rng.choice([-0.0, float("nan"), float("-inf"), 5e-324, rng.uniform(-1e300, 1e300)])),
        fixed(rng.random() < 0.5), fixed(special_day), fixed(special_ts), fixed(special_ts),
        maybe(_text(rng)), maybe(_text(rng)[:10]), maybe(_text(rng)[:4]),
        maybe(rng.choice(["name", "", "x" * 63, "naïve"])),
        maybe(f'{{"k": {i}, "s": "{rng.choice(_JSON_STRINGS)}"}}'),
        maybe(rng.choice(['{"b": 1, "a": [1, 2.50]}', "null", '"x\\ty"', "[]", "3"])),
        maybe(rng.randbytes(rng.choice([0, 1, 12, 13, 100]))),
        maybe(rng.choice([Decimal("NaN"), Decimal(rng.randint(-10**11, 10**11)) / 100])),
        maybe(rng.choice([Decimal("NaN"), big, Decimal("1e-20"), Decimal("-0.5")])),
        maybe(big), maybe(str(rng.getrandbits(128)).zfill(32)[:32]),
        maybe(f"{rng.randint(-99, 99)} days {rng.randint(0, 23)}:00:01.5"),
        maybe([rng.randint(-9, 9), None]), maybe([_text(rng), None, "NULL", ""]),
        maybe(rng.choice(["a", "b c", "d\"e"])), fixed(rng.randint(0, 2**62)),
    )


#: numeric(p,s) columns decoded from their binary form (`numeric_binary`, p ≤ 18), as in `r`
_SMALL_NUMERICS = {"n122": (12, 2), "n180": (18, 0), "n186": (18, 6), "n55": (5, 5),
                   "n40": (4, 0), "n104": (10, 4), "dn": (12, 2)}


def _small_numeric(rng: random.Random, p: int, s: int) -> Decimal:
    """A value of numeric(p,s) at an edge of its base-10000 digits, or anywhere (or NaN).
    ±Infinity cannot be stored in a constrained numeric (PostgreSQL 14+ rejects it:
    `test_a_constrained_numeric_holds_nan_but_no_infinity`)."""
    top = 10**p - 1
    unscaled = rng.choice([
        0, top, -top, 1, -1,  # max and min magnitude, the tiniest fraction
        rng.randint(-top, top), rng.randint(-10**rng.randint(0, p), 10**rng.randint(0, p)),
        rng.randint(1, 99) * 10**rng.randint(0, p - 2) if p > 2 else 1,  # trailing zeros
        -(10**rng.randint(0, p - 1)),  # one digit, at every position
    ])
    if rng.random() < 0.08:
        return Decimal("NaN")
    return Decimal(unscaled).scaleb(-s)


def test_a_constrained_numeric_holds_nan_but_no_infinity(db: ScratchDatabase) -> None:
    """Why the random rows hold NaN but no ±Infinity in numeric(p,s): the server refuses it
    (the binary decoder still masks it, `tests/unit/test_numeric_binary.py`)."""
    assert db.execute("SELECT 'NaN'::numeric(5,5)::text") == [("NaN",)]
    for value in ("Infinity", "-Infinity"):
        with pytest.raises(psycopg.errors.NumericValueOutOfRange):
            db.execute(sql.SQL("SELECT {}::numeric(18,6)").format(sql.Literal(value)))


_RANDOM_DDL = ("CREATE TYPE e3 AS ENUM ('a', 'b c', 'd\"e');"
               "CREATE DOMAIN money2 AS numeric(12,2);"
               "CREATE DOMAIN big AS int8 CHECK (VALUE >= 0);"
               "CREATE TABLE r (id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, f4 float4, "
               "f8 float8, b bool, d date, ts timestamp, tz timestamptz, t text, vc varchar(10), "
               "c4 char(4), nm name, js json, jb jsonb, by bytea, n122 numeric(12,2), n numeric, "
               "n402 numeric(40,2), u uuid, iv interval, ai int4[], at text[], e e3, dm big, "
               "n180 numeric(18,0), n186 numeric(18,6), n55 numeric(5,5), n40 numeric(4,0), "
               "n104 numeric(10,4), dn money2)")


@pytest.mark.parametrize("fixed_nulls", [True, False], ids=["nulls", "fixed-never-null"])
def test_random_rows_decode_as_text_does(db: ScratchDatabase, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         fixed_nulls: bool) -> None:
    """Seeded random rows over many types: NULLs, quotes, backslashes, tabs and newlines,
    unicode, empty strings, values around the 12-byte inline limit, ±infinity, BC and year
    10000 dates and timestamps, NaN numerics and floats, numerics beyond decimal range,
    numeric(p ≤ 18, s) at the edges of their digits.
    `fixed-never-null`: no NULL in a fixed-width column, so every piece reads those columns as
    one packed record per row (`_decode_prefix`, checked to have been taken)."""
    prefixes: list[bool] = []
    real = copy_binary._decode_prefix

    def spy(*args: Any) -> Any:
        got = real(*args)
        prefixes.append(got is not None)
        return got

    monkeypatch.setattr(copy_binary, "_decode_prefix", spy)
    db.execute(_RANDOM_DDL)
    rng = random.Random(16_4)
    numerics = [(p, s) for name, (p, s) in _SMALL_NUMERICS.items() if name != "n122"]
    rows = [(*_row(rng, i, fixed_nulls=fixed_nulls),
             *(None if rng.random() < 0.1 else _small_numeric(rng, p, s) for p, s in numerics))
            for i in range(2_000)]
    with connect(db.dsn, autocommit=True, secrets=()) as conn, conn.cursor() as cur, \
            cur.copy("COPY r FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    ts, text, bs, binary = _both(db, tmp_path, "r", piece_rows=61)
    assert (ts.copy_format, bs.copy_format) == ("text", "binary")
    assert bs._utf8  # a UTF8 database: string columns skip the validation
    _assert_same(text, binary)
    assert bs.masked == ts.masked
    assert {"d", "ts", "tz", *_SMALL_NUMERICS} <= set(bs.masked)  # the masking paths were taken
    # the numerics were decoded from binary, not quietly read as ::text
    assert bs._binary is not None
    assert {c.name: c.decoder for c in bs._binary if c.name in _SMALL_NUMERICS} == dict.fromkeys(
        _SMALL_NUMERICS, "numeric")
    assert {c.name: c.decoder for c in bs._binary if c.name in ("n", "n402")} == dict.fromkeys(
        ("n", "n402"), "text")
    # with NULLs most pieces of 61 rows hold one among the fixed columns: the general path
    assert all(prefixes) if not fixed_nulls else not all(prefixes)
    assert prefixes


def test_a_non_utf8_database_keeps_the_utf8_validation(db: ScratchDatabase,
                                                         tmp_path: Path) -> None:
    """Only a UTF8 server with a UTF8 client lets string columns skip Arrow's UTF-8 validation
    (PostgreSQL validated every value on input); a LATIN1 database's text is converted by the
    server and goes through the validating path — same values as text COPY."""
    latin = ScratchDatabase(db.server)
    with psycopg.connect(db.server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' "
                             "LC_CTYPE 'C' TEMPLATE template0").format(
                                 sql.Identifier(latin.name)))
    try:
        latin.execute("CREATE TABLE s (id int PRIMARY KEY, n int NOT NULL, t text);"
                      "INSERT INTO s SELECT g, g, repeat('é', g % 20) FROM "
                      "generate_series(1, 300) g")
        ts, text, bs, binary = _both(latin, tmp_path, "s")
        assert (ts.copy_format, bs.copy_format) == ("text", "binary")
        assert bs._utf8 is False
        _assert_same(text, binary)
        assert "é" * 19 in binary.column("t").to_pylist()
    finally:
        latin.drop()


def test_an_abandoned_copy_is_cancelled_and_drained(db: ScratchDatabase, tmp_path: Path) -> None:
    """A consumer that stops after one piece (a stop, a failed write) cancels the COPY; the
    reader drains it and lets go of the connection, which can then run its next command."""
    db.execute("CREATE TABLE big (id bigint PRIMARY KEY, v text);"
               "INSERT INTO big SELECT g, repeat('x', 50) FROM generate_series(1, 200000) g")
    src = source_for(db.dsn, tmp_path, ["big"])
    with TableSnapshot(src, src.table_config("big"), piece_rows=1_000) as snap:
        pieces = snap.chunks()
        first = next(pieces)
        assert first.num_rows == 1_000 and snap.copy_format == "binary"
        pieces.close()  # abandoned mid-copy: cancel, drain, join the reader
        conn = snap._workers[0]
        conn.rollback()  # the cancelled COPY failed the transaction; the connection lives on
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_rows_that_trickle_in_are_all_read(db: ScratchDatabase, binary: bool) -> None:
    """The reader naps while the socket is empty and waits in select after naps that bring
    nothing (`copy_reader._NAP_S`): rows arriving 60 ms apart (longer than all the naps), then
    a burst, are all read, in order, whichever way each wait ended."""
    query = ("COPY (SELECT g, CASE WHEN g <= 5 THEN pg_sleep(0.06)::text END FROM "
             "generate_series(1, 20000) g) TO STDOUT" + (" (FORMAT binary)" if binary else ""))
    pieces: list[CopyPiece] = []
    with connect(db.dsn, autocommit=True, secrets=()) as conn:
        assert read_copy(conn, query.encode(), binary=binary, piece_rows=1_000,
                         piece_bytes=1 << 20, put=lambda p: pieces.append(p) or True)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is free again
    assert sum(p.rows for p in pieces) == 20_000
    if binary:
        ids = [int.from_bytes(p.data[off + 6:off + 10], "big", signed=True)
               for p in pieces for off in _row_offsets(p)]
    else:
        ids = [int(line.split(b"\t")[0]) for p in pieces for line in bytes(p.data).splitlines()]
    assert ids == list(range(1, 20_001))


def _row_offsets(piece: CopyPiece) -> list[int]:
    offsets, at = [], 0
    for length in piece.row_lengths:
        offsets.append(at)
        at += length
    return offsets

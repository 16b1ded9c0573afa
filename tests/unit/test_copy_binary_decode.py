"""`decode_copy_binary` on hand-built binary COPY rows: values, NULLs, masking, and framing
errors (a malformed piece raises FramingError, never yields a wrong row)."""

from __future__ import annotations

import struct
from datetime import UTC, date, datetime

import pytest

from cdcengine_postgres.types.copy_binary import (
    PIECE_PAD,
    FramingError,
    decode_copy_binary,
    plan_binary,
)
from cdcengine_postgres.types.mapping import PgType

INT8 = PgType("int8", 20, "b", "N", -1)
TEXT = PgType("text", 25, "b", "S", -1)
TSTZ = PgType("timestamptz", 1184, "b", "D", -1)
DATE = PgType("date", 1082, "b", "D", -1)
COLUMNS = plan_binary([("id", INT8), ("t", TEXT), ("c", TSTZ), ("d", DATE)])
PG_EPOCH_US = 946_684_800_000_000


def _field(value: bytes | None) -> bytes:
    return struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value


def _row(*fields: bytes | None) -> bytes:
    return struct.pack(">h", len(fields)) + b"".join(_field(f) for f in fields)


def _decode(rows: list[bytes]) -> list[list[object]]:
    assert COLUMNS is not None
    out = decode_copy_binary(b"".join(rows) + PIECE_PAD, [len(r) for r in rows], COLUMNS)
    return [c.array.to_pylist() for c in out]


def test_values_nulls_and_masking() -> None:
    us = 1_700_000_000_000_000
    rows = [
        _row(struct.pack(">q", 1), "short ✓".encode(), struct.pack(">q", us - PG_EPOCH_US),
             struct.pack(">i", 0)),
        _row(struct.pack(">q", -2), b"a value longer than twelve bytes", None, None),
        _row(None, b"", struct.pack(">q", 2**63 - 1), struct.pack(">i", -2**31)),  # ±infinity
    ]
    ids, texts, stamps, days = _decode(rows)
    assert ids == [1, -2, None]
    assert texts == ["short ✓", "a value longer than twelve bytes", ""]
    assert stamps == [datetime.fromtimestamp(us / 1e6, UTC), None, None]
    assert days == [date(2000, 1, 1), None, None]
    assert COLUMNS is not None
    masked = decode_copy_binary(b"".join(rows) + PIECE_PAD, [len(r) for r in rows], COLUMNS)
    assert [c.masked for c in masked] == [0, 0, 1, 1]


@pytest.mark.parametrize(("rows", "lengths"), [
    ([_row(b"\0" * 8, b"x", None)], None),  # three fields, not four
    ([_row(b"\0" * 4, b"x", None, None)], None),  # an int8 of four bytes
    ([_row(b"\0" * 8, b"x", None, None)[:-3]], None),  # truncated row
    ([_row(b"\0" * 8, b"x", None, None)], [5]),  # lengths that do not add up
])
def test_framing_errors(rows: list[bytes], lengths: list[int] | None) -> None:
    assert COLUMNS is not None
    piece = b"".join(rows) + PIECE_PAD
    with pytest.raises(FramingError):
        decode_copy_binary(piece, lengths or [len(r) for r in rows], COLUMNS)


@pytest.mark.parametrize("utf8", [False, True])
def test_text_validation_unless_the_server_vouches(utf8: bool) -> None:
    """utf8=False (the default): invalid UTF-8 is masked and counted, as `to_arrow` does;
    utf8=True (a UTF8 server and client, which never send invalid UTF-8): no validation pass,
    same strings."""
    rows = [_row(struct.pack(">q", 1), "é".encode(), None, None),
            _row(struct.pack(">q", 2), b"plain and longer than twelve", None, None)]
    if not utf8:
        rows.append(_row(struct.pack(">q", 3), b"\xff", None, None))
    assert COLUMNS is not None
    out = decode_copy_binary(b"".join(rows) + PIECE_PAD, [len(r) for r in rows], COLUMNS,
                             utf8=utf8)
    expected = ["é", "plain and longer than twelve"] + ([] if utf8 else [None])
    assert out[1].array.to_pylist() == expected
    assert out[1].masked == (0 if utf8 else 1)


def test_leading_fixed_columns_read_as_one_record_unless_a_null() -> None:
    """Fixed-width leading columns without NULLs take the packed-record path; a NULL among them
    falls back to the column-by-column path; both give the same values and masks."""
    int8 = [struct.pack(">q", v) for v in (5, -7)]
    stamps = [struct.pack(">q", 0), struct.pack(">q", 2**63 - 1)]  # 2000-01-01, infinity
    cols = plan_binary([("id", INT8), ("c", TSTZ), ("t", TEXT)])
    assert cols is not None
    for c_null in (False, True):
        rows = [_row(int8[0], stamps[0], b"x"),
                _row(int8[1], None if c_null else stamps[1], b"yy")]
        out = decode_copy_binary(b"".join(rows) + PIECE_PAD, [len(r) for r in rows], cols)
        assert out[0].array.to_pylist() == [5, -7]
        assert out[1].array.to_pylist() == [datetime(2000, 1, 1, tzinfo=UTC), None]
        assert out[1].masked == (0 if c_null else 1)  # infinity is masked, NULL is not
        assert out[2].array.to_pylist() == ["x", "yy"]

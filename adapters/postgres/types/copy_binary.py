"""`COPY … TO STDOUT (FORMAT binary)` rows → typed Arrow columns, decoded column-wise (numpy).

Why: the snapshot's copy was CPU-bound on splitting and unescaping COPY *text* (issue 16, item
4). The binary format needs neither: every field is a big-endian int32 length followed by its
bytes, so once the start of each row is known (the reader records each CopyData message's
length: one row per message), the fields of one column are found for all rows at once, and a
fixed-width column (int, float, bool, date, timestamp) is one gather plus a byte swap. Variable-
width fields become Arrow binary columns without copying them one by one: a `binary_view` array
pointing into the piece, which Arrow's cast compacts in C++.

Type fidelity (SPEC §6) is kept by construction, per column:
- `DIRECT` types are decoded here into exactly `arrow_type(t)`, with the same masking as the
  text converters (`±infinity`, BC and year > 9999 dates/timestamps become null and count);
- `BYTES` types (text, varchar, char(n), name, json, jsonb, bytea) send their text output form
  as is in binary (jsonb after a version byte): their bytes go to the same `to_arrow` as COPY
  text's unescaped fields; bytea's binary form *is* the value (`to_arrow` would get hex);
- numeric(p,s) with p ≤ 18 (decimal128(p,s)) is decoded from its binary form by
  `numeric_binary`, with the text path's masking ('NaN', '±Infinity');
- every other type is selected as `col::text` by the caller (`select_expression`), which sends
  the type's output function text — the same bytes COPY text would send, unescaped — and goes to
  `to_arrow` too. That holds only for types whose cast to text is an I/O conversion, so the
  caller checks `pg_cast` (`TEXT_CAST_SQL`) and copies the table as COPY text when any is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa

from cdcengine_postgres.types.convert import Converted, to_arrow
from cdcengine_postgres.types.framing import FramingError, gather
from cdcengine_postgres.types.mapping import NUMERIC_OID, PgType, arrow_type
from cdcengine_postgres.types.numeric_binary import MAX_BINARY_PRECISION, decode_numeric

__all__ = ["COPY_BINARY_HEADER", "PIECE_PAD", "TEXT_CAST_SQL", "BinaryColumn", "FramingError",
           "decode_copy_binary", "plan_binary", "wire_order"]

#: The 11-byte signature, int32 flags and int32 header-extension length of every binary COPY.
COPY_BINARY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00"

#: The types (of `oids`) whose cast to text is a function, not the output function (e.g. bool →
#: 'true', inet → with its mask, char(n) → trimmed): `::text` would change their values.
TEXT_CAST_SQL: Final = (
    "SELECT castsource::int FROM pg_cast WHERE castsource = ANY(%s) "
    "AND casttarget = 'text'::regtype AND castmethod <> 'i'")

# built-in type oids (pg_type.dat)
_BOOL, _BYTEA, _NAME, _INT8, _INT2, _INT4, _TEXT, _JSON = 16, 17, 19, 20, 21, 23, 25, 114
_FLOAT4, _FLOAT8, _BPCHAR, _VARCHAR, _DATE = 700, 701, 1042, 1043, 1082
_TIMESTAMP, _TIMESTAMPTZ, _JSONB = 1114, 1184, 3802

# decoder name -> (field width, numpy big-endian dtype) for the fixed-width ones
_DIRECT: Final = {
    _BOOL: ("bool", 1, ">u1"), _INT2: ("int2", 2, ">i2"), _INT4: ("int4", 4, ">i4"),
    _INT8: ("int8", 8, ">i8"), _FLOAT4: ("float4", 4, ">f4"), _FLOAT8: ("float8", 8, ">f8"),
    _DATE: ("date", 4, ">i4"), _TIMESTAMP: ("timestamp", 8, ">i8"),
    _TIMESTAMPTZ: ("timestamptz", 8, ">i8"),
}
_FIXED_DECODERS: Final = frozenset(name for name, _, _ in _DIRECT.values())
_BYTES: Final = {_TEXT: "bytes", _VARCHAR: "bytes", _BPCHAR: "bytes", _NAME: "bytes",
                 _JSON: "bytes", _JSONB: "jsonb", _BYTEA: "bytea"}

# PostgreSQL's epoch is 2000-01-01: 10957 days, 946684800 s after Arrow's (1970-01-01).
_PG_EPOCH_DAYS: Final = 10_957
_PG_EPOCH_US: Final = 946_684_800_000_000
# Delta dates and timestamps hold years 1–9999 (as `strict_casts`), in PostgreSQL's epoch;
# ±infinity (INT64/INT32 max and min) and BC fall outside.
_MIN_US: Final = -62_135_596_800_000_000 - _PG_EPOCH_US
_MAX_US: Final = 253_402_300_799_999_999 - _PG_EPOCH_US
_MIN_DAY: Final = -719_162 - _PG_EPOCH_DAYS
_MAX_DAY: Final = 2_932_896 - _PG_EPOCH_DAYS
#: Zero bytes after the rows of a piece, so that a 12-byte gather at its last field stays inside
#: (the reader appends them while it builds the piece: no extra copy here).
PIECE_PAD: Final = b"\x00" * 16


# Row L (0–12): the little-endian masks of the three 4-byte lanes keeping a value's first L bytes.
_LANE_MASKS: Final = np.array(
    [[(1 << (8 * max(0, min(4, n - 4 * lane)))) - 1 for lane in range(3)] for n in range(13)],
    dtype="<u4")


@dataclass(frozen=True, slots=True)
class BinaryColumn:
    """How one column is read from a binary COPY: `decoder` is a fixed-width kind ('int8',
    'timestamptz', ...), 'bytes' / 'jsonb' / 'bytea', 'numeric', or 'text' (selected as
    `col::text`)."""

    name: str
    pg_type: PgType
    decoder: str

    @property
    def as_text(self) -> bool:
        return self.decoder == "text"


def _base(t: PgType) -> PgType:
    while t.typtype == "d" and t.base is not None:
        t = t.base
    return t


def plan_binary(columns: Sequence[tuple[str, PgType]]) -> list[BinaryColumn] | None:
    """Each column's decoder, or None when one cannot be read from a binary COPY exactly (a
    domain over a type that would need `::text`: its cast may be the domain's own)."""
    out: list[BinaryColumn] = []
    for name, t in columns:
        base = _base(t)
        if base.oid in _DIRECT and arrow_type(t) == arrow_type(base):
            out.append(BinaryColumn(name, t, _DIRECT[base.oid][0]))
        elif base.oid in _BYTES:
            out.append(BinaryColumn(name, t, _BYTES[base.oid]))
        elif base.oid == NUMERIC_OID and _small_decimal(arrow_type(t)):
            # numeric(p ≤ 18, s): decoded here (`numeric_binary`); a domain's typmod is on its
            # base, and arrow_type(t) is what the text path converts to, so both agree
            out.append(BinaryColumn(name, t, "numeric"))
        elif t.typtype == "d":
            return None
        else:
            out.append(BinaryColumn(name, t, "text"))
    return out


def wire_order(columns: Sequence[BinaryColumn]) -> list[int]:
    """The order to select `columns` in (indices into it): fixed-width ones first, so that
    `decode_copy_binary` reads them all with one gather per row when none is NULL (see
    `_decode_prefix`); the others after, each in table order."""
    fixed = [i for i, c in enumerate(columns) if c.decoder in _FIXED_DECODERS]
    return fixed + [i for i, c in enumerate(columns) if c.decoder not in _FIXED_DECODERS]


def _small_decimal(target: pa.DataType) -> bool:
    return isinstance(target, pa.Decimal128Type) and target.precision <= MAX_BINARY_PRECISION


def decode_copy_binary(
    piece: bytes | bytearray, row_lengths: Sequence[int] | np.ndarray,
    columns: Sequence[BinaryColumn], *, utf8: bool = False,
) -> list[Converted]:
    """Decode whole binary-COPY rows (no header, no trailer) into one `Converted` per column.

    `piece`: the rows followed by `PIECE_PAD`; `row_lengths`: each row's byte length, in order
    (any int sequence; an `array.array` or numpy array is taken without a copy). `utf8`: the
    text fields are known to be valid UTF-8 (the server's and the client's encodings are UTF8,
    so PostgreSQL validated every value on input and sends it unconverted), so string columns
    skip Arrow's UTF-8 validation — a third of a long text column's decode. Raises
    FramingError (a ValueError naming no value) when a row does not have the expected fields.
    """
    n = len(row_lengths)
    if n == 0:
        return [to_arrow(pa.array([], pa.binary()), c.pg_type) for c in columns]
    if len(piece) >= 2**31:  # binary_view offsets are int32
        raise FramingError("a binary COPY piece must stay below 2 GiB")
    lengths = np.asarray(row_lengths).astype(np.int64)
    ends = np.cumsum(lengths)
    if int(ends[-1]) + len(PIECE_PAD) != len(piece) or not piece.endswith(PIECE_PAD):
        raise FramingError("the row lengths do not add up to the piece")
    u8 = np.frombuffer(piece, dtype=np.uint8)
    data = pa.py_buffer(u8)  # the same memory: binary_view arrays point into it
    pos = ends - lengths
    if not np.array_equal(gather(u8, pos, 2, ">i2"), np.full(n, len(columns))):
        raise FramingError(f"binary COPY rows do not all have {len(columns)} fields")
    pos = pos + 2
    out: list[Converted] = []
    lead = _leading_fixed(columns)
    if lead:
        prefix = _decode_prefix(u8, pos, lead)
        if prefix is not None:
            out, pos = prefix, pos + lead.record.itemsize
    for col in columns[len(out):]:
        size = _size(u8, pos)
        if (size < -1).any():
            raise FramingError("a binary COPY field has a negative length")
        valid = size >= 0
        start = pos + 4
        pos = start + np.maximum(size, 0)
        if np.any(pos > ends):
            raise FramingError("a binary COPY field runs past its row")
        out.append(_decode(col, u8, data, start, size, valid, utf8))
    if not np.array_equal(pos, ends):
        raise FramingError(f"binary COPY rows do not all have {len(columns)} fields")
    return out


@dataclass(frozen=True, slots=True)
class _Prefix:
    """The leading fixed-width columns of a row, read as one packed record: per column its int32
    length (`s<i>`) and its value (`v<i>`), all big-endian."""

    columns: tuple[BinaryColumn, ...]
    widths: tuple[int, ...]
    record: np.dtype


def _leading_fixed(columns: Sequence[BinaryColumn]) -> _Prefix | None:
    lead: list[BinaryColumn] = []
    for col in columns:
        if col.decoder not in _FIXED_DECODERS:
            break
        lead.append(col)
    if not lead:
        return None
    widths = tuple(_DIRECT[_base(c.pg_type).oid][1] for c in lead)
    fields: list[tuple[str, str]] = []
    for i, col in enumerate(lead):
        fields += [(f"s{i}", ">i4"), (f"v{i}", _DIRECT[_base(col.pg_type).oid][2])]
    return _Prefix(tuple(lead), widths, np.dtype(fields))  # packed: no alignment padding


def _decode_prefix(u8: np.ndarray, pos: np.ndarray, lead: _Prefix) -> list[Converted] | None:
    """The leading fixed-width columns when no row has a NULL among them: their fields then sit
    at the same offsets in every row, so ONE gather of a packed record per row reads them all
    (instead of a length gather and a value gather per column). None when some row differs (a
    NULL, or a row too short): the caller then reads those columns one by one, which also
    reports a malformed row."""
    width = lead.record.itemsize
    if len(u8) - int(pos[-1]) < width + len(PIECE_PAD):
        return None
    # gathered as raw bytes, then viewed as the record: numpy gathers a structured dtype field
    # by field (6x slower)
    rec = gather(u8, pos, width, f"V{width}").view(lead.record)
    for i, w in enumerate(lead.widths):
        if not (rec[f"s{i}"] == w).all():
            return None
    valid = np.ones(len(pos), dtype=bool)
    return [_fixed(col, rec[f"v{i}"], valid) for i, col in enumerate(lead.columns)]


def _decode(col: BinaryColumn, u8: np.ndarray, data: pa.Buffer, start: np.ndarray,
            size: np.ndarray, valid: np.ndarray, utf8: bool) -> Converted:
    decoder = col.decoder
    all_valid = bool(valid.all())
    if decoder in ("bytes", "text", "jsonb", "bytea"):
        if decoder == "jsonb":  # jsonb's binary form: version byte 1, then its text
            if (u8[start if all_valid else start[valid]] != 1).any():
                raise FramingError("unknown jsonb binary version")
            start, size = start + 1, np.where(valid, size - 1, size)
        view = _binary_view(data, u8, start, size, valid, all_valid)
        if decoder == "bytea":
            return Converted(view.cast(pa.binary()), 0)
        if pa.types.is_string(arrow_type(col.pg_type)):
            if utf8:  # the server vouches for it (see decode_copy_binary): no validation pass
                return Converted(view.cast(pa.binary()).view(pa.string()), 0)
            # `to_arrow` of a string column is this cast when every value is valid UTF-8: one
            # pass instead of compacting, then validating
            try:
                return Converted(view.cast(pa.string()), 0)
            except pa.ArrowInvalid:
                pass  # invalid UTF-8: to_arrow masks (and counts) exactly those values
        return to_arrow(view.cast(pa.binary()), col.pg_type)
    if decoder == "numeric":
        target = arrow_type(col.pg_type)
        assert isinstance(target, pa.Decimal128Type)  # plan_binary chose it for decimal128
        return decode_numeric(u8, start, size, valid, target)
    _, width, dtype = _DIRECT[_base(col.pg_type).oid]
    if ((size if all_valid else size[valid]) != width).any():
        raise FramingError(f"a {decoder} field is not {width} bytes long")
    return _fixed(col, gather(u8, start, width, dtype), valid)


def _fixed(col: BinaryColumn, values: np.ndarray, valid: np.ndarray) -> Converted:
    """A fixed-width column from its big-endian `values` (one per row; garbage where not
    `valid`)."""
    decoder, target = col.decoder, arrow_type(col.pg_type)
    if decoder == "bool":
        return Converted(_array(values != 0, valid, target), 0)
    if decoder in ("date", "timestamp", "timestamptz"):
        values = values.astype(np.int64)
        lo, hi, shift = ((_MIN_DAY, _MAX_DAY, _PG_EPOCH_DAYS) if decoder == "date"
                         else (_MIN_US, _MAX_US, _PG_EPOCH_US))
        holdable = valid & (values >= lo) & (values <= hi)
        masked = int(np.count_nonzero(valid)) - int(np.count_nonzero(holdable))
        values = np.where(holdable, values, 0) + shift
        if decoder == "date":
            values = values.astype(np.int32)
        return Converted(_array(values, holdable, target), masked)
    return Converted(_array(values.astype(values.dtype.newbyteorder("=")), valid, target), 0)


def _size(u8: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The int32 field lengths at `start`, as int64 (-1: NULL)."""
    return gather(u8, start, 4, ">i4").astype(np.int64)


def _array(values: np.ndarray, valid: np.ndarray, target: pa.DataType) -> pa.Array:
    if valid.all():
        return pa.array(values, type=target)
    return pa.array(values, type=target, mask=~valid)


def _binary_view(data: pa.Buffer, u8: np.ndarray, start: np.ndarray, size: np.ndarray,
                 valid: np.ndarray, all_valid: bool) -> pa.Array:
    """The fields [start, start + size) as a pa.binary_view() array into `data`: the structs
    (16 bytes: int32 length, then the value inline and zero-padded when ≤ 12 bytes, else a
    4-byte prefix, buffer index 0 and the int32 offset) built for all rows at once as four int32
    lanes; a cast to binary or string compacts it (one memcpy per value, in C++)."""
    n = len(start)
    length = (size if all_valid else np.where(valid, size, 0)).astype(np.int32)
    if all_valid and bool((length > 12).all()):
        # every value out of line (e.g. a long text column): only the 4-byte prefix is read,
        # no masks — a third of the general path's work
        views = np.empty((n, 4), dtype="<u4")
        views[:, 0] = length
        views[:, 1] = gather(u8, start, 4, "<u4")
        views[:, 2] = 0
        views[:, 3] = start
        return pa.Array.from_buffers(pa.binary_view(), n, [None, pa.py_buffer(views), data],
                                     null_count=0)
    head = gather(u8, start, 12, "V12").view("<u4").reshape(n, 3)  # the first 12 bytes, raw
    out_of_line = length > 12
    views = np.empty((n, 4), dtype="<u4")
    views[:, 0] = length
    # inline values keep only their own bytes (out-of-line ones: the 4-byte prefix)
    views[:, 1:] = head & _LANE_MASKS[np.minimum(length, 12)]
    if out_of_line.any():
        views[:, 2] = np.where(out_of_line, 0, views[:, 2])
        views[:, 3] = np.where(out_of_line, start.astype(np.uint32), views[:, 3])
    bitmap = None if all_valid else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary_view(), n, [bitmap, pa.py_buffer(views), data],
                                 null_count=n - int(np.count_nonzero(valid)))

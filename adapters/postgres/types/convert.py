"""PostgreSQL text values → typed Arrow arrays (SPEC §6), one column at a time.

Who calls this: the snapshot (rows from `COPY … TO STDOUT`, text format, split into columns by
`parse_copy_text`) and the stream (pgoutput text-mode tuples, accumulated per column by the
decoder). Both deliver each value in PostgreSQL's *output* text form, rendered under the session
settings `connection.connect` pins (TimeZone=UTC, DateStyle=ISO, IntervalStyle=iso_8601,
bytea_output=hex, extra_float_digits=3), so the forms below are the only ones to expect.

Why columnar: the pipeline moves 100k+ rows/s on a small box (limits-and-pitfalls §4c–4d); a
Python `int()`/`Decimal()`/`datetime` per cell would cost more than decoding. A column's values are
put into one Arrow binary array and every conversion is an Arrow compute kernel (cast, equal,
binary_slice, split_pattern, extract_regex, ...). Python touches single values only on paths that
real PostgreSQL output does not take, or takes rarely; each is named where it happens:

- a value Arrow cannot parse (malformed: "should not happen") is located by bisection
  (`_lenient_cast`: O(bad · log n) kernel calls, never a loop over the good values);
- bytea not in hex form, or with malformed hex (`_to_bytea`);
- array literals with a delimiter inside quotes, '[lo:hi]=' bounds, or nesting
  (`_parse_array`; quoted elements as such are split and unescaped by kernels);
- COPY fields with escapes other than `\\\\` (`_copy_unescape`).

Masking contract (SPEC §6): a value the target Arrow/Delta type cannot hold becomes null and is
counted in `Converted.masked`; so does a value that is malformed for its type. Never a raise for
one value, never a wrong value. What is masked, per target type:

| PostgreSQL                | masked                                                          |
|---------------------------|-----------------------------------------------------------------|
| numeric(p,s) → decimal    | 'NaN', '±Infinity', anything that does not fit (p,s) exactly   |
| date                      | 'infinity', '-infinity', BC dates, years > 9999                 |
| timestamp / timestamptz   | as date; timestamptz also when the UTC instant falls outside    |
|                           | years 1–9999 (e.g. '0001-01-01 00:00:00+05:30')                  |
| bytea                     | anything but '\\x' + an even number of hex digits               |
| text-like → string        | invalid UTF-8                                                   |
| arrays                    | multi-dimensional values (list<T> cannot hold them) and          |
|                           | malformed literals: the whole value; elements as their type     |

Kept as is (not masked): float 'NaN'/'Infinity'/'-Infinity' (floats hold them); unconstrained
numeric 'NaN'/'Infinity' (stay strings); char(n)'s blank padding (canonical text form).
A one-dimensional array with explicit bounds ('[0:2]={1,2,3}') keeps its elements in order; the
lower bound is dropped (a list has none), as psycopg's own loader does.

timestamptz accepts any offset form PostgreSQL prints ('+00', '+05:30', '-08', and the
'+05:53:28' of historical local-mean-time zones), so a session that somehow is not UTC still
converts correctly — it only takes the slower (still columnar) regex path.

Limits: one call converts at most 2 GiB of text per column (Arrow's 32-bit binary offsets);
callers convert batches, so a larger input is a caller bug and raises ValueError.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from cdcengine_postgres.types.mapping import PgType, arrow_type

__all__ = ["Converted", "parse_copy_text", "row_text_to_table", "to_arrow"]

# box is the only built-in type whose array delimiter (pg_type.typdelim) is ';', not ','.
BOX_OID: Final = 603

_BIN: Final = pa.binary()
_STR: Final = pa.string()
_TS_NAIVE: Final = pa.timestamp("us")

_T: Final = pa.scalar(b"t", _BIN)
_F: Final = pa.scalar(b"f", _BIN)
_NULL_WORD: Final = pa.scalar(b"NULL", _BIN)
_EMPTY: Final = pa.scalar(b"", _BIN)
_COPY_NULL: Final = pa.scalar(b"\\N", _BIN)
_NAN: Final = pa.scalar(b"NaN", _BIN)
_DASH: Final = pa.scalar(b"-", _BIN)

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

# Array literal elements (array_out): quoted with \" and \\ escapes, or bare (never containing
# quotes, backslashes, braces or the delimiter). _ELEMENT_RE: one whole element as split_pattern
# leaves it (Arrow RE2); the others are for `_parse_array` (Python re).
_QUOTED: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ELEMENT_RE: Final = r'(?s)^(?:[^"\\{}]+|"(?:[^"\\]|\\.)*")$'
_BACKSLASHED: Final = re.compile(rb"\\(.)", re.DOTALL)
_BARE_COMMA: Final = re.compile(rb'[^"\\{},]+')
_BARE_SEMICOLON: Final = re.compile(rb'[^"\\{};]+')

# COPY text-format escapes (CopyReadAttributesText): \b \f \n \r \t \v, 1–3 octal digits,
# x + 1–2 hex digits; a backslash before any other byte means that byte.
_COPY_ESCAPE: Final = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_COPY_SIMPLE: Final = MappingProxyType(
    {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
)
_CSV_BLOCK: Final = 4 << 20
_BOM: Final = b"\xef\xbb\xbf"
# binary_slice's default stop overflows in pyarrow 26 ("Negative buffer resize"): pass an explicit
# one. Binary values are shorter than 2**31 bytes.
_TO_END: Final = 2**31 - 1
_TOO_LARGE: Final = "more than 2 GiB of text in one column; convert smaller batches"


@dataclass(frozen=True, slots=True)
class Converted:
    """One converted column: `array` has type `arrow_type(pgtype)` and the input's length;
    `masked` counts non-null inputs that became null (see the module docstring), for logging
    per column (SPEC §6)."""

    array: pa.Array
    masked: int


def to_arrow(values: Sequence[bytes | None] | pa.Array, pgtype: PgType) -> Converted:
    """Convert one column of PostgreSQL text values (None = SQL NULL) to `arrow_type(pgtype)`.

    `values` are the bytes pgoutput or text COPY deliver, COPY escapes already undone; an Arrow
    binary/string array (e.g. from `parse_copy_text`) is taken without a copy. Pure function; never
    raises because of a value (see the masking contract), only ValueError for more than 2 GiB
    of text in one call and TypeError for an input array of a non-binary type.
    """
    return _convert(_as_binary(values), pgtype)


def row_text_to_table(
    columns: Sequence[Sequence[bytes | None] | pa.Array],
    types: Sequence[PgType],
    names: Sequence[str],
) -> tuple[pa.Table, dict[str, int]]:
    """A table from per-column text values, plus the masked count of every column that had any.

    Columns must be of equal length and `columns`, `types`, `names` of equal count (ValueError
    otherwise). The schema is exactly `arrow_type` of each type, all fields nullable.
    """
    if not len(columns) == len(types) == len(names):
        raise ValueError(
            f"{len(columns)} columns, {len(types)} types and {len(names)} names: must be equal"
        )
    arrays: list[pa.Array] = []
    masked: dict[str, int] = {}
    for values, pgtype, name in zip(columns, types, names, strict=True):
        converted = to_arrow(values, pgtype)
        arrays.append(converted.array)
        if converted.masked:
            masked[name] = converted.masked
    if len({len(a) for a in arrays}) > 1:
        raise ValueError("columns have different lengths")
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays, strict=True)])
    return pa.Table.from_arrays(arrays, schema=schema), masked


def parse_copy_text(chunk: bytes | bytearray | memoryview, ncols: int) -> list[pa.Array]:
    """Split whole rows of `COPY … TO STDOUT` text format into `ncols` binary columns.

    `chunk` is any number of complete rows, each ending in a newline (what concatenating the
    CopyData messages of a COPY TO gives: one row per message). Fields are tab-separated, `\\N`
    (unescaped) is NULL, and backslash escapes are undone, so each column can go to `to_arrow`.

    Returns Arrow binary arrays, not Python bytes: the rows are split by Arrow's CSV reader with
    quoting and escaping off. That is exact for this format, because COPY escapes every tab,
    newline and carriage return inside a value, so each of those bytes in the chunk is a
    separator. The columns feed `to_arrow` without another copy.

    Raises ValueError when `chunk` does not end with a newline or a row has a field count other
    than `ncols` (a framing error: the chunk is not what COPY sent, so no row of it is trusted;
    the message names no value).
    """
    if ncols < 1:
        raise ValueError("ncols must be at least 1")
    buf = pa.py_buffer(chunk)
    if buf.size == 0:
        return [pa.array([], _BIN) for _ in range(ncols)]
    if buf[buf.size - 1 :].to_pybytes() != b"\n":
        raise ValueError("a COPY text chunk must consist of whole rows ending in a newline")
    names = [f"c{j}" for j in range(ncols)]
    # Arrow's CSV reader drops a UTF-8 byte order mark at the start of its input, which here
    # would be the start of a value: put a throwaway row in front (rare: one copy).
    skip = buf[:3].to_pybytes() == _BOM
    if skip:
        buf = pa.py_buffer(b"\t" * (ncols - 1) + b"\n" + buf.to_pybytes())
    try:
        table = _read_copy_csv(buf, names, _CSV_BLOCK)
    except pa.ArrowInvalid:
        # A row longer than a block (a multi-megabyte value) cannot be split in blocks: read the
        # chunk as one block before calling it a framing error.
        try:
            table = _read_copy_csv(buf, names, buf.size + 1)
        except pa.ArrowInvalid:
            # Not chained: Arrow's message quotes the offending row, i.e. table data.
            raise ValueError(f"COPY text rows do not all have {ncols} fields") from None
    if skip:
        table = table.slice(1)
    return [_copy_unescape(_as_binary(table.column(j))) for j in range(ncols)]


# --- internals ------------------------------------------------------------------------------


def _read_copy_csv(buf: pa.Buffer, names: list[str], block_size: int) -> pa.Table:
    """COPY text rows as a table of binary columns: Arrow's CSV reader with quoting and
    escaping off, `\\N` as the only null, and empty lines kept (a one-column row holding '')."""
    return pa_csv.read_csv(
        pa.BufferReader(buf),
        read_options=pa_csv.ReadOptions(column_names=names, block_size=block_size),
        parse_options=pa_csv.ParseOptions(
            delimiter="\t",
            quote_char=False,
            escape_char=False,
            double_quote=False,
            newlines_in_values=False,
            ignore_empty_lines=False,
        ),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, _BIN),
            null_values=["\\N"],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )


def _as_binary(values: Sequence[bytes | None] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """`values` as one pa.binary() array (32-bit offsets), copying only when it must."""
    if isinstance(values, pa.ChunkedArray):
        values = pa.concat_arrays(values.chunks) if values.num_chunks else pa.array([], _BIN)
    if isinstance(values, pa.Array):
        t = values.type
        if pa.types.is_binary(t):
            return values
        if pa.types.is_string(t):
            return values.view(_BIN)
        if pa.types.is_large_binary(t) or pa.types.is_large_string(t):
            large = values if pa.types.is_large_binary(t) else values.view(pa.large_binary())
            try:
                return large.cast(_BIN)
            except (pa.ArrowInvalid, pa.ArrowCapacityError) as exc:
                raise ValueError(_TOO_LARGE) from exc
        raise TypeError(f"expected a binary or string array, got {t}")
    arr = pa.array(values, type=_BIN)
    if isinstance(arr, pa.ChunkedArray):
        raise ValueError(_TOO_LARGE)
    return arr


def _non_null(arr: pa.Array) -> int:
    return int(len(arr) - arr.null_count)


def _true_count(mask: pa.Array) -> int:
    total = pc.sum(mask).as_py()
    return int(total) if total is not None else 0


def _keep(arr: pa.Array, valid: pa.Array) -> tuple[pa.Array, int]:
    """`arr` with the values where `valid` is false set to null, and how many non-null ones."""
    masked = _non_null(arr) - _true_count(valid)
    if masked == 0:
        return arr, 0
    return pc.if_else(valid, arr, pa.scalar(None, arr.type)), masked


def _lenient_cast(arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    """`pc.cast(arr, target)`, nulling (and counting) the values that fail to parse.

    The common case is one cast. When it fails, the failing values are found by bisection: each
    half that casts cleanly is done with in one call, so k bad values cost O(k · log n) kernel
    calls and no Python per good value. Only for malformed input, which PostgreSQL's own output
    never is after the special values have been masked by the callers.
    """
    try:
        return pc.cast(arr, target), 0
    except pa.ArrowInvalid:
        pass
    bad: list[int] = []
    stack = [(0, len(arr))]
    while stack:
        start, length = stack.pop()
        try:
            pc.cast(arr.slice(start, length), target)
        except pa.ArrowInvalid:
            if length == 1:
                bad.append(start)
            else:
                half = length // 2
                stack.append((start + half, length - half))
                stack.append((start, half))
    flags = [False] * len(arr)
    for i in bad:
        flags[i] = True
    cleaned = pc.if_else(pa.array(flags, pa.bool_()), pa.scalar(None, arr.type), arr)
    return pc.cast(cleaned, target), len(bad)


def _convert(raw: pa.Array, t: PgType) -> Converted:
    """Dispatch on the SPEC §6 target type of `t` (domains resolved to their base)."""
    if t.typtype == "d" and t.base is not None:
        return _convert(raw, t.base)
    target = arrow_type(t)
    if pa.types.is_list(target):
        element = t.element
        assert element is not None  # arrow_type gives a list only for arrays with an element
        if t.typmod != -1 and element.typmod == -1:
            element = element.with_typmod(t.typmod)  # numeric(12,2)[]: atttypmod is the element's
        return _to_list(raw, element, target)
    if pa.types.is_string(target):
        return Converted(*_lenient_cast(raw, _STR))
    if pa.types.is_boolean(target):
        return _to_bool(raw)
    if pa.types.is_integer(target) or pa.types.is_floating(target):
        # Arrow parses PostgreSQL's 'NaN', 'Infinity', '-Infinity' and shortest-exact floats.
        return Converted(*_lenient_cast(raw.view(_STR), target))
    if pa.types.is_decimal(target):
        return _to_strict(raw, target, _DECIMAL_RE)
    if pa.types.is_binary(target):
        return _to_bytea(raw)
    if pa.types.is_date32(target):
        return _to_strict(raw, target, _DATE_RE)
    if pa.types.is_timestamp(target):
        if target.tz is None:
            return _to_strict(raw, target, _TIMESTAMP_RE)
        return _to_timestamptz(raw, target)
    raise TypeError(f"no converter for Arrow type {target}")  # arrow_type returns none other


def _to_bool(raw: pa.Array) -> Converted:
    """bool prints as 't' / 'f' (Arrow's cast does not know those)."""
    is_t = pc.equal(raw, _T)
    is_f = pc.equal(raw, _F)
    if _true_count(is_t) + _true_count(is_f) == _non_null(raw):
        return Converted(is_t, 0)
    result, masked = _keep(is_t, pc.or_(is_t, is_f))
    return Converted(result, masked)


def _to_strict(raw: pa.Array, target: pa.DataType, pattern: str) -> Converted:
    """decimal, date, timestamp: one cast in the common case.

    When it fails, the values PostgreSQL prints that the target cannot hold are nulled by a cheap
    test (`_unholdable`: 'NaN', 'infinity', BC, year > 9999) and the cast is retried, so a column
    full of 'infinity' valid-to dates stays fast. If it still fails, whatever does not match
    `pattern` is nulled too and the rest is cast leniently (malformed input only).
    """
    text = raw.view(_STR)
    try:
        return Converted(pc.cast(text, target), 0)
    except pa.ArrowInvalid:
        pass
    kept, masked = _keep(text, pc.invert(_unholdable(raw, target)))
    try:
        return Converted(pc.cast(kept, target), masked)
    except pa.ArrowInvalid:
        pass
    kept, more = _keep(kept, pc.match_substring_regex(kept, pattern))
    array, bad = _lenient_cast(kept, target)
    return Converted(array, masked + more + bad)


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


def _to_timestamptz(raw: pa.Array, target: pa.DataType) -> Converted:
    """timestamptz: Arrow's cast parses '+00', '+05:30' and '-08'. When it fails, specials are
    nulled as in `_to_strict` and the cast retried; anything else (second offsets such as LMT
    '+05:53:28' in a non-UTC session, malformed text) goes through one `extract_regex` pass where
    the local part and the offset are converted as separate columns and subtracted."""
    text = raw.view(_STR)
    try:
        array, masked = pc.cast(text, target), 0
    except pa.ArrowInvalid:
        text, masked = _keep(text, pc.invert(_unholdable(raw, target)))
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
        array, out_of_range = _keep(array, in_range)
        masked += out_of_range
    return Converted(array, masked)


def _timestamptz_by_parts(text: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
    parts = pc.extract_regex(text, _TIMESTAMPTZ_RE)  # null where no match
    masked = _non_null(text) - _non_null(parts)
    local, bad = _lenient_cast(pc.struct_field(parts, "local"), _TS_NAIVE)

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


def _to_bytea(raw: pa.Array) -> Converted:
    """bytea_output=hex: '\\x' + two hex digits per byte. All values' hex digits are decoded in
    one `binascii.unhexlify` over the concatenated buffer, offsets halved by a kernel; this is
    only correct when every value has the prefix and an even digit count, which is checked first.
    Otherwise (escape format, malformed) each value is decoded in Python, the bad ones masked."""
    non_null = _non_null(raw)
    if non_null == 0:
        return Converted(raw, 0)
    digits = pc.binary_slice(raw, 2, _TO_END)
    lengths = pc.binary_length(digits)
    if (
        _true_count(pc.starts_with(raw, pattern=b"\\x")) == non_null
        and (pc.max(pc.bit_wise_and(lengths, 1)).as_py() or 0) == 0
    ):
        offsets = pa.Array.from_buffers(
            pa.int32(), len(digits) + 1, [None, digits.buffers()[1]], offset=digits.offset
        )
        first, last = offsets[0].as_py(), offsets[-1].as_py()
        data = digits.buffers()[2]
        try:
            decoded = binascii.unhexlify(memoryview(data)[first:last]) if last > first else b""
        except binascii.Error:
            decoded = None
        if decoded is not None:
            halved = pc.shift_right(pc.subtract(offsets, first), 1).cast(pa.int32())
            validity = raw.is_valid().buffers()[1] if raw.null_count else None
            array = pa.Array.from_buffers(
                _BIN,
                len(raw),
                [validity, halved.buffers()[1], pa.py_buffer(decoded)],
                null_count=raw.null_count,
            )
            return Converted(array, 0)
    # Rare path (documented): per-value decode.
    out: list[bytes | None] = []
    masked = 0
    for value in raw.to_pylist():
        if value is None:
            out.append(None)
            continue
        if value[:2] == b"\\x":
            try:
                out.append(binascii.unhexlify(value[2:]))
                continue
            except binascii.Error:
                pass
        out.append(None)
        masked += 1
    return Converted(pa.array(out, _BIN), masked)


def _to_list(raw: pa.Array, element: PgType, target: pa.DataType) -> Converted:
    """One-dimensional arrays → list<element type>; all elements converted as one column.

    `_split_arrays` turns the literals into lists of element texts; the element column is then
    converted like any other column of the element type (so a NaN in numeric(5,2)[] is one masked
    element, not a masked row), and the list structure is put back around it.
    """
    delim = b";" if element.oid == BOX_OID else b","
    lists, masked = _split_arrays(raw, delim)
    lengths = pc.fill_null(pc.list_value_length(lists), 0)
    offsets = pa.concat_arrays(
        [pa.array([0], pa.int32()), pc.cumulative_sum(lengths).cast(pa.int32())]
    )
    converted = _convert(_as_binary(lists.flatten()), element)
    row_null = lists.is_null() if lists.null_count else None
    array = pa.ListArray.from_arrays(offsets, converted.array, type=target, mask=row_null)
    return Converted(array, masked + converted.masked)


def _split_arrays(raw: pa.Array, delim: bytes) -> tuple[pa.Array, int]:
    """Array literals → list<binary> of element texts (unquoted, unescaped; NULL → null).

    Columnar (split on the delimiter, then check every piece is a whole element) for literals
    '{...}' whose quoted elements hold no delimiter: a piece cut out of a quoted element cannot
    match `_ELEMENT_RE`, because its opening quote has no unescaped closing one. The literals that
    fail that check (a delimiter inside quotes, '[lo:hi]=' bounds, multi-dimensional, malformed)
    are parsed in Python by `_parse_array` (rare path) and merged back in row order with one
    `take`. Returns the lists (null for NULL input and for masked literals) and the masked count.
    """
    null_bin = pa.scalar(None, _BIN)
    inner = pc.binary_slice(raw, 1, -1)
    shaped = pc.and_(pc.starts_with(raw, pattern=b"{"), pc.ends_with(raw, pattern=b"}"))
    bare = shaped
    for special in (b"{", b"}", b'"', b"\\"):
        bare = pc.and_(bare, pc.invert(pc.match_substring(inner, pattern=special)))
    inner = pc.if_else(pc.and_(shaped, pc.not_equal(inner, _EMPTY)), inner, null_bin)
    parts = pc.split_pattern(inner, pattern=delim)
    pieces = parts.flatten()
    non_null = _non_null(raw)

    # Numbers, dates, simple words: no quoting anywhere, and no empty piece ('{a,}' is malformed).
    if _true_count(bare) == non_null and not _true_count(pc.equal(pieces, _EMPTY)):
        elements = pc.if_else(pc.equal(pieces, _NULL_WORD), null_bin, pieces)
        return _relist(parts, elements, raw.is_null()), 0

    whole = pc.match_substring_regex(pieces, _ELEMENT_RE)
    quoted = pc.starts_with(pieces, pattern=b'"')
    unquoted = pc.binary_slice(pieces, 1, -1)
    escaped = pc.and_(quoted, pc.match_substring(unquoted, pattern=b"\\"))
    if _true_count(escaped):
        fixed = pc.replace_substring_regex(
            unquoted.filter(escaped), pattern=r"(?s)\\(.)", replacement=r"\1"
        )
        unquoted = pc.replace_with_mask(unquoted, escaped, fixed)
    bare_text = pc.if_else(pc.equal(pieces, _NULL_WORD), null_bin, pieces)
    elements = pc.if_else(quoted, unquoted, bare_text)
    lists = _relist(parts, elements, pc.invert(pc.fill_null(shaped, False)))

    # Rows to parse in Python: a non-null literal that is not '{...}', or has a piece that is
    # not a whole element. Per-row count of bad pieces = difference of a running sum at the
    # row boundaries.
    bad_piece = pc.cast(pc.invert(whole), pa.int32())
    running = pa.concat_arrays([pa.array([0], pa.int32()), pc.cumulative_sum(bad_piece)])
    lengths = pc.fill_null(pc.list_value_length(parts), 0)
    ends = pc.cumulative_sum(lengths)
    starts = pc.subtract(ends, lengths)
    bad_in_row = pc.subtract(pc.take(running, ends), pc.take(running, starts))
    redo = pc.fill_null(pc.or_(pc.invert(shaped), pc.greater(bad_in_row, 0)), False)
    n_redo = _true_count(redo)
    if n_redo == 0:
        return lists, 0

    parsed: list[list[bytes | None] | None] = []
    masked = 0
    for value in raw.filter(redo).to_pylist():
        elems = _parse_array(value, delim)
        masked += 1 if elems is None else 0
        parsed.append(elems)
    keep = pc.invert(redo)
    good_rank = pc.subtract(pc.cumulative_sum(pc.cast(keep, pa.int32())), 1)
    redo_rank = pc.add(pc.cumulative_sum(pc.cast(redo, pa.int32())), _true_count(keep) - 1)
    order = pc.if_else(redo, redo_rank, good_rank)
    both = pa.concat_arrays([lists.filter(keep), pa.array(parsed, lists.type)])
    return pc.take(both, order), masked


def _relist(parts: pa.Array, elements: pa.Array, null: pa.Array) -> pa.Array:
    """`parts` (a list array) with its flattened values replaced by `elements`, null where
    `null` is true (a null `parts` row that is not null here is an empty list: '{}')."""
    lengths = pc.fill_null(pc.list_value_length(parts), 0)
    offsets = pa.concat_arrays(
        [pa.array([0], pa.int32()), pc.cumulative_sum(lengths).cast(pa.int32())]
    )
    mask = null if _true_count(null) else None
    return pa.ListArray.from_arrays(offsets, elements, type=pa.list_(_BIN), mask=mask)


def _parse_array(value: bytes, delim: bytes) -> list[bytes | None] | None:
    """Elements of one array_out literal, or None when it is not a one-dimensional array.

    Handles '[lo:hi]=' bounds, '{}', bare elements, 'NULL' (bare only: a quoted "NULL" is the
    string), and quoted elements with \\" and \\\\ escapes.
    """
    if value[:1] == b"[":
        eq = value.find(b"={")
        if eq < 0 or b"][" in value[:eq]:  # several dimensions: [1:2][1:2]={{...}}
            return None
        value = value[eq + 1 :]
    if len(value) < 2 or value[:1] != b"{" or value[-1:] != b"}":
        return None
    inner = value[1:-1]
    if not inner:
        return []
    bare = _BARE_SEMICOLON if delim == b";" else _BARE_COMMA
    out: list[bytes | None] = []
    pos, end = 0, len(inner)
    while True:
        if inner[pos : pos + 1] == b'"':
            match = _QUOTED.match(inner, pos)
            if match is None:
                return None
            text = match.group(1)
            out.append(_BACKSLASHED.sub(rb"\1", text) if b"\\" in text else text)
        else:
            match = bare.match(inner, pos)
            if match is None:  # '{' here: a nested (multi-dimensional) array
                return None
            text = match.group(0)
            out.append(None if text == b"NULL" else text)
        pos = match.end()
        if pos == end:
            return out
        if inner[pos : pos + 1] != delim:
            return None
        pos += 1
        if pos == end:
            return None  # trailing delimiter


def _copy_unescape(column: pa.Array) -> pa.Array:
    """Undo COPY text escapes in one column; `\\N` → NULL.

    Real tabs and newlines never occur inside a field (COPY escapes them), so splitting came
    first. Fields without a backslash are left alone; fields whose only escape is `\\\\` (every
    bytea, Windows paths) are fixed by one replace_substring kernel — correct because, once all
    left-to-right `\\\\` pairs are removed, no backslash is left. The remaining fields (escaped
    tab, newline, ...) are decoded in Python, one regex substitution each.
    """
    is_null = pc.equal(column, _COPY_NULL)
    if _true_count(is_null):
        column = pc.if_else(is_null, pa.scalar(None, _BIN), column)
    if not _true_count(pc.match_substring(column, pattern=b"\\")):
        return column
    decoded = pc.replace_substring(column, pattern=b"\\\\", replacement=b"\\")
    others = pc.fill_null(
        pc.match_substring(
            pc.replace_substring(column, pattern=b"\\\\", replacement=b""), pattern=b"\\"
        ),
        False,
    )
    if _true_count(others):
        fixed = [_COPY_ESCAPE.sub(_copy_escape, v) for v in column.filter(others).to_pylist()]
        decoded = pc.replace_with_mask(decoded, others, pa.array(fixed, _BIN))
    return decoded


def _copy_escape(match: re.Match[bytes]) -> bytes:
    octal, hexa, other = match.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    return _COPY_SIMPLE.get(other, other)

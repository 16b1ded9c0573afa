"""PostgreSQL text values → typed Arrow arrays (SPEC §6), one column at a time.

Who calls this: the snapshot and `verify` (rows from `COPY … TO STDOUT`, text format, split into
columns by `copy_text.parse_copy_text`), the stream (pgoutput text-mode tuple values, collected
per column by the engine's batcher and handed to the converters `replication.changes` gives it)
and `defaults` (the catalog's missing values). All deliver each value in PostgreSQL's *output*
text form, rendered under the session settings `connection.connect` pins (TimeZone=UTC,
DateStyle=ISO, IntervalStyle=iso_8601, bytea_output=hex, extra_float_digits=3), so the forms
below are the only ones to expect.

Why columnar: the pipeline moves 100k+ rows/s on a small box (limits-and-pitfalls §4c–4d); a
Python `int()`/`Decimal()`/`datetime` per cell would cost more than decoding. A column's values are
put into one Arrow binary array and every conversion is an Arrow compute kernel (cast, equal,
binary_slice, split_pattern, extract_regex, ...). Python touches single values only on paths that
real PostgreSQL output does not take, or takes rarely; each is named where it happens:

- a value Arrow cannot parse (malformed: "should not happen") is located by bisection
  (`kernels.lenient_cast`: O(bad · log n) kernel calls, never a loop over the good values);
- bytea not in hex form, or with malformed hex (`bytea.to_bytea`);
- array literals with a delimiter inside quotes, '[lo:hi]=' bounds, or nesting
  (`array_literals`; quoted elements as such are split and unescaped by kernels);
- COPY fields with escapes other than `\\\\` (`copy_text`).

This module holds the public entry points and the dispatch on the target type; the converters
of each type family are in `strict_casts` (decimal, date, timestamp, timestamptz), `bytea` and
`array_literals`, the shared kernels in `kernels`.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine_postgres.types.array_literals import split_arrays
from cdcengine_postgres.types.bytea import to_bytea
from cdcengine_postgres.types.kernels import (
    BIN,
    STR,
    as_binary,
    keep,
    lenient_cast,
    non_null,
    true_count,
)
from cdcengine_postgres.types.mapping import PgType, arrow_type
from cdcengine_postgres.types.strict_casts import to_date, to_decimal, to_timestamp, to_timestamptz

__all__ = ["Converted", "row_text_to_table", "to_arrow"]

# box is the only built-in type whose array delimiter (pg_type.typdelim) is ';', not ','.
BOX_OID: Final = 603

_T: Final = pa.scalar(b"t", BIN)
_F: Final = pa.scalar(b"f", BIN)


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
    return _convert(as_binary(values), pgtype)


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
        return Converted(*lenient_cast(raw, STR))
    if pa.types.is_boolean(target):
        return _to_bool(raw)
    if pa.types.is_integer(target) or pa.types.is_floating(target):
        # Arrow parses PostgreSQL's 'NaN', 'Infinity', '-Infinity' and shortest-exact floats.
        return Converted(*lenient_cast(raw.view(STR), target))
    if pa.types.is_decimal(target):
        return Converted(*to_decimal(raw, target))
    if pa.types.is_binary(target):
        return Converted(*to_bytea(raw))
    if pa.types.is_date32(target):
        return Converted(*to_date(raw, target))
    if pa.types.is_timestamp(target):
        if target.tz is None:
            return Converted(*to_timestamp(raw, target))
        return Converted(*to_timestamptz(raw, target))
    raise TypeError(f"no converter for Arrow type {target}")  # arrow_type returns none other


def _to_bool(raw: pa.Array) -> Converted:
    """bool prints as 't' / 'f' (Arrow's cast does not know those)."""
    is_t = pc.equal(raw, _T)
    is_f = pc.equal(raw, _F)
    if true_count(is_t) + true_count(is_f) == non_null(raw):
        return Converted(is_t, 0)
    result, masked = keep(is_t, pc.or_(is_t, is_f))
    return Converted(result, masked)


def _to_list(raw: pa.Array, element: PgType, target: pa.DataType) -> Converted:
    """One-dimensional arrays → list<element type>; all elements converted as one column.

    `array_literals.split_arrays` turns the literals into lists of element texts; the element
    column is then converted like any other column of the element type (so a NaN in
    numeric(5,2)[] is one masked element, not a masked row), and the list structure is put back
    around it.
    """
    delim = b";" if element.oid == BOX_OID else b","
    lists, masked = split_arrays(raw, delim)
    lengths = pc.fill_null(pc.list_value_length(lists), 0)
    offsets = pa.concat_arrays(
        [pa.array([0], pa.int32()), pc.cumulative_sum(lengths).cast(pa.int32())]
    )
    converted = _convert(as_binary(lists.flatten()), element)
    row_null = lists.is_null() if lists.null_count else None
    array = pa.ListArray.from_arrays(offsets, converted.array, type=target, mask=row_null)
    return Converted(array, masked + converted.masked)

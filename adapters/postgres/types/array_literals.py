"""Array literals (array_out's text form) split into their element texts, column-wise.

Quoted elements are split and unescaped by kernels; only literals with a delimiter inside quotes,
'[lo:hi]=' bounds or nesting are parsed in Python (`_parse_array`), one by one.
"""

from __future__ import annotations

import re
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine_postgres.types.kernels import BIN, non_null, true_count

__all__ = ["split_arrays"]

_NULL_WORD: Final = pa.scalar(b"NULL", BIN)
_EMPTY: Final = pa.scalar(b"", BIN)

# Array literal elements (array_out): quoted with \" and \\ escapes, or bare (never containing
# quotes, backslashes, braces or the delimiter). _ELEMENT_RE: one whole element as split_pattern
# leaves it (Arrow RE2); the others are for `_parse_array` (Python re).
_QUOTED: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ELEMENT_RE: Final = r'(?s)^(?:[^"\\{}]+|"(?:[^"\\]|\\.)*")$'
_BACKSLASHED: Final = re.compile(rb"\\(.)", re.DOTALL)
_BARE_COMMA: Final = re.compile(rb'[^"\\{},]+')
_BARE_SEMICOLON: Final = re.compile(rb'[^"\\{};]+')


def split_arrays(raw: pa.Array, delim: bytes) -> tuple[pa.Array, int]:
    """Array literals → list<binary> of element texts (unquoted, unescaped; NULL → null).

    Columnar (split on the delimiter, then check every piece is a whole element) for literals
    '{...}' whose quoted elements hold no delimiter: a piece cut out of a quoted element cannot
    match `_ELEMENT_RE`, because its opening quote has no unescaped closing one. The literals that
    fail that check (a delimiter inside quotes, '[lo:hi]=' bounds, multi-dimensional, malformed)
    are parsed in Python by `_parse_array` (rare path) and merged back in row order with one
    `take`. Returns the lists (null for NULL input and for masked literals) and the masked count.
    """
    null_bin = pa.scalar(None, BIN)
    inner = pc.binary_slice(raw, 1, -1)
    shaped = pc.and_(pc.starts_with(raw, pattern=b"{"), pc.ends_with(raw, pattern=b"}"))
    bare = shaped
    for special in (b"{", b"}", b'"', b"\\"):
        bare = pc.and_(bare, pc.invert(pc.match_substring(inner, pattern=special)))
    inner = pc.if_else(pc.and_(shaped, pc.not_equal(inner, _EMPTY)), inner, null_bin)
    parts = pc.split_pattern(inner, pattern=delim)
    pieces = parts.flatten()
    present = non_null(raw)

    # Numbers, dates, simple words: no quoting anywhere, and no empty piece ('{a,}' is malformed).
    if true_count(bare) == present and not true_count(pc.equal(pieces, _EMPTY)):
        elements = pc.if_else(pc.equal(pieces, _NULL_WORD), null_bin, pieces)
        return _relist(parts, elements, raw.is_null()), 0

    whole = pc.match_substring_regex(pieces, _ELEMENT_RE)
    quoted = pc.starts_with(pieces, pattern=b'"')
    unquoted = pc.binary_slice(pieces, 1, -1)
    escaped = pc.and_(quoted, pc.match_substring(unquoted, pattern=b"\\"))
    if true_count(escaped):
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
    n_redo = true_count(redo)
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
    redo_rank = pc.add(pc.cumulative_sum(pc.cast(redo, pa.int32())), true_count(keep) - 1)
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
    mask = null if true_count(null) else None
    return pa.ListArray.from_arrays(offsets, elements, type=pa.list_(BIN), mask=mask)


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

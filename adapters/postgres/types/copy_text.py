"""`COPY … TO STDOUT` text format split into binary columns, COPY's escapes undone, ready
for `convert.to_arrow`."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from cdcengine_postgres.types.kernels import BIN, as_binary, true_count

__all__ = ["parse_copy_text"]

_COPY_NULL: Final = pa.scalar(b"\\N", BIN)

# COPY text-format escapes (CopyReadAttributesText): \b \f \n \r \t \v, 1–3 octal digits,
# x + 1–2 hex digits; a backslash before any other byte means that byte.
_COPY_ESCAPE: Final = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_COPY_SIMPLE: Final = MappingProxyType(
    {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
)
_CSV_BLOCK: Final = 4 << 20
_BOM: Final = b"\xef\xbb\xbf"


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
        return [pa.array([], BIN) for _ in range(ncols)]
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
    return [_copy_unescape(as_binary(table.column(j))) for j in range(ncols)]


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
            column_types=dict.fromkeys(names, BIN),
            null_values=["\\N"],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )


def _copy_unescape(column: pa.Array) -> pa.Array:
    """Undo COPY text escapes in one column; `\\N` → NULL.

    Real tabs and newlines never occur inside a field (COPY escapes them), so splitting came
    first. Fields without a backslash are left alone; fields whose only escape is `\\\\` (every
    bytea, Windows paths) are fixed by one replace_substring kernel — correct because, once all
    left-to-right `\\\\` pairs are removed, no backslash is left. The remaining fields (escaped
    tab, newline, ...) are decoded in Python, one regex substitution each.
    """
    is_null = pc.equal(column, _COPY_NULL)
    if true_count(is_null):
        column = pc.if_else(is_null, pa.scalar(None, BIN), column)
    if not true_count(pc.match_substring(column, pattern=b"\\")):
        return column
    decoded = pc.replace_substring(column, pattern=b"\\\\", replacement=b"\\")
    others = pc.fill_null(
        pc.match_substring(
            pc.replace_substring(column, pattern=b"\\\\", replacement=b""), pattern=b"\\"
        ),
        False,
    )
    if true_count(others):
        fixed = [_COPY_ESCAPE.sub(_copy_escape, v) for v in column.filter(others).to_pylist()]
        decoded = pc.replace_with_mask(decoded, others, pa.array(fixed, BIN))
    return decoded


def _copy_escape(match: re.Match[bytes]) -> bytes:
    octal, hexa, other = match.groups()
    if octal is not None:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa is not None:
        return bytes((int(hexa, 16),))
    return _COPY_SIMPLE.get(other, other)

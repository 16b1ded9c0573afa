"""Arrow compute helpers shared by the column converters: the binary view of a column, null
and true counts, masking by a validity mask, and a cast that nulls (and counts) what it cannot
parse without falling back to Python per value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["BIN", "STR", "as_binary", "keep", "lenient_cast", "non_null", "true_count"]

BIN: Final = pa.binary()
STR: Final = pa.string()
TOO_LARGE: Final = "more than 2 GiB of text in one column; convert smaller batches"


def as_binary(values: Sequence[bytes | None] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """`values` as one pa.binary() array (32-bit offsets), copying only when it must."""
    if isinstance(values, pa.ChunkedArray):
        values = pa.concat_arrays(values.chunks) if values.num_chunks else pa.array([], BIN)
    if isinstance(values, pa.Array):
        t = values.type
        if pa.types.is_binary(t):
            return values
        if pa.types.is_string(t):
            return values.view(BIN)
        if pa.types.is_large_binary(t) or pa.types.is_large_string(t):
            large = values if pa.types.is_large_binary(t) else values.view(pa.large_binary())
            try:
                return large.cast(BIN)
            except (pa.ArrowInvalid, pa.ArrowCapacityError) as exc:
                raise ValueError(TOO_LARGE) from exc
        raise TypeError(f"expected a binary or string array, got {t}")
    arr = pa.array(values, type=BIN)
    if isinstance(arr, pa.ChunkedArray):
        raise ValueError(TOO_LARGE)
    return arr


def non_null(arr: pa.Array) -> int:
    return int(len(arr) - arr.null_count)


def true_count(mask: pa.Array) -> int:
    total = pc.sum(mask).as_py()
    return int(total) if total is not None else 0


def keep(arr: pa.Array, valid: pa.Array) -> tuple[pa.Array, int]:
    """`arr` with the values where `valid` is false set to null, and how many non-null ones."""
    masked = non_null(arr) - true_count(valid)
    if masked == 0:
        return arr, 0
    return pc.if_else(valid, arr, pa.scalar(None, arr.type)), masked


def lenient_cast(arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, int]:
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

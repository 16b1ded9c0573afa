"""bytea columns: PostgreSQL's hex output ('\\x' + two hex digits per byte) decoded for the
whole column in one `binascii.unhexlify`; anything else per value, the bad ones masked."""

from __future__ import annotations

import binascii
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine_postgres.types.kernels import BIN, non_null, true_count

__all__ = ["to_bytea"]

# binary_slice's default stop overflows in pyarrow 26 ("Negative buffer resize"): pass an explicit
# one. Binary values are shorter than 2**31 bytes.
_TO_END: Final = 2**31 - 1


def to_bytea(raw: pa.Array) -> tuple[pa.Array, int]:
    """bytea_output=hex: '\\x' + two hex digits per byte. All values' hex digits are decoded in
    one `binascii.unhexlify` over the concatenated buffer, offsets halved by a kernel; this is
    only correct when every value has the prefix and an even digit count, which is checked first.
    Otherwise (escape format, malformed) each value is decoded in Python, the bad ones masked."""
    present = non_null(raw)
    if present == 0:
        return raw, 0
    digits = pc.binary_slice(raw, 2, _TO_END)
    lengths = pc.binary_length(digits)
    if (
        true_count(pc.starts_with(raw, pattern=b"\\x")) == present
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
                BIN,
                len(raw),
                [validity, halved.buffers()[1], pa.py_buffer(decoded)],
                null_count=raw.null_count,
            )
            return array, 0
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
    return pa.array(out, BIN), masked

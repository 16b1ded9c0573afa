"""numeric(p,s) with p ≤ 18 from its binary COPY form, column-wise (numpy): decimal128(p,s).

Why: the text path selects `col::text` (the server runs numeric_out per value) and parses the
strings with an Arrow cast; the binary form is a handful of small integers per value, which numpy
turns into the unscaled int64 of every row at once, with no per-value Python and no text.

The binary form (numeric_send, src/backend/utils/adt/numeric.c), big-endian:
int16 ndigits, int16 weight, uint16 sign, int16 dscale, then ndigits int16 base-10000 digits;
value = Σ digit_i × 10000^(weight − i). PostgreSQL sends its stored form, whose leading and
trailing zero digits are stripped, rounded to the column's scale on the way in.

Why p ≤ 18: every value of such a column, unscaled (× 10^s), is below 10^18 < 2^63, so the
arithmetic is exact in int64; and its digits fall on K = ceil((p−s)/4) + ceil(s/4) ≤ 6 fixed
base-10000 positions (integer and fraction parts are aligned to base-10000 digits separately:
p=18, s=1 → 5 + 1). How: one gather reads every row's header; a second reads each row's digits
at an offset shifted by its weight, so that the same column holds the same power of 10000 in
every row (a table mask zeroes the slots outside the row's digits); then the value is a
multiply-add per position with constant weights — no per-row power, no division but by a
column constant. Both gathers stay within the row and the piece padding (the note above
`_masks`).

Masking as the text path (`strict_casts.to_decimal`): 'NaN', 'Infinity', '-Infinity' become null
and are counted; NULLs stay null and are not counted. Anything PostgreSQL cannot send for such a
column (a size that does not match ndigits, more digits than fit, a digit ≥ 10000, an unknown
sign, a digit below the scale that does not divide out exactly, a value beyond the precision)
raises FramingError: it means the bytes are not what the plan expected, never a value to mask.
"""

from __future__ import annotations

from functools import cache
from typing import Final

import numpy as np
import pyarrow as pa

from cdcengine_postgres.types.convert import Converted
from cdcengine_postgres.types.framing import FramingError, gather

__all__ = ["MAX_BINARY_PRECISION", "decode_numeric"]

#: The largest precision decoded here: 10^18 − 1 still fits an int64 (2^63 ≈ 9.22e18).
MAX_BINARY_PRECISION: Final = 18
#: Base-10000 digits a value of precision ≤ 18 can need (see the module docstring).
_MAX_DIGITS: Final = 6
_HEADER: Final = 8

_POS, _NEG, _NAN, _PINF, _NINF = 0x0000, 0x4000, 0xC000, 0xD000, 0xF000


def decode_numeric(u8: np.ndarray, start: np.ndarray, size: np.ndarray, valid: np.ndarray,
                   target: pa.Decimal128Type) -> Converted:
    """One numeric column of a binary COPY piece → `target` (decimal128(p,s), p ≤ 18).

    `u8`: the piece as uint8, `PIECE_PAD` (16 zero bytes) at its end; `start`, `size`, `valid`:
    each row's field offset, byte length and non-NULL flag, as `copy_binary` finds them.
    """
    p, s = target.precision, target.scale
    if not (1 <= p <= MAX_BINARY_PRECISION and 0 <= s <= p):
        raise ValueError(f"decode_numeric handles decimal128(p ≤ 18, 0 ≤ s ≤ p), not {target}")
    n = len(start)
    frac = -(-s // 4)  # base-10000 digits after the point
    k = -(-(p - s) // 4) + frac  # positions, 10000^(k − 1 − frac) down to 10000^(−frac)
    size = np.where(valid, size, _HEADER)
    if ((size < _HEADER) | (size > _HEADER + 2 * k)).any():
        raise FramingError(f"a numeric({p},{s}) field is not 8–{_HEADER + 2 * k} bytes long")
    header = gather(u8, start, _HEADER, f"V{_HEADER}").view(">i2").reshape(n, 4)
    nd = np.where(valid, header[:, 0], 0).astype(np.int64)  # NULLs: no digits
    if (size != _HEADER + 2 * nd).any():
        raise FramingError("a numeric field's length does not match its digit count")
    sign = np.where(valid, header[:, 2].astype(np.int32) & 0xFFFF, _POS)
    finite = (sign == _POS) | (sign == _NEG)
    special = (sign == _NAN) | (sign == _PINF) | (sign == _NINF)
    if not (finite | special).all():
        raise FramingError("a numeric field has an unknown sign")
    masked = int(np.count_nonzero(special))
    nd = np.where(finite, nd, 0)  # ±Infinity and NaN: as zero digits, then null
    # slot 0 holds position k − 1: the first digit (weight) sits at slot −shift
    shift = header[:, 1].astype(np.int64) + (frac - k + 1)
    # digits above the top position (beyond the precision) or below 10^(−4·frac) (below the
    # scale, and nonzero: PostgreSQL strips trailing zero digits)
    if ((nd > 0) & ((shift > 0) | (nd - shift > k))).any():
        raise FramingError(f"a numeric field does not hold a numeric({p},{s})")
    shift = np.where(nd > 0, shift, 0)  # no digits (zero, NULL, special): any weight
    offset = np.where(nd > 0, start + (_HEADER + 2 * shift), 0)
    # the table's rows as one k·2-byte item each: one gather, as for the bytes
    keep = _masks(k)[nd - 7 * shift].view("<u2").reshape(n, k)
    digits = gather(u8, offset, 2 * k, f"V{2 * k}").view(">u2").reshape(n, k) & keep
    if (digits > 9999).any():  # uint16: a negative int16 digit shows as > 9999 too
        raise FramingError("a numeric field has a digit beyond base 10000")
    # the top slot bounds the value: top < 10^room ⇔ value < 10^p (room ≤ 4)
    room = p - s - 4 * (k - frac) + 4
    if room < 4 and (digits[:, 0] >= 10**room).any():
        raise FramingError(f"a numeric field does not hold a numeric({p},{s})")
    below = 4 * frac - s  # decimals of the last slot below the scale: must be zeros
    last = digits[:, k - 1]
    if below:
        if (last % 10**below).any():
            raise FramingError(f"a numeric field has decimals beyond numeric({p},{s})")
        last = last // 10**below
    value = last.astype(np.int64)
    if k > 1:  # every intermediate ≤ the value < 10^p ≤ 10^18: no overflow
        head = digits[:, 0].astype(np.int64)
        for slot in range(1, k - 1):
            head = head * 10_000 + digits[:, slot]
        value += head * 10 ** (4 - below)
    value = np.where(sign == _NEG, -value, value)

    # decimal128: 16 bytes little-endian per value: the int64, then its sign extension
    lanes = np.empty((n, 2), dtype="<i8")
    lanes[:, 0] = value
    lanes[:, 1] = value >> 63
    holdable = valid & finite
    nulls = n - int(np.count_nonzero(holdable))
    bitmap = None if nulls == 0 else pa.py_buffer(np.packbits(holdable, bitorder="little"))
    array = pa.Array.from_buffers(target, n, [bitmap, pa.py_buffer(lanes)], null_count=nulls)
    return Converted(array, masked)


# Both gathers (`framing.gather`) stay in bounds for the piece (PIECE_PAD: 16 bytes): a field
# starts at most at the end of the rows (a NULL last field), so the 8-byte header gather ends
# ≤ 8 past them. The digit gather is at `start` + 8 + 2·shift (shift ≤ 0) for 2k ≤ 12 bytes,
# ending ≤ 20 past a field start — only for fields with digits, which are ≥ 10 bytes and lie
# inside their row (`decode_copy_binary` checks that first): ≤ 10 past the rows. It begins
# ≥ 2·(k − 1) ≤ 10 bytes before the digits, inside the field's own header or the row before it
# (a first field starts at byte 6 of a piece). Should that ever change, the gather raises
# IndexError, never reads outside `u8`.


@cache
def _masks(k: int) -> np.ndarray:
    """Item −shift·7 + ndigits: k uint16, 0xFFFF in the slots that hold one of the value's
    digits (slots −shift … −shift + ndigits − 1), 0 elsewhere (header or the next field's
    bytes); as 'V{2k}' items, so that picking one per row is a single gather."""
    table = np.zeros((k * 7, k), dtype=np.uint16)
    for lead in range(k):
        for nd in range(_MAX_DIGITS + 1):
            table[lead * 7 + nd, lead:min(k, lead + nd)] = 0xFFFF
    return table.view(f"V{2 * k}").reshape(k * 7)

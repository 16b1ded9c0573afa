"""numeric(p,s) with p ≤ 18 from its binary COPY form, column-wise (numpy): decimal128(p,s).

Why: the text path selects `col::text` (the server runs numeric_out per value) and parses the
strings with an Arrow cast; the binary form is a handful of small integers per value, which numpy
turns into the unscaled int64 of every row at once, with no per-value Python and no text.

The binary form (numeric_send, src/backend/utils/adt/numeric.c), big-endian:
int16 ndigits, int16 weight, uint16 sign, int16 dscale, then ndigits int16 base-10000 digits;
value = Σ digit_i × 10000^(weight − i). PostgreSQL sends its stored form, whose leading and
trailing zero digits are stripped, rounded to the column's scale on the way in.

Why p ≤ 18: every value of such a column, unscaled (× 10^s), is below 10^18 < 2^63, so the
arithmetic is exact in int64; and it needs at most ceil((p−s)/4) + ceil(s/4) ≤ 6 digits (the
integer and fraction parts are aligned to base-10000 digits separately: p=18, s=1 → 5 + 1), so
one fixed 20-byte gather (8 header + 12 digit bytes) per row reads all of a value.

Masking as the text path (`strict_casts.to_decimal`): 'NaN', 'Infinity', '-Infinity' become null
and are counted; NULLs stay null and are not counted. Anything PostgreSQL cannot send for such a
column (a size that does not match ndigits, more digits than fit, a digit ≥ 10000, an unknown
sign, a digit below the scale that does not divide out exactly, a value beyond the precision)
raises FramingError: it means the bytes are not what the plan expected, never a value to mask.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa

from cdcengine_postgres.types.convert import Converted
from cdcengine_postgres.types.framing import FramingError

__all__ = ["MAX_BINARY_PRECISION", "decode_numeric"]

#: The largest precision decoded here: 10^18 − 1 still fits an int64 (2^63 ≈ 9.22e18).
MAX_BINARY_PRECISION: Final = 18
#: Base-10000 digits a value of precision ≤ 18 can need (see the module docstring).
_MAX_DIGITS: Final = 6
_HEADER: Final = 8
#: Bytes gathered per row: the header and `_MAX_DIGITS` digits.
_GATHER: Final = _HEADER + 2 * _MAX_DIGITS

_POS, _NEG, _NAN, _PINF, _NINF = 0x0000, 0x4000, 0xC000, 0xD000, 0xF000

# 10^0 … 10^18 as int64, indexed by (clipped) exponent
_POW10: Final = np.array([10**k for k in range(MAX_BINARY_PRECISION + 1)], dtype=np.int64)


def decode_numeric(u8: np.ndarray, start: np.ndarray, size: np.ndarray, valid: np.ndarray,
                   target: pa.Decimal128Type) -> Converted:
    """One numeric column of a binary COPY piece → `target` (decimal128(p,s), p ≤ 18).

    `u8`: the piece as uint8, `PIECE_PAD` (16 zero bytes) at its end; `start`, `size`, `valid`:
    each row's field offset, byte length and non-NULL flag, as `copy_binary` finds them.
    """
    precision, scale = target.precision, target.scale
    if not (1 <= precision <= MAX_BINARY_PRECISION and 0 <= scale <= precision):
        raise ValueError(f"decode_numeric handles decimal128(p ≤ 18, 0 ≤ s ≤ p), not {target}")
    n = len(start)
    size = np.where(valid, size, _HEADER)
    if ((size < _HEADER) | (size > _GATHER)).any():
        raise FramingError(f"a numeric({precision},{scale}) field is not 8–20 bytes long")
    # The gather reads 20 bytes at every start. In bounds: a valid field lies inside its row
    # (`decode_copy_binary` checks that before decoding) and is at least 8 bytes long (checked
    # just above), so its 20 bytes end at most 12 past the rows, inside the 16-byte PIECE_PAD.
    # A NULL's start may sit right at the end of the rows (20 > 16): those read at offset 0.
    # Should that ever change, the view's bounds make the gather raise, never read past `u8`.
    where = np.where(valid, start, 0)
    view = np.ndarray(shape=(len(u8) - _GATHER + 1,), dtype=f"V{_GATHER}", buffer=u8,
                      strides=(1,))
    fields = view[where].view(">i2").reshape(n, _GATHER // 2).astype(np.int64)
    # a NULL's gathered bytes are whatever sits at offset 0: read as zero (size 8 ↔ 0 digits)
    fields[~valid] = 0
    ndigits, weight, sign = fields[:, 0], fields[:, 1], fields[:, 2] & 0xFFFF
    if (size != _HEADER + 2 * ndigits).any():  # also catches ndigits < 0 or > 6
        raise FramingError("a numeric field's length does not match its digit count")
    finite = (sign == _POS) | (sign == _NEG)
    special = (sign == _NAN) | (sign == _PINF) | (sign == _NINF)
    if not (finite | special).all():
        raise FramingError("a numeric field has an unknown sign")
    holdable = valid & finite
    masked = int(np.count_nonzero(valid & special))

    value = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    for i in range(int(ndigits.max(initial=0))):  # no work for digits no value has
        digit = np.where(holdable & (i < ndigits), fields[:, 4 + i], 0)
        bad |= (digit < 0) | (digit > 9999)
        # digit_i × 10000^(weight − i) × 10^scale = digit × 10^exp
        exp = 4 * (weight - i) + scale
        # exp < 0: the digit reaches below the scale; its dropped decimals must be zeros (a
        # digit < 10^4, so exp ≤ −4 leaves only 0)
        below = 10 ** np.clip(-exp, 0, 4)
        bad |= (exp < 0) & (digit % below != 0)
        # exp ≥ 0: digit × 10^exp must stay below 10^precision — checked per digit, so that
        # no product or sum can overflow (each term < 10^18, at most 6 terms < 2^63)
        room = np.clip(precision - exp, 0, 4)
        bad |= (exp >= 0) & (digit >= 10 ** room)
        up = _POW10[np.clip(exp, 0, MAX_BINARY_PRECISION)]
        value += np.where(exp >= 0, digit * np.where(bad, 0, up), digit // below)
    limit = _POW10[precision]
    bad |= value >= limit  # the digits each fit, their sum may still not (0.99999 + …)
    if bad.any():
        raise FramingError(f"a numeric field does not hold a numeric({precision},{scale})")
    value = np.where(sign == _NEG, -value, value)
    value = np.where(holdable, value, 0)

    # decimal128: 16 bytes little-endian per value: the int64, then its sign extension
    lanes = np.empty((n, 2), dtype="<i8")
    lanes[:, 0] = value
    lanes[:, 1] = value >> 63
    nulls = n - int(np.count_nonzero(holdable))
    bitmap = None if nulls == 0 else pa.py_buffer(np.packbits(holdable, bitorder="little"))
    array = pa.Array.from_buffers(target, n, [bitmap, pa.py_buffer(lanes)], null_count=nulls)
    return Converted(array, masked)

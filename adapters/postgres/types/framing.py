"""What the binary COPY decoders share, in a module of their own so that the decoders
`copy_binary` dispatches to (`numeric_binary`) use it without importing `copy_binary` back (an
import circle, `tests/unit/test_seams.py`): the error a malformed piece raises, and the gather
that reads a field of every row at once."""

from __future__ import annotations

import numpy as np

__all__ = ["FramingError", "gather"]


def gather(u8: np.ndarray, start: np.ndarray, width: int, dtype: str) -> np.ndarray:
    """The `width`-byte values at byte offsets `start` (one per row), as `dtype` (big-endian, or
    'V<width>' for raw bytes): one gather through a view whose items overlap (stride one byte),
    so numpy loads each unaligned value directly — several times faster than gathering bytes.
    The view ends `width` bytes before `u8` does: an offset past that raises IndexError, never
    reads outside."""
    view = np.ndarray(shape=(len(u8) - width + 1,), dtype=dtype, buffer=u8, strides=(1,))
    return view[start]


class FramingError(ValueError):
    """The bytes are not rows of the expected shape (never caused by a value)."""

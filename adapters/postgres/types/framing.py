"""The one error a malformed binary COPY piece raises, in a module of its own so that the
decoders `copy_binary` dispatches to (`numeric_binary`) can raise it without importing
`copy_binary` back (an import circle, `tests/unit/test_seams.py`)."""

from __future__ import annotations

__all__ = ["FramingError"]


class FramingError(ValueError):
    """The bytes are not rows of the expected shape (never caused by a value)."""

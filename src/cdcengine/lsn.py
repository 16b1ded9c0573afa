"""LSNs are ints inside the engine; `X/Y` text only at the edges (SQL, logs, JSON)."""

from __future__ import annotations

import re
from typing import NewType

Lsn = NewType("Lsn", int)

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> Lsn:
    """`16/B374D848` -> int. Raises ValueError on anything else."""
    m = _LSN.match(text.strip())
    if not m:
        raise ValueError(f"not an LSN: {text!r}")
    return Lsn((int(m[1], 16) << 32) | int(m[2], 16))


def format_lsn(value: int) -> str:
    """int -> `16/B374D848` (PostgreSQL's spelling)."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"

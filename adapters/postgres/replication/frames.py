"""The streaming replication protocol as this client speaks it: frame layouts, the XLogData
frame, the standby status update, and the START_REPLICATION command.

Simple query protocol only (research/limits-and-pitfalls.md §3, pitfall 1): a replication
connection refuses parameters, so the command is built as text. The slot name is re-validated
(`[a-z0-9_]{1,63}`) and every publication name is double-quoted inside the single-quoted
`publication_names` option: the walsender splits that option with `SplitIdentifierString`, which
lower-cases unquoted names, so an upper-case publication would otherwise silently not exist.
Names containing quotes are refused (ValueError) instead of being escaped: nothing in our config
can produce them.

Header LSNs are not bookkeeping (pitfall 4): XLogData's `wal_start`/`wal_end` are 0/0 for
Relation messages; the core must use Begin/Commit LSNs from the payload. The header's `wal_end`
only feeds the *write* position the stream reports.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Sequence
from typing import Final, NamedTuple

from cdcengine.lsn import format_lsn

__all__ = ["PG_EPOCH_US", "XLogData", "build_start_command", "status_frame"]

#: 2000-01-01T00:00:00Z in µs since the Unix epoch: the protocol's clock origin.
PG_EPOCH_US: Final = 946_684_800_000_000

# Frame layouts (protocol-replication.html). The leading type byte is checked by the caller and
# skipped (offset 1), so the hot path unpacks only the integers it needs.
XLOGDATA: Final = struct.Struct(">QQq")  # 'w' | dataStart | walEnd | sendTime, payload at 25
KEEPALIVE: Final = struct.Struct(">QqB")  # 'k' | walEnd | sendTime | replyRequested
_STATUS: Final = struct.Struct(">cQQQqB")  # 'r' | write | flush | apply | clock | replyNow
PAYLOAD_OFFSET: Final = 1 + XLOGDATA.size  # 25
WAL_END: Final = struct.Struct(">Q").unpack_from  # XLogData's walEnd, at offset 9
XLOGDATA_KIND: Final = 0x77  # 'w'
KEEPALIVE_KIND: Final = 0x6B  # 'k'

_SLOT_NAME: Final = re.compile(r"[a-z0-9_]{1,63}")
_NAMEDATALEN: Final = 64
MAX_LSN: Final = (1 << 64) - 1


class XLogData(NamedTuple):
    """One XLogData frame: header fields plus the raw pgoutput message.

    `wal_start`/`wal_end` are the frame header's LSNs (0 for Relation messages; pitfall 4: use
    the LSNs inside Begin/Commit for bookkeeping). `send_time_us` is the server's clock in µs
    since 2000-01-01 UTC (`PG_EPOCH_US`). `payload[0:1]` is the pgoutput message type
    (b'B', b'I', b'C', b'S', ...).
    """

    wal_start: int
    wal_end: int
    send_time_us: int
    payload: bytes


def _validate_slot(slot: str) -> str:
    if not isinstance(slot, str) or not _SLOT_NAME.fullmatch(slot):
        raise ValueError(f"invalid replication slot name {slot!r}: expected [a-z0-9_]{{1,63}}")
    return slot


def _validate_publication(name: str) -> str:
    """A publication name that can be double-quoted verbatim inside the single-quoted option.

    Quotes are refused rather than doubled: `'` would end the option's string literal and `"`
    the identifier. Control characters are refused too, and names longer than NAMEDATALEN-1
    bytes, which PostgreSQL would silently truncate to a different name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid publication name {name!r}: must be a non-empty string")
    if any(c in "\"'" or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError(
            f"invalid publication name {name!r}: quotes and control characters are not allowed"
        )
    if len(name.encode("utf-8")) >= _NAMEDATALEN:
        raise ValueError(f"invalid publication name {name!r}: longer than 63 bytes")
    return name


def build_start_command(
    slot: str,
    publications: Sequence[str],
    start_lsn: int,
    *,
    proto_version: int,
    streaming: bool,
    messages: bool,
) -> str:
    """The START_REPLICATION text (simple protocol: no parameters, so everything is validated).

    `START_REPLICATION SLOT "s" LOGICAL X/Y (proto_version 'N', publication_names '"p1","p2"'
    [, streaming 'on'] [, messages 'true'])`. Raises ValueError for a bad slot or publication
    name, an empty publication list, an out-of-range LSN or an unsupported protocol version.
    """
    _validate_slot(slot)
    if isinstance(publications, str):
        raise ValueError("publications must be a list of names, not a string")
    pubs = [_validate_publication(p) for p in publications]
    if not pubs:
        raise ValueError("at least one publication name is required")
    if proto_version not in (1, 2):
        raise ValueError(f"unsupported pgoutput proto_version {proto_version!r}: expected 1 or 2")
    if streaming and proto_version < 2:
        raise ValueError("streaming needs pgoutput proto_version 2")
    if not isinstance(start_lsn, int) or not 0 <= start_lsn <= MAX_LSN:
        raise ValueError(f"invalid start LSN {start_lsn!r}")
    names = ",".join(f'"{p}"' for p in pubs)
    options = [f"proto_version '{proto_version}'", f"publication_names '{names}'"]
    if streaming:
        options.append("streaming 'on'")
    if messages:
        options.append("messages 'true'")
    lsn = format_lsn(start_lsn)
    return f'START_REPLICATION SLOT "{slot}" LOGICAL {lsn} ({", ".join(options)})'


def status_frame(write: int, flush: int, *, reply: bool) -> bytes:
    """A standby status update ('r'): `write` received, `flush` = apply durable downstream, the
    client's clock now, and whether the server should answer at once (a keepalive)."""
    return _STATUS.pack(b"r", write, flush, flush, _now_us_since_2000(), 1 if reply else 0)


def _now_us_since_2000() -> int:
    return time.time_ns() // 1000 - PG_EPOCH_US

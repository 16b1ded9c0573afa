"""`COPY … TO STDOUT` read straight from libpq, in pieces of whole rows.

Why not psycopg's `cursor.copy()`: iterating it costs a Python generator round trip per CopyData
message, and COPY TO sends one message per row, so at a million rows per second that loop alone
took most of a core (issue 16, item 4). Here the loop is one `get_copy_data(1)` call per row
(non-blocking: psycopg's Cython call would hold the GIL while it blocks, limits-and-pitfalls
§3.2); when libpq has nothing buffered it naps briefly (rows are on their way) and waits in
`select` (GIL released) only when naps bring nothing.

For a binary COPY the reader also records each row's length (one message per row), which is
what lets `types.copy_binary` find the fields column-wise; it drops the stream's header and
trailer, so a piece is whole rows only.
"""

from __future__ import annotations

import contextlib
import ctypes
import select
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq

from cdcengine_postgres.types.copy_binary import COPY_BINARY_HEADER, PIECE_PAD

__all__ = ["CopyPiece", "bound_malloc_retention", "read_copy"]

_TRAILER = b"\xff\xff"  # binary COPY: a field count of -1 ends the data
_WAIT_S = 1.0  # how often a wait for the server re-checks whether the reader was abandoned
# Waiting for rows mid-copy: when the socket is empty the next rows are on their way, so nap
# 1 ms (the socket buffers far more than a millisecond of rows, which are then read without
# waiting) rather than wake in select for every packet the server sends (one per ~50 rows:
# 40k wake-ups per 2M rows per reader on a machine the server shares); select only after 20
# naps in a row brought nothing. Measured on the bench table (3M rows, 2 workers, 4 runs
# each): select per packet 4.77 s median, 1 ms naps 4.37 s, 0.3 ms naps 4.46 s.
_NAP_S = 0.001
_NAPS = 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclass(slots=True)
class CopyPiece:
    """Whole rows of a COPY: `data` as sent (text), or without header/trailer and followed by
    `PIECE_PAD` (binary, what `decode_copy_binary` takes), and for binary each row's length."""

    data: bytes | bytearray
    row_lengths: array[int] = field(default_factory=lambda: array("q"))
    rows: int = 0


def read_copy(conn: psycopg.Connection[Any], query: bytes, *, binary: bool, piece_rows: int,
              piece_bytes: int, put: Callable[[CopyPiece], bool]) -> bool:
    """Run `query` (a COPY … TO STDOUT) on `conn` and hand its rows to `put` in pieces of at most
    `piece_rows` rows / about `piece_bytes` bytes. Returns False when `put` refused a piece
    (the consumer is gone: the COPY is then drained after the caller's cancel), else True.
    Raises the server's error as psycopg does (the caller translates it)."""
    pg = conn.pgconn
    with conn.lock:
        pg.send_query(query)
        _flush(pg)
        result = _next_result(pg)
        if result is None or result.status != pq.ExecStatus.COPY_OUT:
            _clear(pg)
            _raise(conn, result)
            raise psycopg.ProgrammingError("the query is not a COPY TO STDOUT")
        try:
            finished = _rows(pg, binary, piece_rows, piece_bytes, put)
        except BaseException:
            with contextlib.suppress(Exception):  # the connection is done for anyway
                _drain(pg)
                _clear(pg)
            raise
        if not finished:
            _drain(pg)
            _clear(pg)
            return False
        final = _next_result(pg)
        _clear(pg)
        if final is None or final.status != pq.ExecStatus.COMMAND_OK:
            _raise(conn, final)
        return True


def _rows(pg: pq.abc.PGconn, binary: bool, piece_rows: int, piece_bytes: int,
          put: Callable[[CopyPiece], bool]) -> bool:
    get, sock = pg.get_copy_data, pg.socket
    buf = bytearray()
    lengths: array[int] = array("q")
    rows = naps = last_rows = 0
    last_buf = buf
    if binary:  # the header, which may arrive glued to the first row
        n, data = get(1)
        while n == 0:
            select.select([sock], [], [], _WAIT_S)
            pg.consume_input()
            n, data = get(1)
        if n < 0:
            return True
        buf += _strip_header(bytes(data))
        if buf == _TRAILER:  # no rows: the header came glued to the trailer
            buf.clear()
        if buf:
            lengths.append(len(buf))
            rows = 1
    while True:  # the hot loop: one iteration per row
        n, data = get(1)
        if n == 0:  # libpq holds no whole row: it reads at most ~16 KB per call, so read again
            pg.consume_input()
            n, data = get(1)
            if n == 0:  # the socket is empty: wait for the server (see `_NAP_S`)
                if rows == last_rows and buf is last_buf:
                    naps += 1
                else:
                    naps, last_rows, last_buf = 0, rows, buf
                if naps < _NAPS:
                    time.sleep(_NAP_S)
                else:
                    select.select([sock], [], [], _WAIT_S)
                pg.consume_input()
                continue
        if n > 0:
            if binary:
                if n == 2 and bytes(data) == _TRAILER:
                    continue
                lengths.append(n)
            buf += data
            rows += 1
            if rows >= piece_rows or len(buf) >= piece_bytes:
                if not put(_piece(buf, lengths, rows, binary)):
                    return False
                buf = bytearray()
                lengths = array("q")
                rows = 0
        else:
            break
    return put(_piece(buf, lengths, rows, binary)) if rows else True


def _piece(buf: bytearray, lengths: array[int], rows: int, binary: bool) -> CopyPiece:
    if binary:
        buf += PIECE_PAD
    return CopyPiece(buf, lengths, rows)  # handed over, not copied: the caller starts a new one


def bound_malloc_retention() -> None:
    """Make glibc return large freed blocks to the system at once (best effort; glibc only).

    Why: a snapshot allocates a ~16 MB piece buffer per COPY piece, plus numpy arrays, from
    several threads. glibc raises its mmap threshold dynamically after such a block is freed,
    so the next ones come from its per-thread arenas, which keep freed memory: a 4M-row
    snapshot's RSS grew to 555 MB that way, 389 MB with the threshold fixed at 1 MiB (the
    `MALLOC_MMAP_THRESHOLD_` setting, here set at run time; no measurable CPU cost). Arrow's
    own buffers use mimalloc and are not affected.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def _strip_header(data: bytes) -> bytes:
    if not data.startswith(COPY_BINARY_HEADER) or len(data) < 19:
        raise psycopg.DataError("the binary COPY stream does not start with its signature")
    extension = int.from_bytes(data[15:19], "big")
    return data[19 + extension:]


def _drain(pg: pq.abc.PGconn) -> None:
    """Read and drop what is left of an abandoned COPY (after the caller's cancel it ends soon)."""
    while True:
        n, _ = pg.get_copy_data(1)
        if n == 0:
            select.select([pg.socket], [], [], _WAIT_S)
            pg.consume_input()
        elif n < 0:
            return


def _flush(pg: pq.abc.PGconn) -> None:
    while pg.flush():
        select.select([], [pg.socket], [], _WAIT_S)


def _next_result(pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
    while pg.is_busy():
        select.select([pg.socket], [], [], _WAIT_S)
        pg.consume_input()
    return pg.get_result()


def _clear(pg: pq.abc.PGconn) -> None:
    """Consume the results still pending, so the connection can run its next command."""
    while _next_result(pg) is not None:
        pass


def _raise(conn: psycopg.Connection[Any], result: pq.abc.PGresult | None) -> None:
    if result is None:
        raise psycopg.OperationalError("the server sent no result for the COPY")
    if result.status == pq.ExecStatus.FATAL_ERROR:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    if result.status != pq.ExecStatus.COMMAND_OK and result.status != pq.ExecStatus.COPY_OUT:
        raise psycopg.OperationalError(f"unexpected result status {result.status.name}")

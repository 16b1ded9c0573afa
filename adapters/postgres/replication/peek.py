"""Reading a slot's backlog through SQL: `pg_logical_slot_peek_binary_changes` in binary COPY.

The walsender sends one CopyData frame per decoded message, and its per-message send path (not
decoding) bounds every streaming client. The SQL function decodes into a tuplestore and COPY sends
it out in bulk, measured 2.6× faster than `pg_recvlogical` on a 1M-row backlog (issue 15). This
module is that read, as I/O only: `PeekCopy` runs

    COPY (SELECT data FROM pg_logical_slot_peek_binary_changes(slot, upto, NULL,
          'proto_version', '1', 'publication_names', '"pub"')) TO STDOUT (FORMAT binary)

on an ordinary connection and hands the raw pgoutput messages upward in bursts, exactly as the
replication stream hands its XLogData payloads (`changes.PostgresChanges.decode` takes either).

What the server does, and what it means here:
- the function decodes from the slot's `restart_lsn` every time (what was decoded before the
  slot's confirmed position is decoded again and only not output), so each peek should cover
  much WAL: small peeks are quadratic;
- it stops after the WAL record that ends at or beyond `upto`; output happens at commits, so a
  peek ends on a transaction boundary, and every transaction whose commit record starts before
  `upto` is in it (`catchup.py` confirms `upto` afterwards);
- the whole range is decoded before the first row is sent (the rows wait in a tuplestore, on
  disk beyond `work_mem`), so a peek is silent for a while: it is read like the replication
  stream, never blocking while holding the GIL (`copy_both.SocketWaiter`);
- it acquires the slot for its duration: the slot must not be streaming meanwhile, and an
  abandoned peek is cancelled (`close`) so the slot is free again for the next session;
- pgoutput's v2 `streaming` option does not apply (a transaction arrives whole, at its commit):
  the peek asks for proto_version 1.

Binary COPY rows of one `bytea` column: `int16 1 | int32 n | n bytes` each, after a 19-byte
header (plus its extension area) and before the `int16 -1` trailer (`CopyRows`). PostgreSQL sends
one row per CopyData frame; the parser does not rely on it.
"""

from __future__ import annotations

import struct
import time
from typing import Final

import psycopg
from psycopg import pq, sql
from psycopg.errors import error_from_result
from psycopg.rows import TupleRow

from cdcengine.lsn import format_lsn
from cdcengine_postgres.replication.copy_both import SocketWaiter, flush_out, next_result

__all__ = ["CopyRows", "PeekCopy", "peek_query"]

SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
_HEADER: Final = len(SIGNATURE) + 8  # signature, flags int32, extension length int32
_I16: Final = struct.Struct(">h").unpack_from
_I32: Final = struct.Struct(">i").unpack_from
CANCEL_WAIT_S: Final = 10.0


class CopyRows:
    """The values of a binary COPY of one non-null `bytea` column, frame by frame.

    `feed(frame, out)` appends each complete value to `out` (as bytes) and keeps an incomplete
    tail for the next frame; `ended` turns True at the trailer. Raises ValueError on anything
    that is not such a COPY (a wrong signature, a row of another width, a NULL)."""

    __slots__ = ("_header", "_pending", "ended", "rows")

    def __init__(self) -> None:
        self._header = False
        self._pending = b""
        self.ended = False
        self.rows = 0

    def feed(self, frame: bytes | memoryview, out: list[bytes]) -> None:
        buf: bytes | memoryview = frame
        if self._pending:
            buf = self._pending + bytes(frame)
            self._pending = b""
        n, off = len(buf), 0
        if not self._header:
            if n < _HEADER:
                self._pending = bytes(buf)
                return
            if bytes(buf[:len(SIGNATURE)]) != SIGNATURE:
                raise ValueError("not a binary COPY stream (bad signature)")
            (ext,) = _I32(buf, len(SIGNATURE) + 4)
            if n < _HEADER + ext:
                self._pending = bytes(buf)
                return
            off, self._header = _HEADER + ext, True
        append, rows = out.append, 0
        while off < n:
            if self.ended:
                raise ValueError("binary COPY: data after the trailer")
            if n - off < 6:
                if n - off >= 2 and _I16(buf, off)[0] == -1:
                    self.ended = True
                    off += 2
                    continue
                break
            (fields,) = _I16(buf, off)
            if fields == -1:
                self.ended = True
                off += 2
                continue
            if fields != 1:
                raise ValueError(f"binary COPY: a row of {fields} columns, expected 1")
            (size,) = _I32(buf, off + 2)
            if size < 0:
                raise ValueError("binary COPY: a NULL message")
            end = off + 6 + size
            if end > n:
                break
            append(bytes(buf[off + 6:end]))
            rows += 1
            off = end
        self.rows += rows
        if off < n:
            self._pending = bytes(buf[off:])


def peek_query(slot: str, publication: str, upto_lsn: int) -> sql.Composed:
    """The COPY of the slot's changes up to `upto_lsn` (names as literals: COPY takes no
    parameters; the publication double-quoted inside the option, as the walsender splits it)."""
    return sql.SQL(
        "COPY (SELECT data FROM pg_logical_slot_peek_binary_changes({slot}, {upto}::pg_lsn, NULL,"
        " 'proto_version', '1', 'publication_names', {pubs})) TO STDOUT (FORMAT binary)"
    ).format(slot=sql.Literal(slot), upto=sql.Literal(format_lsn(upto_lsn)),
             pubs=sql.Literal(f'"{publication}"'))


class PeekCopy:
    """One peek of a slot, read in bursts: `start()`, then `read(timeout_s, limit)` until
    `done`; `close()` cancels it when it is abandoned. Errors are `psycopg.Error`s (the caller
    translates them)."""

    def __init__(self, conn: psycopg.Connection[TupleRow], query: sql.Composed) -> None:
        self._conn = conn
        self._query = query.as_bytes(conn)
        self._pgconn = conn.pgconn
        self._waiter = SocketWaiter(self._pgconn.socket)
        self._encoding = conn.info.encoding
        self._rows = CopyRows()
        self._copying = False  # the COPY_OUT result arrived
        self.done = False
        self.started_at = 0.0
        self.first_row_at: float | None = None  # when the server began sending (decoded)

    @property
    def rows(self) -> int:
        return self._rows.rows

    def start(self) -> None:
        pgconn = self._pgconn
        if not pgconn.nonblocking:
            pgconn.nonblocking = 1
        pgconn.send_query(self._query)
        flush_out(pgconn, self._waiter)
        self.started_at = time.monotonic()

    def read(self, timeout_s: float, limit: int) -> list[bytes]:
        """Up to about `limit` messages: waits (GIL released) at most `timeout_s` for the first,
        then takes what is already received. Empty while the server still decodes."""
        out: list[bytes] = []
        if self.done:
            return out
        pgconn, waiter, feed = self._pgconn, self._waiter, self._rows.feed
        deadline = time.monotonic() + timeout_s
        if not self._copying and not self._await_copy(deadline):
            return out
        looked = False
        while len(out) < limit:
            n, buf = pgconn.get_copy_data(1)
            if n > 0:
                feed(buf, out)
                looked = False
                continue
            if n == -1:
                self._finish()
                break
            if looked:  # libpq is empty and the socket was looked at
                if out or time.monotonic() >= deadline:
                    break
                waiter.readable(max(0.0, min(deadline - time.monotonic(), 0.5)))
            pgconn.consume_input()
            looked = True
        if out and self.first_row_at is None:
            self.first_row_at = time.monotonic()
        return out

    def _await_copy(self, deadline: float) -> bool:
        """Wait for the COPY_OUT result (the server decodes first); True once it is there."""
        res = next_result(self._pgconn, self._waiter, deadline)
        if res is None:
            return False
        if res.status == pq.ExecStatus.COPY_OUT:
            self._copying = True
            return True
        self._drain_results(time.monotonic() + CANCEL_WAIT_S)
        self.done = True
        if res.status == pq.ExecStatus.FATAL_ERROR:
            raise error_from_result(res, encoding=self._encoding)
        raise psycopg.OperationalError(
            f"peeking the slot returned {pq.ExecStatus(res.status).name}, not COPY_OUT")

    def _finish(self) -> None:
        """The COPY ended: its final result says whether all of it was sent."""
        self.done = True
        error: psycopg.Error | None = None
        deadline = time.monotonic() + CANCEL_WAIT_S
        while True:
            res = next_result(self._pgconn, self._waiter, deadline)
            if res is None:
                break
            if res.status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = error_from_result(res, encoding=self._encoding)
        if error is not None:
            raise error
        if not self._rows.ended:
            raise psycopg.OperationalError("peeking the slot: the COPY ended without its trailer")

    def _drain_results(self, deadline: float) -> None:
        while next_result(self._pgconn, self._waiter, deadline) is not None:
            pass

    def close(self) -> None:
        """Abandoned before the end: cancel it and wait (bounded) until the server gave up, so
        the slot is released before anyone else uses it. The connection stays usable."""
        if self.done:
            return
        self.done = True
        pgconn = self._pgconn
        try:
            self._conn.cancel_safe(timeout=CANCEL_WAIT_S)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline:
                n, _ = pgconn.get_copy_data(1)
                if n == -1:
                    break
                if n == 0:
                    self._waiter.readable(0.2)
                    pgconn.consume_input()
            self._drain_results(deadline)
        except (psycopg.Error, OSError):
            self._conn.close()  # the server ends the query when it notices the socket gone

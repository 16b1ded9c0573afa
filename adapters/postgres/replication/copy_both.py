"""Driving a libpq connection in COPY BOTH mode without ever blocking while holding the GIL.

psycopg 3 has no replication API, so the replication stream works at the `pgconn` (libpq)
level, in libpq's non-blocking mode (research/limits-and-pitfalls.md §3, pitfall 2):
psycopg-binary calls `PQgetCopyData`, `PQgetResult` and `PQflush` without releasing the GIL, so
a blocking call freezes every other thread (the feedback timer, the Delta writer) until the
server answers. Everything here therefore asks libpq only for what it already holds and waits for
the socket in `poll()` (which releases the GIL) in between. `poll` rather than `select.select`:
a daemon with many sources can hold file descriptors above FD_SETSIZE (1024), which `select`
refuses.

These are the steps of a stream's life outside the hot read path: entering COPY BOTH
(`start_copy_both`), sending what libpq buffered (`flush_out`), collecting a result
(`next_result`, `final_error`) and ending the copy politely (`end_copy`).
"""

from __future__ import annotations

import select
import time
from typing import Final

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

__all__ = ["CLOSE_DRAIN_S", "SEND_TIMEOUT_S", "SocketWaiter", "end_copy", "final_error",
           "flush_out", "next_result", "start_copy_both"]

#: How long a status update or CopyDone may wait for the socket to accept it.
SEND_TIMEOUT_S: Final = 30.0
#: How long closing drains the server's remaining frames after our CopyDone.
CLOSE_DRAIN_S: Final = 5.0

_POLLIN: Final = getattr(select, "POLLIN", 1)
_POLLOUT: Final = getattr(select, "POLLOUT", 4)
_POLLERR: Final = getattr(select, "POLLERR", 8) | getattr(select, "POLLHUP", 16)


class SocketWaiter:
    """Waits for a socket to become readable (or writable) without holding the GIL.

    `poll()` where available (no FD_SETSIZE limit), `select()` otherwise (Windows).
    """

    __slots__ = ("_fd", "_poll_in", "_poll_io")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poll_in: select.poll | None = None
        self._poll_io: select.poll | None = None
        if hasattr(select, "poll"):
            self._poll_in = select.poll()
            self._poll_in.register(fd, _POLLIN)
            self._poll_io = select.poll()
            self._poll_io.register(fd, _POLLIN | _POLLOUT)

    def readable(self, timeout_s: float) -> None:
        """Return when the socket is readable, has an error/hang-up, or `timeout_s` passed."""
        if self._poll_in is not None:
            self._poll_in.poll(max(0, int(timeout_s * 1000 + 0.999)))
        else:
            select.select([self._fd], [], [self._fd], max(0.0, timeout_s))

    def read_or_write(self, timeout_s: float) -> tuple[bool, bool]:
        """(readable, writable) once either holds, or (False, False) on timeout."""
        if self._poll_io is not None:
            events = self._poll_io.poll(max(0, int(timeout_s * 1000 + 0.999)))
            mask = 0
            for _, ev in events:
                mask |= ev
            err = bool(mask & _POLLERR)
            return bool(mask & _POLLIN) or err, bool(mask & _POLLOUT) or err
        r, w, x = select.select([self._fd], [self._fd], [self._fd], max(0.0, timeout_s))
        return bool(r or x), bool(w or x)


def flush_out(pgconn: pq.abc.PGconn, waiter: SocketWaiter | None,
              deadline: float | None = None) -> None:
    """Send libpq's output buffer (non-blocking mode), waiting without the GIL.

    While waiting to write, incoming data is consumed into libpq's buffer (as libpq asks):
    the server may itself be blocked writing to us and only read our frame once we read.
    """
    if deadline is None:
        deadline = time.monotonic() + SEND_TIMEOUT_S
    while pgconn.flush() == 1:
        left = deadline - time.monotonic()
        if left <= 0 or waiter is None:
            raise psycopg.OperationalError("could not send data to the server: timed out")
        readable, _ = waiter.read_or_write(min(left, 1.0))
        if readable:
            pgconn.consume_input()


def next_result(pgconn: pq.abc.PGconn, waiter: SocketWaiter | None,
                deadline: float) -> pq.abc.PGresult | None:
    """`get_result()` once libpq has the whole result, waiting for it in `poll()` (GIL
    released) until `deadline`; None at the end of the results or when out of time.
    psycopg-binary's get_result blocks in libpq holding the GIL when the result is still
    on its way."""
    while True:
        # what libpq already holds first: after the server closed the connection, reading
        # the socket again raises and would hide the server's own final error (57P01 …)
        if not pgconn.is_busy():
            return pgconn.get_result()
        pgconn.consume_input()
        if not pgconn.is_busy():
            return pgconn.get_result()
        left = deadline - time.monotonic()
        if left <= 0 or waiter is None:
            return None
        waiter.readable(min(left, 0.5))


def start_copy_both(pgconn: pq.abc.PGconn, waiter: SocketWaiter, command: str, *,
                    encoding: str, connect_timeout: int) -> None:
    """Send `command` (START_REPLICATION) and wait (GIL released) for its COPY_BOTH result;
    raise the server's error (a `psycopg.Error`) for anything else."""
    pgconn.send_query(command.encode(encoding))
    flush_out(pgconn, waiter)
    deadline = time.monotonic() + max(connect_timeout, 1) * 3
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise psycopg.OperationalError("START_REPLICATION timed out")
        waiter.readable(min(left, 1.0))
    res = pgconn.get_result()
    if res is None:
        raise psycopg.OperationalError("START_REPLICATION returned no result")
    if res.status == pq.ExecStatus.COPY_BOTH:
        return
    # An error (or anything else): collect the rest so the connection is not left mid-result
    # -- without a blocking get_result, which would wait for the server holding the GIL
    # (a frozen server then froze the whole process)
    while next_result(pgconn, waiter, deadline) is not None:
        pass
    if res.status == pq.ExecStatus.FATAL_ERROR:
        raise error_from_result(res, encoding=encoding)
    raise psycopg.OperationalError(
        f"START_REPLICATION returned {pq.ExecStatus(res.status).name}, not COPY_BOTH"
    )


def final_error(pgconn: pq.abc.PGconn, waiter: SocketWaiter | None,
                encoding: str) -> psycopg.Error | None:
    """Why the server ended the copy stream (`get_copy_data` returned -1), as the server's
    error, or None when it ended it without one (COMMAND_OK: a server shutdown) or the reason
    did not arrive within `CLOSE_DRAIN_S`. A connection that breaks while asking is the cause."""
    deadline = time.monotonic() + CLOSE_DRAIN_S
    try:
        res = next_result(pgconn, waiter, deadline)
        while res is not None and res.status != pq.ExecStatus.FATAL_ERROR:
            res = next_result(pgconn, waiter, deadline)
        if res is not None:
            return error_from_result(res, encoding=encoding)
    except psycopg.Error as err:  # the connection broke while we asked: that is the cause
        return err
    return None


def end_copy(pgconn: pq.abc.PGconn, waiter: SocketWaiter | None) -> None:
    """Send CopyDone and drain the server's last frames and results, for `CLOSE_DRAIN_S` at
    most. Raises `psycopg.Error`/`OSError` when the server or the network is gone."""
    if pgconn.status != pq.ConnStatus.OK:
        return
    # put_copy_end returns 0 when libpq's buffer is full in non-blocking mode: flush and retry.
    deadline = time.monotonic() + CLOSE_DRAIN_S
    while pgconn.put_copy_end() == 0:
        flush_out(pgconn, waiter, deadline)
    flush_out(pgconn, waiter, deadline)
    while True:
        n, _ = pgconn.get_copy_data(1)
        if n == -1:
            break
        if n == 0:
            left = deadline - time.monotonic()
            if left <= 0 or waiter is None:
                return
            waiter.readable(min(left, 0.5))
            pgconn.consume_input()
    while time.monotonic() < deadline:
        pgconn.consume_input()
        if pgconn.is_busy():
            if waiter is None:
                return
            waiter.readable(min(deadline - time.monotonic(), 0.5))
            continue
        if pgconn.get_result() is None:
            return

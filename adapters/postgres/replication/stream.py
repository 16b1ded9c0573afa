"""The logical replication stream: START_REPLICATION on a walsender connection, raw pgoutput out.

This is the I/O layer only. It hands each pgoutput message upward as raw bytes (`XLogData.payload`)
and never parses it; decoding Begin/Relation/Insert/... is the decoder's job, and deciding what is
durable is the core's. What this layer owns is everything the replication protocol demands of a
client (research/limits-and-pitfalls.md §3):

* **No replication API in psycopg 3.** START_REPLICATION is sent as a plain simple-protocol query
  on a `replication=database` connection (`connection.connect(..., replication=True)`); its result
  is COPY_BOTH, after which the connection carries CopyData frames both ways. We drive this at the
  `pgconn` (libpq) level, so it works whatever psycopg's cursor does with a COPY_BOTH result. The
  command and the frames are in `frames` (pitfalls 1 and 4).
* **Never block holding the GIL (pitfall 2).** psycopg-binary calls `PQgetCopyData` without
  releasing the GIL, so a blocking `get_copy_data(0)` freezes every other thread (the feedback
  timer, the Delta writer) until data arrives. We only ever call `get_copy_data(1)` (async), and
  when libpq has nothing buffered we wait in `poll()` on the socket (which releases the GIL),
  then `consume_input()`. The connection is switched to libpq non-blocking mode so that sending a
  status update cannot block either; the waiting and the steps outside the read path (entering
  and ending COPY BOTH, flushing, collecting results) are in `copy_both`.
* **Keepalives and status updates (pitfall 3).** The walsender sends 'k' frames; one with
  replyRequested=1 must be answered at once, and the client must send a standby status update
  ('r') at least every `wal_sender_timeout` or the server drops it (`terminating walsender
  process due to replication timeout`). Keepalives are handled inside `read()`; status updates go
  out every `status_interval_s` and when requested. Any status message resets the server's
  timeout, so a caller that stops reading for a while can keep the stream alive by calling
  `send_status()` from another thread (the methods are serialised by a lock).
* **Idle sources must not hold WAL back (pitfall 6).** PostgreSQL sends nothing for empty or
  unpublished transactions, only keepalives with a growing `wal_end`. `keepalive_lsn` exposes it;
  the core confirms it (via `set_flush_lsn`) when nothing is in flight.

Status update fields: write = the highest position received (XLogData or keepalive `wal_end`;
reporting it stops the walsender from re-sending unrequested keepalives for a position we already
have), flush = apply = what the core said is durable (`set_flush_lsn`, never moving backwards;
0 = "nothing claimed", which the server ignores). For a logical slot only `flush` matters: it
becomes `confirmed_flush_lsn` at once, in memory (pitfall 5: it is not durable in PG 15, so the
sink must be idempotent anyway).

Errors: every driver error is re-raised through `translate_errors` as a `CDCError` (a missing slot
is `slot_missing`, a held one `slot_in_use`, an invalidated one `slot_invalidated`, a lost
connection a retryable `connection_failed`). When the server ends the copy stream itself
(`get_copy_data` returns -1: a terminated walsender, a server shutdown), the server's final result
is classified; whatever it is not recognised as becomes a retryable `connection_failed`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Final, Self, TypeVar

import psycopg
from psycopg import pq
from psycopg.rows import TupleRow

from cdcengine.errors import CDCError, Reason, SourceUnreachable
from cdcengine.ssh_tunnel import SshTunnel
from cdcengine_postgres.connection import connect
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.replication.copy_both import (
    SEND_TIMEOUT_S,
    SocketWaiter,
    end_copy,
    final_error,
    flush_out,
    start_copy_both,
)
from cdcengine_postgres.replication.frames import (
    KEEPALIVE,
    KEEPALIVE_KIND,
    MAX_LSN,
    PAYLOAD_OFFSET,
    WAL_END,
    XLOGDATA,
    XLOGDATA_KIND,
    XLogData,
    build_start_command,
    status_frame,
)

__all__ = ["ReplicationStream"]

_PG14: Final = 140000

_new_tuple = tuple.__new__
_NOT_RUNNING: Final = "the replication stream is not running (not started, or closed)"
_T = TypeVar("_T")


class ReplicationStream:
    """A pgoutput logical replication stream from one slot, read as raw XLogData frames.

    Usage::

        with ReplicationStream(dsn, slot="cdc_shop", publications=["cdc_shop"],
                               start_lsn=resume_lsn, proto_version=2) as stream:
            while running:
                msg = stream.read(1.0)          # XLogData | None (timeout)
                if msg is not None:
                    decoder.feed(msg.payload)
                stream.set_flush_lsn(durable)  # sent with the next status update

    Construction validates the arguments (ValueError) and does no I/O; `start()` (or entering
    the `with` block) connects and runs START_REPLICATION. The server starts at
    max(`start_lsn`, the slot's confirmed_flush_lsn) and sends every transaction whose commit
    ends after that point (0 = "from the slot's confirmed position"). `tunnel`: the source's
    `ssh_tunnel`, which this connection goes through like every other (`connection.connect`).

    `proto_version` 2 asks for `streaming 'on'` (large in-progress transactions arrive as
    'S'/'E' segments followed by 'c' Stream Commit or 'A' Stream Abort, pitfall 9) unless
    `streaming=False`; it needs PostgreSQL 14+, as does `messages=True` (logical decoding
    messages, 'M'). An older server gives a `CDCError` (`prerequisites_failed`) from `start()`.

    Thread safety: `read`, `send_status` and `close` are serialised by an internal lock, so a
    second thread may call `send_status()`/`set_flush_lsn()` while another reads. `read` releases
    the lock (and the GIL) while it waits for the socket.
    """

    def __init__(
        self,
        dsn: str,
        *,
        slot: str,
        publications: Sequence[str],
        start_lsn: int = 0,
        proto_version: int = 1,
        streaming: bool | None = None,
        messages: bool = False,
        status_interval_s: float = 10.0,
        silence_timeout_s: float | None = None,
        secrets: Iterable[str] = (),
        application_name: str = "cdcengine",
        connect_timeout: int = 10,
        tunnel: SshTunnel | None = None,
    ) -> None:
        streaming = proto_version >= 2 if streaming is None else streaming
        # Validate everything now: a bad name must fail before any connection is opened.
        self._command = build_start_command(
            slot,
            publications,
            start_lsn,
            proto_version=proto_version,
            streaming=streaming,
            messages=messages,
        )
        if not status_interval_s > 0:
            raise ValueError(f"status_interval_s must be positive, got {status_interval_s!r}")
        if silence_timeout_s is not None and not silence_timeout_s > status_interval_s:
            raise ValueError(f"silence_timeout_s must exceed status_interval_s, got "
                             f"{silence_timeout_s!r}")
        self.silence_timeout_s: Final = silence_timeout_s
        self._dsn = dsn
        self._tunnel = tunnel  # the source's ssh_tunnel: the stream goes through it too
        self._secrets = tuple(s for s in secrets if s)
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self.slot: Final = slot
        self.publications: Final = tuple(publications)
        self.start_lsn: Final = start_lsn
        self.proto_version: Final = proto_version
        self.streaming: Final = streaming
        self.messages_enabled: Final = messages
        self.status_interval_s: Final = float(status_interval_s)
        self._context = f'replication stream of slot "{slot}"'
        # Built once: `read` enters it on every call, and it holds no per-use state.
        self._translator = translate_errors(secrets=self._secrets, context=self._context)

        self._conn: psycopg.Connection[TupleRow] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._waiter: SocketWaiter | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False  # the server ended the copy stream (or the connection broke)

        self._received_lsn = 0  # write position: highest wal_end received
        self._keepalive_lsn = 0  # highest wal_end carried by a keepalive
        self._deferred_keepalive = 0  # one met while draining: applied on the next read
        self._pending_error: CDCError | None = None  # the stream ended during a drain
        self._flush_lsn = 0  # what the core said is durable
        self._next_status = 0.0  # time.monotonic() deadline of the next periodic status
        self._heard_at = 0.0  # time.monotonic() of the last frame from the server
        self._last_status_at: float | None = None
        self._server_version = 0

    # ------------------------------------------------------------------ properties

    @property
    def command(self) -> str:
        """The START_REPLICATION command this stream sends (for logs and tests)."""
        return self._command

    @property
    def server_version(self) -> int:
        """The server's server_version_num (0 before `start()`)."""
        return self._server_version

    @property
    def received_lsn(self) -> int:
        """Highest `wal_end` received (XLogData or keepalive): the write position we report."""
        return self._received_lsn

    @property
    def keepalive_lsn(self) -> int:
        """Highest `wal_end` seen in a keepalive (0 before the first one).

        The walsender has decoded all WAL up to it, and every transaction ending at or before it
        was sent *before* that keepalive, so it was already returned by `read()` (keepalives are
        consumed in stream order, never ahead of an XLogData not yet returned; `read_payloads`
        applies one met behind frames of its burst only on its next call, once the caller has
        them). With no transaction in flight the core may therefore confirm it (pitfall 6).
        """
        return self._keepalive_lsn

    @property
    def flush_lsn(self) -> int:
        """The flush position reported to the server (the highest `set_flush_lsn`)."""
        return self._flush_lsn

    @property
    def last_status_at(self) -> float | None:
        """`time.monotonic()` of the last status update sent, or None."""
        return self._last_status_at

    @property
    def started(self) -> bool:
        return self._pgconn is not None

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        if self._pgconn is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Connect and run START_REPLICATION; return once the server is in COPY BOTH mode.

        Raises `CDCError`: `slot_missing`, `slot_in_use`, `slot_invalidated`,
        `publication_missing` (PG 15 only reports that once a change is decoded, from `read`),
        `connection_failed`, `auth_failed`, `prerequisites_failed` (protocol options the server
        is too old for), ...
        """
        if self._closed:
            raise RuntimeError(_NOT_RUNNING)
        if self._pgconn is not None:
            raise RuntimeError("the replication stream is already started")
        conn = connect(
            self._dsn,
            replication=True,
            secrets=self._secrets,
            tunnel=self._tunnel,
            application_name=self._application_name,
            connect_timeout=self._connect_timeout,
        )
        try:
            self._server_version = conn.info.server_version
            if (self.streaming or self.messages_enabled or self.proto_version >= 2) and (
                self._server_version < _PG14
            ):
                raise CDCError(
                    f"{self._context}: pgoutput proto_version {self.proto_version}"
                    f"{' with streaming' if self.streaming else ''}"
                    f"{' and messages' if self.messages_enabled else ''} needs PostgreSQL 14 or "
                    f"later (server version {self._server_version}).",
                    reason=Reason.PREREQUISITES_FAILED,
                    fix="Use proto_version 1 without messages on this server, or upgrade it.",
                )
            with self._translator:
                pgconn = conn.pgconn
                self._waiter = SocketWaiter(pgconn.socket)
                pgconn.nonblocking = 1
                start_copy_both(pgconn, self._waiter, self._command,
                                encoding=conn.info.encoding, connect_timeout=self._connect_timeout)
        except BaseException:
            self._waiter = None
            conn.close()
            raise
        self._conn = conn
        self._pgconn = pgconn
        self._received_lsn = max(self._received_lsn, self.start_lsn)
        self._next_status = time.monotonic() + self.status_interval_s
        self._heard_at = time.monotonic()

    def close(self) -> None:
        """End the stream: CopyDone, drain the server's last frames (bounded), close.

        Safe to call more than once, before `start()`, and after the server or the network went
        away: failures while ending the copy are ignored, the connection is closed regardless.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conn, pgconn = self._conn, self._pgconn
            self._conn = self._pgconn = None
            try:
                if pgconn is not None and not self._ended:
                    end_copy(pgconn, self._waiter)
            except (psycopg.Error, OSError):
                pass  # the server is gone or misbehaving: closing the socket is all that is left
            finally:
                self._waiter = None
                if conn is not None:
                    conn.close()

    # ------------------------------------------------------------------ reading

    def read(self, timeout_s: float) -> XLogData | None:
        """The next XLogData frame, or None when none arrived within `timeout_s` seconds.

        Keepalives are consumed here (recorded in `keepalive_lsn`, answered at once when the
        server asks), and periodic status updates are sent from here, so call it regularly (at
        least every `wal_sender_timeout`/2, 30 s by default) or call `send_status()` from
        another thread. Waiting happens in `poll()` without the GIL (pitfall 2); `timeout_s=0`
        only returns what is already buffered.

        Raises `CDCError` on any failure; a stream the server ended is `connection_failed`
        (retryable) unless the server's final error says something more specific.
        """
        return self._reading(lambda pgconn: self._read(pgconn, self._lock, time.monotonic,
                                                       timeout_s))

    def _read(
        self,
        pgconn: pq.abc.PGconn,
        lock: threading.Lock,
        monotonic: Callable[[], float],
        timeout_s: float,
    ) -> XLogData | None:
        deadline: float | None = None
        polled = looked = False
        while True:
            # Hot path: one lock, one clock read, one frame; no allocation besides the result.
            with lock:
                if self._pgconn is None:
                    raise RuntimeError(_NOT_RUNNING)
                now = monotonic()
                if now >= self._next_status:
                    # silent for a status interval: ask the server to answer (a keepalive), so
                    # a dead or stalled connection shows up as silence we can time
                    self._send_status_locked(pgconn, reply=now - self._heard_at
                                             >= self.status_interval_s)
                    self._next_status = now + self.status_interval_s
                n, buf = pgconn.get_copy_data(1)
                if n > 0:
                    self._heard_at = now
                    kind = buf[0]
                    if kind == XLOGDATA_KIND:
                        start, end, ts = XLOGDATA.unpack_from(buf, 1)
                        if end > self._received_lsn:
                            self._received_lsn = end
                        return _new_tuple(
                            XLogData, (start, end, ts, bytes(buf[PAYLOAD_OFFSET:]))
                        )
                    if kind == KEEPALIVE_KIND:
                        self._on_keepalive(pgconn, buf)
                    # Other frame types are not defined for logical replication: skip them.
                    continue
                if n == -1:
                    raise self._stream_ended(pgconn)
            # Nothing buffered: wait for the socket without the lock and the GIL, but not past
            # the timeout or the next periodic status update.
            now = monotonic()
            silence = self.silence_timeout_s
            if silence is not None and now - self._heard_at > silence:
                if not looked:  # the reader may have been away: look at the socket first
                    looked = True
                    with lock:
                        if self._pgconn is None:
                            raise RuntimeError(_NOT_RUNNING)
                        pgconn.consume_input()
                    continue
                self._ended = True
                raise SourceUnreachable(
                    f"{self._context}: nothing heard from the server for {silence:.0f} s "
                    "although asked to answer (replication_timeout_s): the connection is dead "
                    "or stalled, or the walsender is not running.",
                    reason=Reason.CONNECTION_FAILED)
            if deadline is None:
                deadline = now + timeout_s
            if now >= deadline:
                if polled:
                    return None
                # out of time, but the socket may hold more already: one non-blocking look
                polled = True
                with lock:
                    if self._pgconn is None:
                        raise RuntimeError(_NOT_RUNNING)
                    pgconn.consume_input()
                continue
            waiter = self._waiter
            if waiter is None:
                raise RuntimeError(_NOT_RUNNING)
            waiter.readable(min(deadline, self._next_status) - now)
            with lock:
                if self._pgconn is None:
                    raise RuntimeError(_NOT_RUNNING)
                pgconn.consume_input()

    def read_payloads(self, timeout_s: float, limit: int) -> list[bytes]:
        """The payloads of up to `limit` XLogData frames: the first waited for like `read`
        (empty list when none arrived within `timeout_s`), then every further frame already
        received, without waiting. The reading thread's hot path: one lock and one call for a
        whole burst of frames, and nothing but the payload kept per frame.

        Keepalives met after the first frame are answered at once when the server asks, but
        their position reaches `keepalive_lsn` only on the next call, so that it never runs
        ahead of frames returned but not yet processed by the caller. A stream that ends after
        some frames were collected returns them; the next call raises.
        """
        def burst(pgconn: pq.abc.PGconn) -> list[bytes]:
            first = self._read(pgconn, self._lock, time.monotonic, timeout_s)
            if first is None:
                return []
            out = [first.payload]
            if limit > 1:
                self._drain(pgconn, out, limit)
            return out

        return self._reading(burst)

    def _reading(self, step: Callable[[pq.abc.PGconn], _T]) -> _T:
        """Run one read `step` on the live connection, errors translated; any driver error
        ends the stream (in COPY BOTH every one is fatal)."""
        pgconn = self._pgconn
        if pgconn is None:
            raise RuntimeError(_NOT_RUNNING)
        self._before_read()
        with self._translator:
            try:
                return step(pgconn)
            except psycopg.Error:
                self._ended = True
                raise

    def _before_read(self) -> None:
        """Raise for an ended stream (once with the cause a drain met); apply a keepalive
        position a drain deferred: the caller has processed that drain's frames by now."""
        if self._ended:
            err, self._pending_error = self._pending_error, None
            raise err or self._ended_error()
        if self._deferred_keepalive > self._keepalive_lsn:
            self._keepalive_lsn = self._deferred_keepalive

    def _drain(self, pgconn: pq.abc.PGconn, out: list[bytes], limit: int) -> None:
        """Append the payloads of frames libpq has (or the socket holds) to `out`."""
        append = out.append
        wal_end = WAL_END
        received = self._received_lsn
        consumed = False
        left = limit - len(out)
        with self._lock:
            if self._pgconn is None:
                raise RuntimeError(_NOT_RUNNING)
            try:
                while left > 0:
                    n, buf = pgconn.get_copy_data(1)
                    if n > 0:
                        kind = buf[0]
                        if kind == XLOGDATA_KIND:
                            (end,) = wal_end(buf, 9)
                            if end > received:
                                received = end
                            append(bytes(buf[PAYLOAD_OFFSET:]))
                            left -= 1
                            consumed = False
                        elif kind == KEEPALIVE_KIND:
                            self._on_keepalive(pgconn, buf, defer=True)
                        continue
                    if n == -1:
                        # the frames so far are returned; the next call raises the cause
                        self._pending_error = self._stream_ended(pgconn)
                        return
                    if consumed:
                        return
                    pgconn.consume_input()  # one non-blocking look at the socket
                    consumed = True
            finally:
                if received > self._received_lsn:
                    self._received_lsn = received

    def messages(self, stop: threading.Event, *, poll_s: float = 0.5) -> Iterator[XLogData]:
        """Iterate over XLogData frames until `stop` is set (checked at least every `poll_s`)."""
        while not stop.is_set():
            msg = self.read(poll_s)
            if msg is not None:
                yield msg

    def _on_keepalive(self, pgconn: pq.abc.PGconn, buf: memoryview, *, defer: bool = False) -> None:
        wal_end, _, reply = KEEPALIVE.unpack_from(buf, 1)
        if defer:
            if wal_end > self._deferred_keepalive:
                self._deferred_keepalive = wal_end
        elif wal_end > self._keepalive_lsn:
            self._keepalive_lsn = wal_end
        if wal_end > self._received_lsn:
            self._received_lsn = wal_end
        if reply:
            # Pitfall 3: unanswered, the walsender gives up after wal_sender_timeout.
            self._send_status_locked(pgconn)

    def _stream_ended(self, pgconn: pq.abc.PGconn) -> CDCError:
        """The CDCError for a copy stream the server ended (get_copy_data returned -1).

        The final result tells why: a FATAL error such as 57P01 (terminated walsender), a slot
        invalidated while streaming, a publication dropped, or COMMAND_OK when the walsender ended
        the stream itself (server shutdown). Recognised errors keep their reason; everything else
        is a retryable connection_failed.
        """
        self._ended = True
        exc = final_error(pgconn, self._waiter, self._encoding())
        message = f"{self._context}: the server ended the replication stream"
        if exc is None:
            return SourceUnreachable(f"{message}.", reason=Reason.CONNECTION_FAILED)
        try:
            with self._translator:
                raise exc
        except CDCError as err:
            if err.reason not in (Reason.UNKNOWN, Reason.CONNECTION_FAILED):
                return err  # e.g. slot_invalidated, publication_missing: more telling
            # Name the server's error by class and SQLSTATE only: its text is not ours to show.
            state = f" {exc.sqlstate}" if exc.sqlstate else ""
            fresh = SourceUnreachable(
                f"{message} ({type(exc).__name__}{state}).", reason=Reason.CONNECTION_FAILED
            )
            fresh.__cause__ = err.__cause__
            return fresh
        raise AssertionError("unreachable")  # pragma: no cover

    def _ended_error(self) -> CDCError:
        """For calls after the stream already failed: the error was reported once already."""
        return SourceUnreachable(
            f"{self._context}: the replication stream has ended; start a new one.",
            reason=Reason.CONNECTION_FAILED,
        )

    def _encoding(self) -> str:
        conn = self._conn
        return conn.info.encoding if conn is not None else "utf-8"

    # ------------------------------------------------------------------ feedback

    def set_flush_lsn(self, lsn: int) -> None:
        """Record that everything up to `lsn` is durable downstream (reported as flush/apply).

        Monotonic: a lower value is ignored. Takes effect with the next status update (periodic,
        requested, or `send_status()`).
        """
        if not isinstance(lsn, int) or not 0 <= lsn <= MAX_LSN:
            raise ValueError(f"invalid LSN {lsn!r}")
        if lsn > self._flush_lsn:
            self._flush_lsn = lsn

    def send_status(self, force: bool = True) -> bool:
        """Send a standby status update now (`force`), or only if the periodic one is due.

        Returns whether one was sent. Raises `CDCError` when the connection is broken.
        """
        with self._lock:
            pgconn = self._pgconn
            if pgconn is None:
                raise RuntimeError(_NOT_RUNNING)
            if self._ended:
                raise self._ended_error()
            now = time.monotonic()
            if not force and now < self._next_status:
                return False
            with self._translator:  # the periodic one is due: as `read` would send it
                self._send_status_locked(pgconn, reply=not force and now - self._heard_at
                                         >= self.status_interval_s)
            if not force:
                self._next_status = now + self.status_interval_s
            return True

    def _send_status_locked(self, pgconn: pq.abc.PGconn, *, reply: bool = False) -> None:
        flush = self._flush_lsn
        write = self._received_lsn if self._received_lsn > flush else flush
        frame = status_frame(write, flush, reply=reply)
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while pgconn.put_copy_data(frame) == 0:  # non-blocking libpq buffer full
            flush_out(pgconn, self._waiter, deadline)
        flush_out(pgconn, self._waiter, deadline)
        # not `_next_status`: statuses the caller forces more often than the interval must not
        # postpone the periodic one, the only one asking an idle server to answer
        self._last_status_at = time.monotonic()

"""`CatchupChanges`: a change session that reads a far-behind slot's backlog in large SQL peeks,
then streams (issue 15).

The walsender's per-message send path bounds every streaming client; `pg_logical_slot_peek_
binary_changes` in binary COPY sends the same pgoutput messages in bulk (`peek.py`). When the
slot lags the server by at least `catchup_threshold_mb` at the start of a session (a first start
on a busy database, after downtime), this session reads the backlog that way, chunk by chunk,
and feeds every message through the streaming session's own decoder (`PostgresChanges.decode`:
the packed-insert path, the transaction assembler, the relation keys), so the core sees the same
events, in the same order, from either path. Near the tip it starts the replication stream in
the same session, from where the last chunk ended.

One chunk, and why it is exactly once:
1. **peek** up to `upto` = min(the server's flushed WAL, confirmed + max(`catchup_chunk_mb`,
   confirmed − restart_lsn)). A peek decodes from the slot's restart point every time, so the
   chunk grows with the distance that is decoded again (a long-open transaction holding
   `restart_lsn` back makes chunks larger, never quadratic). The peek ends on a transaction
   boundary; it holds every transaction whose commit record starts before `upto`;
2. its events go to the core like streamed ones; once the COPY ended, `keepalive_lsn` becomes
   `upto` (as a walsender's keepalive would: everything before it was sent), and the session
   waits (`draining`) until the core says, through `set_flush_lsn`, that all of it is durable
   in Delta (`Progress` decides that exactly as for streaming: transaction actions as today);
3. only then is the slot advanced (`pg_replication_slot_advance`) to that durable position,
   so the next peek does not decode it again; then the lag decides: another chunk, or stream.
A kill at any point leaves the slot at or before what is durable (never after), and Delta skips
what it already applied on the replay: the failpoints `catchup_chunk_read`,
`catchup_chunk_durable` and `catchup_chunk_advanced` are the tests' kill points.

The slot is acquired by each peek and advance and released after: it must not be streaming
meanwhile (it is not: this session is the source's only consumer, under the pipeline's lease),
and an abandoned peek is cancelled before the session closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import psycopg
import structlog
from psycopg.rows import TupleRow

from cdcengine import failpoints
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.events import Event, Relation
from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.replication.changes import DRAIN_FRAMES, ColumnConverter, PostgresChanges
from cdcengine_postgres.replication.peek import PeekCopy, peek_query

log = structlog.get_logger("cdcengine.postgres.catchup")
_T = TypeVar("_T")

MB = 1024 * 1024
DRAIN_POLL_S = 0.02  # while waiting for the core to make a chunk durable

_SLOT_SQL = (
    "SELECT s.confirmed_flush_lsn::text, s.restart_lsn::text,"
    " CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END"
    " FROM pg_replication_slots s WHERE s.slot_name = %s")
_ADVANCE_SQL = "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)"


@dataclass(frozen=True, slots=True)
class SlotPosition:
    confirmed: int
    restart: int
    wal: int | None  # the server's flushed WAL position (None on a standby)

    @property
    def lag(self) -> int:
        return 0 if self.wal is None else max(0, self.wal - self.confirmed)


def chunk_end(pos: SlotPosition, chunk_bytes: int) -> int:
    """Where the next peek ends: at least `chunk_bytes` past the confirmed position, and at
    least as far again as the peek decodes before it (confirmed − restart_lsn), so the
    decoding repeated across chunks stays a bounded multiple of the backlog; never past the
    flushed WAL (the peek would stop there, short of what is then confirmed)."""
    assert pos.wal is not None
    reread = max(0, pos.confirmed - pos.restart)
    return min(pos.wal, pos.confirmed + max(chunk_bytes, reread))


def should_catch_up(lag_bytes: int, threshold_mb: int) -> bool:
    """Peek (rather than stream) while the slot is at least `threshold_mb` behind; 0: never."""
    return threshold_mb > 0 and lag_bytes >= threshold_mb * MB


class CatchupChanges:
    """A `ChangeSession` that catches up through SQL peeks, then streams (see the module)."""

    def __init__(self, source: SourceConfig, *, start_lsn: int = 0,
                 spill_dir: Path | None = None) -> None:
        self.source = source
        self._changes = PostgresChanges(source, start_lsn=start_lsn, spill_dir=spill_dir)
        self._secrets = source.secrets()
        self._start = start_lsn
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._peek: PeekCopy | None = None
        self._streaming = False
        self._upto = 0  # end of the current chunk
        self._keepalive = 0  # confirmable when nothing is in flight: the end of a chunk read
        self._flush = 0  # what the core said is durable
        self._advanced = 0  # the slot's confirmed position, as we know it
        self._chunks = self._rows = 0
        self._began = 0.0
        self._chunk_started = 0.0

    # ---- the session ---------------------------------------------------------------------------
    def __enter__(self) -> CatchupChanges:
        try:
            self._conn = self._sql(lambda: connect_source(
                self.source, application_name=f"cdcengine:{self.source.name}:catchup"),
                "connecting")
            pos = self._position()
            if self._start > pos.confirmed:  # what this process confirmed last: durable
                self._advance(self._start)
                pos = self._position()
            self._advanced = self._keepalive = pos.confirmed
            if pos.wal is not None and should_catch_up(pos.lag,
                                                       self.source.catchup_threshold_mb):
                self._began = time.monotonic()
                log.info("catchup_started", source=self.source.name,
                         start_lsn=format_lsn(pos.confirmed), lag_bytes=pos.lag,
                         restart_lsn=format_lsn(pos.restart),
                         threshold_mb=self.source.catchup_threshold_mb,
                         chunk_mb=self.source.catchup_chunk_mb)
                self._next_chunk(pos)
            else:
                self._stream()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def catching_up(self) -> bool:
        return not self._streaming

    @property
    def draining(self) -> bool:
        """A chunk was read whole and the session waits until the core made it durable: the
        core should hand what it buffers to the sink now rather than at its next interval."""
        return not self._streaming and self._peek is not None and self._peek.done

    def events(self, timeout_s: float) -> Iterator[Event]:
        if self._streaming:
            yield from self._changes.events(timeout_s)
            return
        peek = self._peek
        assert peek is not None
        if not peek.done:
            payloads = self._sql(lambda: peek.read(timeout_s, DRAIN_FRAMES), "peeking the slot")
            if payloads:
                yield from self._changes.decode(payloads)
            if peek.done:  # every event of the chunk was taken by the caller
                self._chunk_read(peek)
            return
        if self._flush < self._upto:
            time.sleep(min(timeout_s, DRAIN_POLL_S))
            return
        failpoints.hit("catchup_chunk_durable")
        self._advance(self._flush)
        failpoints.hit("catchup_chunk_advanced")
        pos = self._position()
        if pos.wal is not None and should_catch_up(pos.lag, self.source.catchup_threshold_mb):
            self._next_chunk(pos)
        else:
            self._finish(pos)

    def converters(self, relation: Relation) -> Sequence[ColumnConverter]:
        return self._changes.converters(relation)

    def set_flush_lsn(self, lsn: int) -> None:
        self._flush = max(self._flush, lsn)
        if self._streaming:
            self._changes.set_flush_lsn(lsn)

    def send_status(self) -> None:
        """Streaming: the standby status. Catching up: the slot is moved to what is durable,
        unless a peek holds it (the next chunk's end, or the next session, moves it)."""
        if self._streaming:
            self._changes.send_status()
        elif (self._peek is None or self._peek.done) and self._flush > self._advanced:
            self._advance(self._flush)

    @property
    def keepalive_lsn(self) -> int:
        return self._changes.keepalive_lsn if self._streaming else self._keepalive

    def close(self) -> None:
        try:
            if self._peek is not None:
                self._peek.close()
            if self._conn is not None:
                self._conn.close()
        finally:
            self._conn = None
            self._changes.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- steps ---------------------------------------------------------------------------------
    def _next_chunk(self, pos: SlotPosition) -> None:
        assert self._conn is not None
        self._upto = chunk_end(pos, self.source.catchup_chunk_mb * MB)
        self._chunks += 1
        self._chunk_started = time.monotonic()
        peek = PeekCopy(self._conn, peek_query(self.source.slot_name,
                                               self.source.publication_name, self._upto))
        self._peek = peek
        self._sql(peek.start, "peeking the slot")

    def _chunk_read(self, peek: PeekCopy) -> None:
        self._keepalive = max(self._keepalive, self._upto)
        self._rows += peek.rows
        decoded = (peek.first_row_at or time.monotonic()) - peek.started_at
        log.info("catchup_chunk", source=self.source.name, chunk=self._chunks,
                 from_lsn=format_lsn(self._advanced), upto_lsn=format_lsn(self._upto),
                 messages=peek.rows, decode_ms=round(decoded * 1000),
                 read_ms=round((time.monotonic() - self._chunk_started) * 1000))
        failpoints.hit("catchup_chunk_read")

    def _finish(self, pos: SlotPosition) -> None:
        log.info("catchup_finished", source=self.source.name, chunks=self._chunks,
                 messages=self._rows, lsn=format_lsn(self._advanced), lag_bytes=pos.lag,
                 duration_ms=round((time.monotonic() - self._began) * 1000))
        self._stream()

    def _stream(self) -> None:
        """Leave SQL for the replication stream, from where the slot was advanced to."""
        self._streaming = True
        self._peek = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._changes.stream_from(max(self._start, self._advanced))
        if self._flush:
            self._changes.set_flush_lsn(self._flush)

    def _position(self) -> SlotPosition:
        assert self._conn is not None
        conn, slot = self._conn, self.source.slot_name
        row = self._sql(lambda: conn.execute(_SLOT_SQL, [slot]).fetchone(), "reading the slot")
        if row is None:
            raise CDCError(f'replication slot "{slot}" does not exist',
                           reason=Reason.SLOT_MISSING)
        if row[0] is None or row[1] is None:
            raise CDCError(f'replication slot "{slot}" has no confirmed position: it was '
                           "invalidated", reason=Reason.SLOT_INVALIDATED)
        return SlotPosition(parse_lsn(row[0]), parse_lsn(row[1]),
                            None if row[2] is None else parse_lsn(row[2]))

    def _advance(self, lsn: int) -> None:
        """Move the slot's confirmed position to `lsn` (durable in Delta: the caller's word)."""
        assert self._conn is not None
        conn, slot = self._conn, self.source.slot_name
        self._sql(lambda: conn.execute(_ADVANCE_SQL, [slot, format_lsn(lsn)]).fetchone(),
                  "advancing the slot")
        self._advanced = max(self._advanced, lsn)

    def _sql(self, step: Callable[[], _T], what: str) -> _T:
        with translate_errors(secrets=self._secrets,
                              context=f'{what} "{self.source.slot_name}" (catch-up)'):
            return step()

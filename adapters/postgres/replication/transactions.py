"""Transaction assembly: pgoutput messages in, committed transactions (as events) out.

The core's contract (`cdcengine.events`) is "only committed transactions, in commit order".
pgoutput keeps it for ordinary transactions -- the server decodes a transaction fully and sends
it at commit, Begin … Commit -- but not for large ones streamed with protocol v2
(``streaming 'on'``): their changes arrive in chunks (Stream Start … Stream Stop) *before* the
transaction has committed, chunks of several transactions interleave with each other and
with ordinary transactions, and each one ends with a Stream Commit or a Stream Abort. The
`TransactionAssembler` resolves that here, so nothing downstream ever sees uncommitted data.

How streamed transactions are held (the point is bounded memory for huge transactions):

* Each in-progress top-level transaction gets an append-only log of the raw message bytes,
  as length-prefixed records (``len(4) payload``). Logs live in memory until all of them
  together would exceed ``memory_limit_bytes``; then the largest are moved to a spill file
  under ``spill_dir`` and keep growing there. Nothing is decoded until replay, and replay
  reads the log back record by record -- a streamed transaction is never a Python list.
* Subtransactions: inside a stream, pgoutput prefixes each change with the xid of the
  (sub)transaction that made it (``change->txn->xid`` in pgoutput.c), so a change made after
  ``SAVEPOINT`` carries the subtransaction's own xid. The assembler remembers, per subxid,
  the log offset of its first record. A Stream Abort naming a subxid truncates the log back
  to that offset and forgets the subxids first seen after it: they are that subtransaction's
  nested children, or subtransactions that already ended (while a subtransaction is open,
  only it and its children can write, so everything after its first record is theirs).
  This is what PostgreSQL's own apply worker does (worker.c: ``subxact_info_add``,
  ``stream_abort_internal`` → ``BufFileTruncateFileSet``). An abort of a subxid that never
  appeared (an empty subtransaction) changes nothing.
* Stream Abort naming the top-level xid discards the whole log; Stream Commit replays it as
  ``Begin(xid, final_lsn=commit_lsn)`` … changes … ``Commit`` and then deletes it.
* Relation messages inside a stream are logged in order like changes and emitted (and
  entered into `relations`) when the transaction is replayed, exactly where they were sent.
  Those in an aborted (sub)transaction are dropped with it; pgoutput re-sends a Relation
  after any stream abort (``cleanup_rel_sync_cache`` forgets the top-level xid), so a later
  change never depends on a dropped one.

Ordinary transactions pass straight through as they arrive (they are already committed).
A consumer that loses the connection mid-transaction must drop the partial transaction it
has received so far, and call `reset` before reading from a new connection.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import BinaryIO, Final

from cdcengine.events import Begin, Commit, Delete, Event, Insert, Message, Relation, Update
from cdcengine_postgres.replication.pgoutput import (
    InStream,
    Origin,
    PgoutputError,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    TypeMsg,
    decode,
)

__all__ = ["DEFAULT_MEMORY_LIMIT_BYTES", "AssemblyError", "TransactionAssembler"]

DEFAULT_MEMORY_LIMIT_BYTES: Final = 64 * 1024 * 1024

_LEN = struct.Struct(">I")
_pack_len = _LEN.pack
_unpack_len = _LEN.unpack_from
_U32 = struct.Struct(">I").unpack_from
_RECORD_OVERHEAD: Final = _LEN.size

# Type bytes of the messages that carry a leading xid inside a stream.
_STREAMED_KINDS: Final = frozenset(b"IUDRTMY")
# Changes a replay hands on undecoded (see `feed`).
_RAW_KINDS: Final = frozenset(b"IUD")
_KIND_TYPE: Final = ord("Y")
_KIND_MESSAGE: Final = ord("M")
_KIND_STREAM_STOP: Final = ord("E")
_KIND_ORIGIN: Final = ord("O")
_SPILL_BUFFER: Final = 1 << 16


class AssemblyError(PgoutputError):
    """The message sequence broke the protocol (e.g. a Stream Commit for a transaction whose
    earlier chunks were never seen). Continuing would lose or invent changes, so it stops."""


class _Stream:
    """The log of one in-progress streamed top-level transaction."""

    __slots__ = ("buf", "file", "path", "size", "subxacts", "xid")

    def __init__(self, xid: int) -> None:
        self.xid = xid
        self.buf: bytearray | None = bytearray()  # None once spilled to `file`
        self.file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0  # bytes of records in the log (memory or file)
        # subxid -> offset of its first record; insertion order is offset order
        self.subxacts: dict[int, int] = {}


class TransactionAssembler:
    """Feeds on pgoutput messages, yields the events of committed transactions only.

    ``feed`` decodes each message itself (it alone knows whether a stream block is open);
    see the module docstring for how streamed transactions are kept. Not thread-safe: one
    assembler per replication connection.
    """

    def __init__(
        self, spill_dir: Path, *, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        raw_changes: bool = False,
    ) -> None:
        if memory_limit_bytes < 0:
            raise ValueError("memory_limit_bytes must be >= 0")
        self._spill_root = Path(spill_dir)
        self._dir: Path | None = None  # private subdirectory, created on the first spill
        self._limit = memory_limit_bytes
        self._raw_changes = raw_changes  # replays hand changes on undecoded (see `feed`)
        self._streams: dict[int, _Stream] = {}
        self._replaying: list[_Stream] = []  # committed, handed out for replay, not yet done
        self._current: _Stream | None = None  # the stream block being received
        self._txn_xid: int | None = None  # xid of the ordinary transaction being received
        self._mem = 0  # bytes held in in-memory logs
        self._relations: dict[int, Relation] = {}

    # -- public ---------------------------------------------------------------------------

    @property
    def relations(self) -> Mapping[int, Relation]:
        """The latest Relation emitted for each relid (read-only view)."""
        return MappingProxyType(self._relations)

    @property
    def in_progress(self) -> tuple[int, ...]:
        """Top-level xids of streamed transactions received but not yet committed/aborted."""
        return tuple(self._streams)

    @property
    def memory_bytes(self) -> int:
        """Bytes of streamed messages currently held in memory (≤ memory_limit_bytes)."""
        return self._mem

    def feed(self, payload: bytes | bytearray | memoryview) -> Iterator[Event | bytes]:
        """Take one pgoutput message; return the events it completes, in order.

        Ordinary messages come back at once (an iterator of zero or one event). A Stream
        Commit returns an iterator that replays the whole transaction from its log: consume
        it fully before feeding the next message (the log is deleted when it is exhausted or
        closed). With `raw_changes`, a replay's changes (Insert, Update, Delete) come back
        undecoded, as `bytes` of the message they would be outside a stream (the in-stream
        xid cut out): the change session packs runs of them column-wise (`packed.py`) and
        decodes the rest with `decode(…, in_stream=False)`, which raises for a malformed one.
        Raises
        `PgoutputError` for undecodable messages and `AssemblyError` for
        impossible sequences.
        """
        buf = payload if type(payload) is bytes else bytes(payload)
        if not buf:
            raise PgoutputError("empty pgoutput message")
        current = self._current
        if current is not None:
            return self._feed_in_stream(current, buf)
        msg = decode(buf, in_stream=False)
        cls = type(msg)
        if cls is Insert or cls is Update or cls is Delete:  # the common case first
            return iter((msg,))  # type: ignore[arg-type]
        if isinstance(msg, Begin):
            self._txn_xid = msg.xid
            return iter((msg,))
        if isinstance(msg, Commit):
            xid = self._txn_xid
            if xid is None:
                raise AssemblyError("Commit without Begin")
            self._txn_xid = None
            return iter(
                (
                    Commit(
                        xid=xid,
                        commit_lsn=msg.commit_lsn,
                        end_lsn=msg.end_lsn,
                        commit_ts_us=msg.commit_ts_us,
                    ),
                )
            )
        if isinstance(msg, Relation):
            self._relations[msg.relid] = msg
            return iter((msg,))
        if isinstance(msg, StreamStart):
            self._stream_start(msg)
            return iter(())
        if isinstance(msg, StreamCommit):
            return self._stream_commit(msg)
        if isinstance(msg, StreamAbort):
            self._stream_abort(msg)
            return iter(())
        if isinstance(msg, StreamStop):
            raise AssemblyError("Stream Stop without Stream Start")
        if isinstance(msg, (Origin, TypeMsg)):
            return iter(())  # skipped on purpose: see their docstrings in pgoutput.py
        if isinstance(msg, InStream):  # pragma: no cover - decode(in_stream=False) never wraps
            raise AssemblyError("unexpected in-stream message outside a stream")
        return iter((msg,))  # Insert / Update / Delete / Truncate / Message

    def reset(self) -> None:
        """Forget everything in flight (call on reconnect): the server re-sends streamed
        transactions from their first chunk in a new session, so partial logs are useless."""
        for stream in list(self._streams.values()):
            self._dispose(stream)
        for stream in self._replaying:
            self._dispose(stream)
        self._streams.clear()
        self._replaying.clear()
        self._current = None
        self._txn_xid = None

    def close(self) -> None:
        """Discard in-flight state and remove this assembler's spill directory."""
        self.reset()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> TransactionAssembler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- stream handling ------------------------------------------------------------------

    def _feed_in_stream(self, stream: _Stream, buf: bytes) -> Iterator[Event]:
        kind = buf[0]
        if kind in _STREAMED_KINDS:
            if len(buf) < 5:
                raise PgoutputError(f"truncated in-stream {bytes([kind])!r} message")
            if kind == _KIND_TYPE:
                return iter(())  # Type messages are skipped; no need to log them
            if kind == _KIND_MESSAGE and (len(buf) < 6 or not buf[5] & 1):
                # A non-transactional logical message is not part of the transaction: it
                # cannot be rolled back, so it goes out now (pgoutput never streams one, but
                # nothing would be gained by holding it). Decoding also rejects a short one.
                decoded = decode(buf, in_stream=True)
                assert isinstance(decoded, InStream)
                inner = decoded.message
                assert isinstance(inner, Message)
                return iter((inner,))
            self._append(stream, _U32(buf, 1)[0], buf)
            return iter(())
        if kind == _KIND_STREAM_STOP:
            self._current = None
            return iter(())
        if kind == _KIND_ORIGIN:
            decode(buf, in_stream=True)  # validate, then skip like outside streams
            return iter(())
        decoded = decode(buf, in_stream=True)  # raises for unknown types
        raise AssemblyError(
            f"{type(decoded).__name__} inside the stream block of transaction {stream.xid}"
        )

    def _stream_start(self, msg: StreamStart) -> None:
        stream = self._streams.get(msg.xid)
        if msg.first:
            if stream is not None:  # a re-send from the start: the old log is stale
                self._dispose(stream)
            stream = self._streams[msg.xid] = _Stream(msg.xid)
        elif stream is None:
            raise AssemblyError(
                f"Stream Start continues transaction {msg.xid}, whose first chunk was not "
                "received (missing reset() after a reconnect?)"
            )
        self._current = stream

    def _stream_abort(self, msg: StreamAbort) -> None:
        stream = self._streams.get(msg.xid)
        if stream is None:
            return  # nothing of it was logged (e.g. discarded by reset()); nothing to undo
        if msg.subxid == msg.xid:
            del self._streams[msg.xid]
            self._dispose(stream)
            return
        offset = stream.subxacts.get(msg.subxid)
        if offset is None:
            return  # an empty subtransaction: it logged no records
        self._truncate(stream, offset)
        stream.subxacts = {x: off for x, off in stream.subxacts.items() if off < offset}

    def _stream_commit(self, msg: StreamCommit) -> Iterator[Event | bytes]:
        stream = self._streams.pop(msg.xid, None)
        if stream is None:
            raise AssemblyError(
                f"Stream Commit of transaction {msg.xid}, whose chunks were not received"
            )
        self._replaying.append(stream)
        return self._replay(stream, msg)

    def _replay(self, stream: _Stream, msg: StreamCommit) -> Iterator[Event | bytes]:
        raw = self._raw_changes
        try:
            yield Begin(xid=msg.xid, final_lsn=msg.commit_lsn, commit_ts_us=msg.commit_ts_us)
            for record in self._records(stream):
                if raw and record[0] in _RAW_KINDS and len(record) >= 5:
                    # a change: handed on as the message it would be outside a stream (the
                    # xid cut out), for the caller to pack with its neighbours
                    yield record[:1] + record[5:]
                    continue
                decoded = decode(record, in_stream=True)
                if not isinstance(decoded, InStream):  # pragma: no cover - only those are logged
                    raise AssemblyError(f"unexpected {type(decoded).__name__} in a stream log")
                inner = decoded.message
                if isinstance(inner, TypeMsg):  # pragma: no cover - not logged
                    continue
                if isinstance(inner, Relation):
                    self._relations[inner.relid] = inner
                yield inner
            yield Commit(
                xid=msg.xid,
                commit_lsn=msg.commit_lsn,
                end_lsn=msg.end_lsn,
                commit_ts_us=msg.commit_ts_us,
            )
        finally:
            self._dispose(stream)
            if stream in self._replaying:
                self._replaying.remove(stream)

    # -- the log ----------------------------------------------------------------------------

    def _append(self, stream: _Stream, xid: int, buf: bytes) -> None:
        if xid != stream.xid and xid not in stream.subxacts:
            stream.subxacts[xid] = stream.size
        n = _RECORD_OVERHEAD + len(buf)
        if stream.buf is not None and self._mem + n > self._limit:
            self._make_room(n, stream)
        if stream.buf is not None:
            stream.buf += _pack_len(len(buf))
            stream.buf += buf
            self._mem += n
        else:
            assert stream.file is not None
            stream.file.write(_pack_len(len(buf)))
            stream.file.write(buf)
        stream.size += n

    def _make_room(self, n: int, current: _Stream) -> None:
        """Spill the largest in-memory logs until ``n`` more bytes fit under the limit."""
        in_memory = sorted(
            (s for s in self._streams.values() if s.buf is not None),
            key=lambda s: s.size,
            reverse=True,
        )
        for stream in in_memory:
            if self._mem + n <= self._limit:
                return
            self._spill(stream)  # `current` is among them: at worst it is spilled too

    def _spill(self, stream: _Stream) -> None:
        assert stream.buf is not None
        if self._dir is None:
            self._spill_root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="pgoutput-", dir=self._spill_root))
        fd, name = tempfile.mkstemp(prefix=f"xid{stream.xid}-", suffix=".log", dir=self._dir)
        stream.path = Path(name)
        stream.file = os.fdopen(fd, "w+b", buffering=_SPILL_BUFFER)
        stream.file.write(stream.buf)
        self._mem -= len(stream.buf)
        stream.buf = None

    def _truncate(self, stream: _Stream, offset: int) -> None:
        if stream.buf is not None:
            self._mem -= len(stream.buf) - offset
            del stream.buf[offset:]
        else:
            assert stream.file is not None
            stream.file.truncate(offset)  # flushes the write buffer first
            stream.file.seek(offset)
        stream.size = offset

    def _records(self, stream: _Stream) -> Iterator[bytes]:
        """The log's payloads in order, read back one at a time."""
        if stream.buf is not None:
            buf = stream.buf
            pos, end = 0, stream.size
            while pos < end:
                (length,) = _unpack_len(buf, pos)
                pos += _RECORD_OVERHEAD
                yield bytes(buf[pos : pos + length])
                pos += length
            return
        f = stream.file
        assert f is not None
        f.flush()
        f.seek(0)
        remaining = stream.size
        while remaining > 0:
            head = f.read(_RECORD_OVERHEAD)
            if len(head) != _RECORD_OVERHEAD:
                raise AssemblyError(f"spill file {stream.path} is truncated")
            (length,) = _unpack_len(head)
            record = f.read(length)
            if len(record) != length:
                raise AssemblyError(f"spill file {stream.path} is truncated")
            remaining -= _RECORD_OVERHEAD + length
            yield record

    def _dispose(self, stream: _Stream) -> None:
        """Release a log: its memory, or its spill file. Idempotent."""
        if stream is self._current:
            self._current = None
        if stream.buf is not None:
            self._mem -= len(stream.buf)
            stream.buf = None
        if stream.file is not None:
            stream.file.close()
            stream.file = None
        if stream.path is not None:
            stream.path.unlink(missing_ok=True)
            stream.path = None
        stream.size = 0
        stream.subxacts = {}

"""Sans-I/O decoder for PostgreSQL's pgoutput logical replication messages (protocol v1 and v2).

One call, `decode`, turns one pgoutput message (the payload of an XLogData frame, or one `data`
row of ``pg_logical_slot_peek_binary_changes``) into a typed value. No sockets, no psycopg:
the replication reader and the tests feed the same bytes in.

Why it looks the way it does:

* Column values stay ``bytes`` (PostgreSQL's text form): converting to Python types here would
  cost more than the decoding itself and the sink converts whole Arrow columns at once anyway.
  The hot path (Insert/Update/Delete tuples) uses precompiled ``struct.Struct.unpack_from``
  bound methods and slices of one ``bytes`` object; ``benchmarks/decode_bench.py`` measures it.
* Changes, relations, Begin/Commit and messages decode straight into the engine-neutral
  `cdcengine.events` classes, so non-streamed transactions pass through without a copy.
  Stream control messages and the two messages the engine skips (Origin, Type) get small
  dataclasses of their own; messages inside a stream block are wrapped in `InStream`.
* Every message type of protocol v1/v2 (PostgreSQL 13-17) is handled; anything else -- the
  two-phase messages of v3, which the engine never requests, or garbage -- raises
  `PgoutputError` naming the type byte, never a silent skip.

Integers are big-endian. ``Int64`` LSNs and ``uint32`` xids/OIDs are read unsigned; typmods and
lengths signed, as the server writes them. Strings are NUL-terminated (``cstring`` below).
Timestamps on the wire are microseconds since 2000-01-01 UTC and are converted to microseconds
since the Unix epoch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from cdcengine.events import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Relation,
    RelationColumn,
    Row,
    Truncate,
    Update,
    Value,
)

__all__ = [
    "PG_EPOCH_OFFSET_US",
    "BinaryValue",
    "DecodedMessage",
    "InStream",
    "Origin",
    "PgoutputError",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "StreamableMessage",
    "TypeMsg",
    "decode",
]

#: 2000-01-01 00:00:00 UTC in microseconds since the Unix epoch (PostgreSQL's timestamp epoch).
PG_EPOCH_OFFSET_US: Final = 946_684_800 * 1_000_000

_REPLICA_IDENTITY: Final = {
    ord("d"): "default",
    ord("n"): "nothing",
    ord("f"): "full",
    ord("i"): "index",
}

# Precompiled layouts (see each message's comment in `decode`). Bound ``unpack_from`` methods
# save an attribute lookup per call on the hot path.
_U32 = struct.Struct(">I").unpack_from
_I32 = struct.Struct(">i").unpack_from
_I16 = struct.Struct(">h").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_BEGIN = struct.Struct(">QqI").unpack_from  # final_lsn, commit_ts, xid
_COMMIT = struct.Struct(">BQQq").unpack_from  # flags, commit_lsn, end_lsn, commit_ts
_STREAM_START = struct.Struct(">IB").unpack_from  # xid, first_segment
_STREAM_COMMIT = struct.Struct(">IBQQq").unpack_from  # xid, flags, commit_lsn, end_lsn, ts
_STREAM_ABORT = struct.Struct(">II").unpack_from  # xid, subxid
_STREAM_ABORT_V4 = struct.Struct(">IIQq").unpack_from  # xid, subxid, abort_lsn, abort_ts
_REL_COL = struct.Struct(">Ii").unpack_from  # type oid, typmod
_TRUNC_HEAD = struct.Struct(">iB").unpack_from  # nrelids, flags
_MSG_HEAD = struct.Struct(">BQ").unpack_from  # flags, lsn

# Tuple column kinds, as ints (indexing bytes yields ints).
_K_TEXT: Final = 0x74  # 't'
_K_NULL: Final = 0x6E  # 'n'
_K_UNCHANGED: Final = 0x75  # 'u'
_K_BINARY: Final = 0x62  # 'b'
# Tuple markers inside Update/Delete.
_T_NEW: Final = 0x4E  # 'N'
_T_KEY: Final = 0x4B  # 'K'
_T_OLD: Final = 0x4F  # 'O'

_TWO_PHASE_TYPES: Final = frozenset(b"bPKrp")


class PgoutputError(ValueError):
    """A pgoutput message could not be decoded (unknown type, truncated, inconsistent)."""


@final
class BinaryValue(bytes):
    """A column value sent in binary format ('b', only with the ``binary 'true'`` option).

    A ``bytes`` subclass so it flows through `cdcengine.events.Row` unchanged while a consumer
    that only understands the text form can tell (``isinstance(v, BinaryValue)``) and refuse.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"BinaryValue({bytes(self)!r})"


@dataclass(frozen=True, slots=True)
class StreamStart:
    """'S': the start of a chunk of an in-progress (not yet committed) transaction ``xid``."""

    xid: int
    first: bool  # first chunk of this transaction (a reconnect restarts with first=True)


@dataclass(frozen=True, slots=True)
class StreamStop:
    """'E': the end of the current chunk; messages after it are no longer in a stream."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """'c': the streamed transaction ``xid`` committed; its chunks are final."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int  # microseconds since the Unix epoch


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """'A': discard subtransaction ``subxid`` of ``xid`` (the whole transaction when equal).

    ``abort_lsn``/``abort_ts_us`` are only sent with ``streaming 'parallel'`` (protocol v4,
    PostgreSQL 16+), which the engine does not request; tolerated when present.
    """

    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_ts_us: int | None = None


@dataclass(frozen=True, slots=True)
class Origin:
    """'O': replication origin of the transaction (sent for changes replayed from elsewhere).

    Decoded so the stream stays in sync, then skipped: the engine does not filter by origin.
    """

    origin_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class TypeMsg:
    """'Y': the name of a user-defined type used by a following Relation. Skipped: the engine
    reads type details from the catalog, and values stay in text form anyway."""

    type_oid: int
    schema: str
    name: str


StreamableMessage = Relation | Insert | Update | Delete | Truncate | Message | TypeMsg


@dataclass(frozen=True, slots=True)
class InStream:
    """A message received between Stream Start and Stream Stop, with its leading xid.

    ``xid`` is the xid of the (sub)transaction that made the change -- pgoutput writes
    ``change->txn->xid``, which for a change made inside a SAVEPOINT is the subtransaction's
    own xid, not the top-level one named by Stream Start. The assembler relies on this to
    discard aborted subtransactions.
    """

    xid: int
    message: StreamableMessage


DecodedMessage = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | InStream
)

_STREAM_STOP: Final = StreamStop()


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated string at ``pos``; return it and the position after the NUL."""
    end = buf.index(0, pos)
    return buf[pos:end].decode("utf-8"), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[Row, int]:
    """TupleData: ncols(int16), then per column a kind byte and, for 't'/'b', len(int32) + bytes.

    'n' → None, 'u' → UNCHANGED (an unchanged TOASTed value the server did not send),
    't' → bytes (text form), 'b' → `BinaryValue`. Returns the row and the position after it.
    This loop is the decoder's hot path: keep it free of calls that are not needed.
    """
    (ncols,) = _I16(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    i32 = _I32
    for _ in range(ncols):
        kind = buf[pos]
        if kind == _K_TEXT:
            (length,) = i32(buf, pos + 1)
            pos += 5
            end = pos + length
            append(buf[pos:end])
            pos = end
        elif kind == _K_NULL:
            append(None)
            pos += 1
        elif kind == _K_UNCHANGED:
            append(UNCHANGED)
            pos += 1
        elif kind == _K_BINARY:
            (length,) = i32(buf, pos + 1)
            pos += 5
            end = pos + length
            append(BinaryValue(buf[pos:end]))
            pos = end
        else:
            raise PgoutputError(f"bad tuple column kind {bytes([kind])!r} at offset {pos}")
    if pos > len(buf):
        raise PgoutputError("tuple data runs past the end of the message")
    return tuple(values), pos


def _relation(buf: bytes, pos: int) -> Relation:
    """R: relid(4) schema(cstring, '' = pg_catalog) name(cstring) replident(1) ncols(int16),
    then per column: flags(1, bit 1 = part of the key) name(cstring) type_oid(4) typmod(4)."""
    (relid,) = _U32(buf, pos)
    schema, pos = _cstring(buf, pos + 4)
    name, pos = _cstring(buf, pos)
    ident_byte = buf[pos]
    ident = _REPLICA_IDENTITY.get(ident_byte)
    if ident is None:
        raise PgoutputError(f"unknown replica identity {bytes([ident_byte])!r} in Relation")
    (ncols,) = _I16(buf, pos + 1)
    pos += 3
    cols: list[RelationColumn] = []
    for _ in range(ncols):
        flags = buf[pos]
        col_name, pos = _cstring(buf, pos + 1)
        type_oid, typmod = _REL_COL(buf, pos)
        pos += 8
        cols.append(
            RelationColumn(name=col_name, type_oid=type_oid, typmod=typmod, key=bool(flags & 1))
        )
    return Relation(
        relid=relid,
        schema=schema or "pg_catalog",
        name=name,
        replica_identity=ident,
        columns=tuple(cols),
    )


# The change events are frozen slotted dataclasses; their generated ``__init__`` (keyword-only,
# frozen ``object.__setattr__`` per field) costs about as much as decoding three columns. On the
# hot path they are built by setting the slots directly -- same objects, same immutability
# afterwards. `_FAST_FIELDS` pins the field lists; a unit test checks they still match
# `dataclasses.fields` so a field added to events.py cannot be left unset silently.
_new_object = object.__new__
_FAST_FIELDS: Final = {
    Insert: ("relid", "new"),
    Update: ("relid", "new", "old", "old_is_key"),
    Delete: ("relid", "old", "old_is_key"),
}
_set_insert_relid = Insert.__dict__["relid"].__set__
_set_insert_new = Insert.__dict__["new"].__set__
_set_update_relid = Update.__dict__["relid"].__set__
_set_update_new = Update.__dict__["new"].__set__
_set_update_old = Update.__dict__["old"].__set__
_set_update_old_is_key = Update.__dict__["old_is_key"].__set__
_set_delete_relid = Delete.__dict__["relid"].__set__
_set_delete_old = Delete.__dict__["old"].__set__
_set_delete_old_is_key = Delete.__dict__["old_is_key"].__set__


def _insert(buf: bytes, pos: int) -> Insert:
    """I: relid(4) 'N' tuple."""
    if buf[pos + 4] != _T_NEW:
        raise PgoutputError(f"Insert: expected 'N', got {buf[pos + 4 : pos + 5]!r}")
    new, _ = _tuple(buf, pos + 5)
    ins: Insert = _new_object(Insert)
    _set_insert_relid(ins, _U32(buf, pos)[0])
    _set_insert_new(ins, new)
    return ins


def _update(buf: bytes, pos: int) -> Update:
    """U: relid(4) ['K' tuple | 'O' tuple] 'N' tuple.

    'K' = old values of the replica identity columns (sent when the key changed or a key
    column is TOASTed); 'O' = the whole old row (REPLICA IDENTITY FULL); none otherwise.
    """
    (relid,) = _U32(buf, pos)
    marker = buf[pos + 4]
    pos += 5
    old: Row | None = None
    old_is_key = False
    if marker in (_T_KEY, _T_OLD):
        old, pos = _tuple(buf, pos)
        old_is_key = marker == _T_KEY
        marker = buf[pos]
        pos += 1
    if marker != _T_NEW:
        raise PgoutputError(f"Update: expected 'N', got {bytes([marker])!r}")
    new, _ = _tuple(buf, pos)
    upd: Update = _new_object(Update)
    _set_update_relid(upd, relid)
    _set_update_new(upd, new)
    _set_update_old(upd, old)
    _set_update_old_is_key(upd, old_is_key)
    return upd


def _delete(buf: bytes, pos: int) -> Delete:
    """D: relid(4) ('K' | 'O') tuple -- the key columns only, or the whole row for FULL."""
    (relid,) = _U32(buf, pos)
    marker = buf[pos + 4]
    if marker not in (_T_KEY, _T_OLD):
        raise PgoutputError(f"Delete: expected 'K' or 'O', got {bytes([marker])!r}")
    old, _ = _tuple(buf, pos + 5)
    dele: Delete = _new_object(Delete)
    _set_delete_relid(dele, relid)
    _set_delete_old(dele, old)
    _set_delete_old_is_key(dele, marker == _T_KEY)
    return dele


def _truncate(buf: bytes, pos: int) -> Truncate:
    """T: nrelids(int32) flags(1: bit 1 CASCADE, bit 2 RESTART IDENTITY) relid(4) * nrelids."""
    nrel, flags = _TRUNC_HEAD(buf, pos)
    pos += 5
    if nrel < 0 or pos + 4 * nrel > len(buf):
        raise PgoutputError(f"Truncate: bad relation count {nrel}")
    relids = struct.unpack_from(f">{nrel}I", buf, pos)
    return Truncate(relids=relids, cascade=bool(flags & 1), restart_identity=bool(flags & 2))


def _message(buf: bytes, pos: int) -> Message:
    """M: flags(1, bit 1 = transactional) lsn(8) prefix(cstring) length(int32) content."""
    flags, lsn = _MSG_HEAD(buf, pos)
    prefix, pos = _cstring(buf, pos + 9)
    (length,) = _I32(buf, pos)
    pos += 4
    if length < 0 or pos + length > len(buf):
        raise PgoutputError("Message: content runs past the end of the message")
    return Message(
        transactional=bool(flags & 1), lsn=lsn, prefix=prefix, content=buf[pos : pos + length]
    )


def _type(buf: bytes, pos: int) -> TypeMsg:
    """Y: type_oid(4) schema(cstring) name(cstring)."""
    (oid,) = _U32(buf, pos)
    schema, pos = _cstring(buf, pos + 4)
    name, _ = _cstring(buf, pos)
    return TypeMsg(type_oid=oid, schema=schema or "pg_catalog", name=name)


# Messages that carry a leading xid inside a stream, by type byte.
_STREAMABLE: Final[dict[int, Callable[[bytes, int], StreamableMessage]]] = {
    0x49: _insert,  # 'I'
    0x55: _update,  # 'U'
    0x44: _delete,  # 'D'
    0x52: _relation,  # 'R'
    0x54: _truncate,  # 'T'
    0x4D: _message,  # 'M'
    0x59: _type,  # 'Y'
}


def decode(payload: bytes | bytearray | memoryview, *, in_stream: bool) -> DecodedMessage:
    """Decode one pgoutput message.

    ``in_stream`` must be True between Stream Start and Stream Stop: there the
    Relation/Type/Insert/Update/Delete/Truncate/Message messages carry an extra leading
    ``xid(4)`` and come back wrapped in `InStream`. Only the caller knows this (the message
    itself does not say), so the caller tracks it -- `transactions.TransactionAssembler` does.

    Layouts after the type byte (the in-stream xid, when present, comes first):

    * B Begin:         final_lsn(8) commit_ts(8) xid(4)
    * C Commit:        flags(1) commit_lsn(8) end_lsn(8) commit_ts(8) -- no xid on the wire, so
                       ``Commit.xid`` is 0 here; `TransactionAssembler` fills in the Begin's
    * O Origin:        origin_lsn(8) name(cstring)
    * R Relation:      see `_relation`
    * Y Type:          type_oid(4) schema(cstring) name(cstring)
    * I Insert:        relid(4) 'N' tuple
    * U Update:        relid(4) ['K' tuple | 'O' tuple] 'N' tuple
    * D Delete:        relid(4) ('K' | 'O') tuple
    * T Truncate:      nrelids(4) flags(1) relids(4 * nrelids)
    * M Message:       flags(1) lsn(8) prefix(cstring) length(4) content
    * S Stream Start:  xid(4) first_segment(1)
    * E Stream Stop:   (nothing)
    * c Stream Commit: xid(4) flags(1) commit_lsn(8) end_lsn(8) commit_ts(8)
    * A Stream Abort:  xid(4) subxid(4) [abort_lsn(8) abort_ts(8), v4 parallel only]

    Raises `PgoutputError` for an unknown type byte or a malformed message.
    """
    buf = payload if type(payload) is bytes else bytes(payload)
    if not buf:
        raise PgoutputError("empty pgoutput message")
    kind = buf[0]
    try:
        if kind == 0x49 and not in_stream:  # the hot path: a plain Insert
            return _insert(buf, 1)
        body = _STREAMABLE.get(kind)
        if body is not None:
            if in_stream:
                return InStream(_U32(buf, 1)[0], body(buf, 5))
            return body(buf, 1)
        if kind == 0x42:  # 'B'
            final_lsn, ts, bxid = _BEGIN(buf, 1)
            return Begin(xid=bxid, final_lsn=final_lsn, commit_ts_us=ts + PG_EPOCH_OFFSET_US)
        if kind == 0x43:  # 'C'
            _flags, commit_lsn, end_lsn, ts = _COMMIT(buf, 1)
            return Commit(
                xid=0,  # pgoutput's Commit does not repeat the xid; the assembler fills it in
                commit_lsn=commit_lsn,
                end_lsn=end_lsn,
                commit_ts_us=ts + PG_EPOCH_OFFSET_US,
            )
        if kind == 0x53:  # 'S'
            sxid, first = _STREAM_START(buf, 1)
            return StreamStart(sxid, first == 1)
        if kind == 0x45:  # 'E'
            return _STREAM_STOP
        if kind == 0x63:  # 'c'
            cxid, _flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT(buf, 1)
            return StreamCommit(cxid, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US)
        if kind == 0x41:  # 'A'
            if len(buf) >= 25:
                axid, subxid, abort_lsn, ts = _STREAM_ABORT_V4(buf, 1)
                return StreamAbort(axid, subxid, abort_lsn, ts + PG_EPOCH_OFFSET_US)
            axid, subxid = _STREAM_ABORT(buf, 1)
            return StreamAbort(axid, subxid)
        if kind == 0x4F:  # 'O'
            (origin_lsn,) = _U64(buf, 1)
            name, _ = _cstring(buf, 9)
            return Origin(origin_lsn, name)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, PgoutputError):
            raise
        raise PgoutputError(
            f"malformed pgoutput {bytes([kind])!r} message ({len(buf)} bytes): {exc}"
        ) from exc
    if kind in _TWO_PHASE_TYPES:
        raise PgoutputError(
            f"pgoutput message type {bytes([kind])!r} (0x{kind:02x}) is a two-phase commit "
            "message; the engine does not request two_phase"
        )
    raise PgoutputError(f"unknown pgoutput message type {bytes([kind])!r} (0x{kind:02x})")

"""pgoutput decoder and transaction assembler on hand-built messages (no server).

The helpers below build each message with `struct` from the layouts in PostgreSQL's
"Logical Replication Message Formats" (proto.c), independently of the decoder's own tables.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from cdcengine.events import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Event,
    Insert,
    Message,
    Relation,
    RelationColumn,
    Truncate,
    Update,
    Value,
)
from cdcengine_postgres.replication import pgoutput
from cdcengine_postgres.replication.pgoutput import (
    PG_EPOCH_OFFSET_US,
    BinaryValue,
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
from cdcengine_postgres.replication.transactions import AssemblyError, TransactionAssembler

# -- message builders ------------------------------------------------------------------------

TS_PG = 789_000_000_123_456  # µs since 2000-01-01 (2025-01-01 and a bit)
TS_UNIX = TS_PG + 946_684_800 * 10**6


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def tup(*values: Value) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        elif isinstance(v, BinaryValue):
            out += b"b" + struct.pack(">i", len(v)) + bytes(v)
        else:
            assert isinstance(v, bytes)
            out += b"t" + struct.pack(">i", len(v)) + v
    return out


def xid_prefix(kind: bytes, xid: int | None) -> bytes:
    return kind + (b"" if xid is None else struct.pack(">I", xid))


def begin(xid: int, final_lsn: int = 0x100, ts: int = TS_PG) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts, xid)


def commit(commit_lsn: int = 0x100, end_lsn: int = 0x130, ts: int = TS_PG) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, ts)


def relation(relid: int, name: str = "t", *, schema: str = "public", ident: bytes = b"d",
             cols: Sequence[tuple[str, int, int, bool]] = (("id", 23, -1, True),
                                                           ("v", 25, -1, False)),
             xid: int | None = None) -> bytes:
    body = struct.pack(">I", relid) + cstr(schema) + cstr(name) + ident
    body += struct.pack(">h", len(cols))
    for cname, oid, typmod, key in cols:
        body += bytes([1 if key else 0]) + cstr(cname) + struct.pack(">Ii", oid, typmod)
    return xid_prefix(b"R", xid) + body


def insert(relid: int, *values: Value, xid: int | None = None) -> bytes:
    return xid_prefix(b"I", xid) + struct.pack(">I", relid) + b"N" + tup(*values)


def update(relid: int, new: Sequence[Value], old: Sequence[Value] | None = None,
           marker: bytes = b"K", xid: int | None = None) -> bytes:
    body = struct.pack(">I", relid)
    if old is not None:
        body += marker + tup(*old)
    return xid_prefix(b"U", xid) + body + b"N" + tup(*new)


def delete(relid: int, old: Sequence[Value], marker: bytes = b"K",
           xid: int | None = None) -> bytes:
    return xid_prefix(b"D", xid) + struct.pack(">I", relid) + marker + tup(*old)


def truncate(relids: Sequence[int], flags: int = 0, xid: int | None = None) -> bytes:
    return (xid_prefix(b"T", xid) + struct.pack(">iB", len(relids), flags)
            + b"".join(struct.pack(">I", r) for r in relids))


def message(prefix: str, content: bytes, *, transactional: bool = True, lsn: int = 0x200,
            xid: int | None = None) -> bytes:
    return (xid_prefix(b"M", xid) + struct.pack(">BQ", 1 if transactional else 0, lsn)
            + cstr(prefix) + struct.pack(">i", len(content)) + content)


def type_msg(oid: int, schema: str, name: str, xid: int | None = None) -> bytes:
    return xid_prefix(b"Y", xid) + struct.pack(">I", oid) + cstr(schema) + cstr(name)


def origin(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + cstr(name)


def stream_start(xid: int, first: bool = True) -> bytes:
    return b"S" + struct.pack(">IB", xid, 1 if first else 0)


STREAM_STOP = b"E"


def stream_commit(xid: int, commit_lsn: int = 0x900, end_lsn: int = 0x930,
                  ts: int = TS_PG) -> bytes:
    return b"c" + struct.pack(">IBQQq", xid, 0, commit_lsn, end_lsn, ts)


def stream_abort(xid: int, subxid: int | None = None) -> bytes:
    return b"A" + struct.pack(">II", xid, xid if subxid is None else subxid)


# -- decoder ------------------------------------------------------------------------------------


def test_begin_and_commit_convert_timestamps_to_unix_epoch() -> None:
    b = decode(begin(4242, final_lsn=0x1_0000_0010), in_stream=False)
    assert b == Begin(xid=4242, final_lsn=0x1_0000_0010, commit_ts_us=TS_UNIX)
    c = decode(commit(0x10, 0x40), in_stream=False)
    assert isinstance(c, Commit)
    assert (c.commit_lsn, c.end_lsn, c.commit_ts_us) == (0x10, 0x40, TS_UNIX)
    assert decode(begin(1, ts=0), in_stream=False) == Begin(
        xid=1, final_lsn=0x100, commit_ts_us=PG_EPOCH_OFFSET_US)
    assert PG_EPOCH_OFFSET_US == 946684800 * 10**6


def test_xid_and_lsn_use_the_full_unsigned_range() -> None:
    b = decode(begin(0xFFFF_FFFE, final_lsn=0xFFFF_FFFF_FFFF_FFF0), in_stream=False)
    assert isinstance(b, Begin)
    assert b.xid == 0xFFFF_FFFE and b.final_lsn == 0xFFFF_FFFF_FFFF_FFF0


@pytest.mark.parametrize(("byte", "name"), [(b"d", "default"), (b"n", "nothing"),
                                            (b"f", "full"), (b"i", "index")])
def test_relation_replica_identity(byte: bytes, name: str) -> None:
    r = decode(relation(16384, "orders", ident=byte), in_stream=False)
    assert r == Relation(relid=16384, schema="public", name="orders", replica_identity=name,
                         columns=(RelationColumn(name="id", type_oid=23, typmod=-1, key=True),
                                  RelationColumn(name="v", type_oid=25, typmod=-1, key=False)))


def test_relation_details() -> None:
    cols = [("a", 1043, 14, True), ("b é", 1700, 0x000C0006, True), ("c", 16385, -1, False)]
    r = decode(relation(7, "Wéird", schema="", cols=cols), in_stream=False)
    assert isinstance(r, Relation)
    assert r.schema == "pg_catalog"  # pgoutput sends '' for pg_catalog
    assert r.name == "Wéird"
    assert [(c.name, c.type_oid, c.typmod, c.key) for c in r.columns] == cols
    assert r.key_columns == ("a", "b é")
    with pytest.raises(PgoutputError, match="replica identity"):
        decode(relation(7, ident=b"x"), in_stream=False)


def test_insert_values_text_null_unchanged_binary() -> None:
    payload = insert(16384, b"1", None, UNCHANGED, b"", BinaryValue(b"\x00\x01"), "é".encode())
    ins = decode(payload, in_stream=False)
    assert ins == Insert(relid=16384, new=(b"1", None, UNCHANGED, b"", b"\x00\x01", b"\xc3\xa9"))
    assert isinstance(ins, Insert)
    assert type(ins.new[0]) is bytes and ins.new[2] is UNCHANGED
    assert isinstance(ins.new[4], BinaryValue) and not isinstance(ins.new[0], BinaryValue)
    assert repr(ins.new[4]) == "BinaryValue(b'\\x00\\x01')"


def test_insert_accepts_memoryview_and_bytearray() -> None:
    payload = insert(5, b"x" * 300, None)
    expected = Insert(relid=5, new=(b"x" * 300, None))
    assert decode(memoryview(payload), in_stream=False) == expected
    assert decode(bytearray(payload), in_stream=False) == expected
    assert type(decode(memoryview(payload), in_stream=False).new[0]) is bytes  # type: ignore[union-attr]


def test_update_without_old_with_key_and_with_full_old() -> None:
    assert decode(update(9, [b"1", b"new"]), in_stream=False) == Update(
        relid=9, new=(b"1", b"new"))
    assert decode(update(9, [b"2", b"v"], [b"1", None], b"K"), in_stream=False) == Update(
        relid=9, new=(b"2", b"v"), old=(b"1", None), old_is_key=True)
    assert decode(update(9, [b"1", UNCHANGED], [b"1", b"old"], b"O"), in_stream=False) == Update(
        relid=9, new=(b"1", UNCHANGED), old=(b"1", b"old"), old_is_key=False)
    with pytest.raises(PgoutputError, match="expected 'N'"):
        decode(b"U" + struct.pack(">I", 9) + b"X" + tup(b"1"), in_stream=False)


def test_delete_key_and_full() -> None:
    assert decode(delete(9, [b"1", None]), in_stream=False) == Delete(
        relid=9, old=(b"1", None), old_is_key=True)
    assert decode(delete(9, [b"1", b"v"], b"O"), in_stream=False) == Delete(
        relid=9, old=(b"1", b"v"), old_is_key=False)
    with pytest.raises(PgoutputError, match="'K' or 'O'"):
        decode(delete(9, [b"1"], b"N"), in_stream=False)


@pytest.mark.parametrize(("flags", "cascade", "restart"),
                         [(0, False, False), (1, True, False), (2, False, True), (3, True, True)])
def test_truncate_flags(flags: int, cascade: bool, restart: bool) -> None:
    assert decode(truncate([16384, 0xFFFF_FFF0], flags), in_stream=False) == Truncate(
        relids=(16384, 0xFFFF_FFF0), cascade=cascade, restart_identity=restart)


def test_message_transactional_and_not() -> None:
    assert decode(message("cdc", b"\x00payload", lsn=0x77), in_stream=False) == Message(
        transactional=True, lsn=0x77, prefix="cdc", content=b"\x00payload")
    m = decode(message("p", b"", transactional=False), in_stream=False)
    assert isinstance(m, Message) and not m.transactional and m.content == b""


def test_origin_and_type_are_decoded_for_skipping() -> None:
    assert decode(origin(0x55, "node_a"), in_stream=False) == Origin(0x55, "node_a")
    assert decode(type_msg(16390, "public", "mood"), in_stream=False) == TypeMsg(
        16390, "public", "mood")


def test_stream_control_messages() -> None:
    assert decode(stream_start(700), in_stream=False) == StreamStart(700, True)
    assert decode(stream_start(700, first=False), in_stream=False) == StreamStart(700, False)
    assert decode(STREAM_STOP, in_stream=True) == StreamStop()
    assert decode(stream_commit(700, 0x10, 0x20), in_stream=False) == StreamCommit(
        700, 0x10, 0x20, TS_UNIX)
    assert decode(stream_abort(700), in_stream=False) == StreamAbort(700, 700)
    assert decode(stream_abort(700, 701), in_stream=False) == StreamAbort(700, 701)
    # protocol v4 (streaming 'parallel', PG16+) appends abort_lsn and abort_ts: tolerated
    v4 = stream_abort(700, 701) + struct.pack(">Qq", 0x99, TS_PG)
    assert decode(v4, in_stream=False) == StreamAbort(700, 701, 0x99, TS_UNIX)


@pytest.mark.parametrize("build", [
    lambda x: relation(16384, xid=x),
    lambda x: insert(16384, b"1", None, xid=x),
    lambda x: update(16384, [b"1"], [b"0"], b"K", xid=x),
    lambda x: delete(16384, [b"1"], b"O", xid=x),
    lambda x: truncate([16384], 3, xid=x),
    lambda x: message("cdc", b"c", xid=x),
    lambda x: type_msg(16390, "public", "mood", xid=x),
], ids=["R", "I", "U", "D", "T", "M", "Y"])
def test_in_stream_messages_carry_a_leading_xid(build: object) -> None:
    assert callable(build)
    plain = decode(build(None), in_stream=False)
    wrapped = decode(build(0xFFFF_0001), in_stream=True)
    assert wrapped == InStream(0xFFFF_0001, plain)  # type: ignore[arg-type]


def test_in_stream_flag_does_not_affect_other_messages() -> None:
    assert decode(origin(1, "o"), in_stream=True) == Origin(1, "o")
    assert decode(begin(3), in_stream=True) == decode(begin(3), in_stream=False)


def test_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(PgoutputError, match=r"unknown pgoutput message type b'Z' \(0x5a\)"):
        decode(b"Z\x00\x00", in_stream=False)
    with pytest.raises(ValueError, match="two-phase"):
        decode(b"P" + b"\x00" * 30, in_stream=False)
    with pytest.raises(PgoutputError, match="empty"):
        decode(b"", in_stream=False)


@pytest.mark.parametrize("payload", [
    begin(1)[:-1],
    insert(1, b"abc")[:-1],  # value shorter than its length
    insert(1, b"abc")[:8],
    b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"x",  # bad column kind
    relation(1)[:12],  # no NUL after the name
    message("p", b"content")[:-2],
    truncate([1, 2])[:-1],
    b"R" + struct.pack(">I", 1) + b"\xff\xfe\0t\0d\0\0",  # invalid UTF-8 schema name
], ids=["begin", "value", "tuple", "kind", "cstring", "message", "truncate", "utf8"])
def test_malformed_messages_raise_pgoutput_error(payload: bytes) -> None:
    with pytest.raises(PgoutputError):
        decode(payload, in_stream=False)


def test_fast_constructed_changes_match_the_dataclasses() -> None:
    # The decoder sets slots directly on the hot path; a field added to events.py must not be
    # left unset silently.
    for cls, names in pgoutput._FAST_FIELDS.items():
        assert tuple(f.name for f in dataclasses.fields(cls)) == names
    ins = decode(insert(1, b"a"), in_stream=False)
    upd = decode(update(1, [b"a"]), in_stream=False)
    dele = decode(delete(1, [b"a"]), in_stream=False)
    assert (ins, upd, dele) == (Insert(relid=1, new=(b"a",)), Update(relid=1, new=(b"a",)),
                                Delete(relid=1, old=(b"a",)))
    assert hash(ins) == hash(Insert(relid=1, new=(b"a",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ins.relid = 2  # type: ignore[misc, union-attr]


# -- assembler ----------------------------------------------------------------------------------


def feed_all(asm: TransactionAssembler, payloads: Iterable[bytes]) -> list[Event]:
    out: list[Event] = []
    for p in payloads:
        out.extend(asm.feed(p))
    return out


def spill_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.log"))


REL = relation(16384)
REL_EV = decode(REL, in_stream=False)


def test_ordinary_transactions_pass_straight_through(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    assert list(asm.feed(begin(500, 0x100))) == [
        Begin(xid=500, final_lsn=0x100, commit_ts_us=TS_UNIX)]
    assert list(asm.feed(origin(1, "elsewhere"))) == []  # skipped
    assert list(asm.feed(type_msg(16390, "public", "mood"))) == []  # skipped
    assert list(asm.feed(REL)) == [REL_EV]
    assert asm.relations[16384] == REL_EV
    rest = feed_all(asm, [insert(16384, b"1", b"a"), update(16384, [b"1", b"b"]),
                          delete(16384, [b"1", None]), truncate([16384], 1),
                          message("cdc", b"x"), commit(0x100, 0x130)])
    assert rest == [
        Insert(relid=16384, new=(b"1", b"a")),
        Update(relid=16384, new=(b"1", b"b")),
        Delete(relid=16384, old=(b"1", None)),
        Truncate(relids=(16384,), cascade=True),
        Message(transactional=True, lsn=0x200, prefix="cdc", content=b"x"),
        Commit(xid=500, commit_lsn=0x100, end_lsn=0x130, commit_ts_us=TS_UNIX),
    ]
    # a non-transactional message outside any transaction goes out as it comes
    assert list(asm.feed(message("p", b"now", transactional=False))) == [
        Message(transactional=False, lsn=0x200, prefix="p", content=b"now")]
    assert list(tmp_path.iterdir()) == []  # nothing spilled, nothing created


def test_commit_without_begin_is_an_assembly_error(tmp_path: Path) -> None:
    with pytest.raises(AssemblyError, match="Commit without Begin"):
        list(TransactionAssembler(tmp_path).feed(commit()))


def _streamed_txn_payloads() -> list[bytes]:
    """Transaction 700 in three chunks, with an ordinary transaction between chunks."""
    return [
        stream_start(700), relation(16384, xid=700), insert(16384, b"1", b"a", xid=700),
        insert(16384, b"2", b"b", xid=700), STREAM_STOP,
        begin(600, 0x500), relation(16384), insert(16384, b"99", None), commit(0x500, 0x510),
        stream_start(700, first=False), update(16384, [b"1", b"z"], xid=700),
        message("cdc", b"m", xid=700), type_msg(1, "s", "t", xid=700), STREAM_STOP,
        stream_start(700, first=False), delete(16384, [b"2", None], xid=700), STREAM_STOP,
        stream_commit(700, 0x900, 0x930),
    ]


STREAMED_EVENTS: list[Event] = [
    Begin(xid=600, final_lsn=0x500, commit_ts_us=TS_UNIX),
    REL_EV,  # type: ignore[list-item]
    Insert(relid=16384, new=(b"99", None)),
    Commit(xid=600, commit_lsn=0x500, end_lsn=0x510, commit_ts_us=TS_UNIX),
    Begin(xid=700, final_lsn=0x900, commit_ts_us=TS_UNIX),
    REL_EV,  # type: ignore[list-item]
    Insert(relid=16384, new=(b"1", b"a")),
    Insert(relid=16384, new=(b"2", b"b")),
    Update(relid=16384, new=(b"1", b"z")),
    Message(transactional=True, lsn=0x200, prefix="cdc", content=b"m"),
    Delete(relid=16384, old=(b"2", None)),
    Commit(xid=700, commit_lsn=0x900, end_lsn=0x930, commit_ts_us=TS_UNIX),
]


def test_streamed_commit_replays_in_order(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    payloads = _streamed_txn_payloads()
    events = feed_all(asm, payloads[:-1])
    assert events == STREAMED_EVENTS[:4]  # only the ordinary transaction so far
    assert asm.in_progress == (700,) and asm.memory_bytes > 0
    events += asm.feed(payloads[-1])
    assert events == STREAMED_EVENTS
    assert not asm.in_progress and asm.memory_bytes == 0


def test_spilling_gives_identical_events_and_bounded_memory(tmp_path: Path) -> None:
    in_memory = feed_all(TransactionAssembler(tmp_path / "a"), _streamed_txn_payloads())
    asm = TransactionAssembler(tmp_path / "b", memory_limit_bytes=40)
    payloads = _streamed_txn_payloads()
    seen_files = False
    events: list[Event] = []
    for p in payloads[:-1]:
        events.extend(asm.feed(p))
        assert asm.memory_bytes <= 40
        seen_files = seen_files or bool(spill_files(tmp_path / "b"))
    assert seen_files
    events.extend(asm.feed(payloads[-1]))
    assert events == in_memory == STREAMED_EVENTS
    assert spill_files(tmp_path / "b") == []  # deleted after replay
    asm.close()
    assert list((tmp_path / "b").iterdir()) == []  # private directory removed


@pytest.mark.parametrize("limit", [0, 10**9])
def test_top_level_abort_leaves_no_trace(tmp_path: Path, limit: int) -> None:
    asm = TransactionAssembler(tmp_path, memory_limit_bytes=limit)
    feed_all(asm, [stream_start(700), relation(16384, xid=700), insert(16384, b"1", xid=700),
                   insert(16384, b"2", xid=701), STREAM_STOP])
    assert bool(spill_files(tmp_path)) == (limit == 0)
    assert feed_all(asm, [stream_abort(700)]) == []
    assert asm.in_progress == () and asm.memory_bytes == 0
    assert spill_files(tmp_path) == []
    # nothing of it resurfaces; an abort of an unknown transaction is harmless
    assert feed_all(asm, [stream_abort(700), stream_abort(12345, 12346)]) == []
    with pytest.raises(AssemblyError, match="chunks were not received"):
        list(asm.feed(stream_commit(700)))


def _subxact_payloads(abort_subxid: int) -> list[bytes]:
    """Top 700; subxacts 701 (with nested 702), then 703 after 701 ends."""
    return [
        stream_start(700), relation(16384, xid=700), insert(16384, b"1", xid=700),
        insert(16384, b"2", xid=701), STREAM_STOP,
        stream_start(700, first=False), insert(16384, b"3", xid=702),
        insert(16384, b"4", xid=701), STREAM_STOP,
        stream_abort(700, abort_subxid),
        stream_start(700, first=False), relation(16384, xid=703),
        insert(16384, b"5", xid=703), insert(16384, b"6", xid=700), STREAM_STOP,
        stream_commit(700),
    ]


def _inserted(events: Sequence[Event]) -> list[bytes]:
    return [e.new[0] for e in events if isinstance(e, Insert)]  # type: ignore[misc]


@pytest.mark.parametrize("limit", [0, 10**9])
@pytest.mark.parametrize(("subxid", "kept"), [
    (701, [b"1", b"5", b"6"]),  # the subxact and its nested child (and later ones) go
    (702, [b"1", b"2", b"5", b"6"]),  # truncates from 702's first change: 3 and 4 go
    (799, [b"1", b"2", b"3", b"4", b"5", b"6"]),  # an empty subtransaction: nothing to undo
])
def test_subtransaction_abort_discards_only_that_subtransaction(
        tmp_path: Path, limit: int, subxid: int, kept: list[bytes]) -> None:
    asm = TransactionAssembler(tmp_path, memory_limit_bytes=limit)
    events = feed_all(asm, _subxact_payloads(subxid))
    assert _inserted(events) == kept
    assert isinstance(events[0], Begin) and isinstance(events[-1], Commit)
    assert isinstance(events[1], Relation)  # the top-level Relation survives
    assert spill_files(tmp_path) == [] and asm.memory_bytes == 0


def test_abort_of_subxact_seen_after_an_earlier_abort(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    events = feed_all(asm, [
        stream_start(700), insert(16384, b"1", xid=701), insert(16384, b"2", xid=702),
        STREAM_STOP, stream_abort(700, 702),  # 702 goes, 701 stays
        stream_start(700, first=False), insert(16384, b"3", xid=703), STREAM_STOP,
        stream_abort(700, 702),  # repeated: already forgotten, no effect
        stream_abort(700, 703),
        stream_start(700, first=False), insert(16384, b"4", xid=704), STREAM_STOP,
        stream_commit(700),
    ])
    assert _inserted(events) == [b"1", b"4"]


def test_nested_subxacts_are_forgotten_with_their_parent(tmp_path: Path) -> None:
    # After 701 is aborted, its nested 702 must be forgotten: a late abort naming 702 (its
    # offset now points into 703's records) must not cut into what came after.
    asm = TransactionAssembler(tmp_path)
    events = feed_all(asm, [
        stream_start(700), insert(16384, b"1", xid=700), insert(16384, b"2", xid=701),
        insert(16384, b"3", xid=702), STREAM_STOP, stream_abort(700, 701),
        stream_start(700, first=False), insert(16384, b"4", xid=703),
        insert(16384, b"5", xid=703), insert(16384, b"6", xid=703), STREAM_STOP,
        stream_abort(700, 702),
        stream_commit(700),
    ])
    assert _inserted(events) == [b"1", b"4", b"5", b"6"]


def test_interleaved_streams_of_two_transactions(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path, memory_limit_bytes=60)
    events = feed_all(asm, [
        stream_start(700), insert(16384, b"a1", xid=700), STREAM_STOP,
        stream_start(800), insert(16384, b"b1", xid=800), insert(16384, b"b2", xid=801),
        STREAM_STOP,
        stream_start(700, first=False), insert(16384, b"a2", xid=701), STREAM_STOP,
        stream_abort(800, 801),
        stream_start(800, first=False), insert(16384, b"b3", xid=800), STREAM_STOP,
    ])
    assert events == [] and set(asm.in_progress) == {700, 800}
    events = feed_all(asm, [stream_commit(800, 0x800, 0x810)])
    assert _inserted(events) == [b"b1", b"b3"] and events[0] == Begin(
        xid=800, final_lsn=0x800, commit_ts_us=TS_UNIX)
    events = feed_all(asm, [stream_abort(700)])
    assert events == [] and asm.in_progress == ()
    assert spill_files(tmp_path) == []


def test_reset_discards_in_progress_streams(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path, memory_limit_bytes=30)
    feed_all(asm, [stream_start(700), insert(16384, b"1", xid=700), STREAM_STOP,
                   stream_start(800), insert(16384, b"2", xid=800)])  # mid stream block
    assert spill_files(tmp_path)
    asm.reset()
    assert asm.in_progress == () and asm.memory_bytes == 0 and spill_files(tmp_path) == []
    # the new session restarts both from their first chunk; continuing one is an error
    with pytest.raises(AssemblyError, match="first chunk was not received"):
        list(asm.feed(stream_start(700, first=False)))
    with pytest.raises(AssemblyError, match="chunks were not received"):
        list(asm.feed(stream_commit(800)))
    events = feed_all(asm, [stream_start(700), insert(16384, b"9", xid=700), STREAM_STOP,
                            stream_commit(700)])
    assert _inserted(events) == [b"9"]


def test_first_segment_again_restarts_the_log(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    events = feed_all(asm, [
        stream_start(700), insert(16384, b"stale", xid=700), STREAM_STOP,
        stream_start(700, first=True), insert(16384, b"fresh", xid=700), STREAM_STOP,
        stream_commit(700),
    ])
    assert _inserted(events) == [b"fresh"]


def test_protocol_violations(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    with pytest.raises(AssemblyError, match="Stream Stop without Stream Start"):
        list(asm.feed(STREAM_STOP))
    list(asm.feed(stream_start(700)))
    for bad in (stream_start(800), begin(1), commit(), stream_commit(700), stream_abort(700)):
        with pytest.raises(AssemblyError, match="inside the stream block of transaction 700"):
            list(asm.feed(bad))
    with pytest.raises(PgoutputError, match="unknown"):
        list(asm.feed(b"Z"))
    with pytest.raises(PgoutputError, match="truncated"):
        list(asm.feed(b"I\x00\x00"))
    with pytest.raises(PgoutputError, match="empty"):
        list(asm.feed(b""))


def test_in_stream_extras(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    list(asm.feed(stream_start(700)))
    # a non-transactional message cannot be rolled back: it goes out at once
    assert list(asm.feed(message("p", b"x", transactional=False, xid=700))) == [
        Message(transactional=False, lsn=0x200, prefix="p", content=b"x")]
    assert list(asm.feed(origin(5, "o"))) == []  # origin after Stream Start: skipped
    assert list(asm.feed(memoryview(insert(16384, b"1", xid=700)))) == []
    list(asm.feed(STREAM_STOP))
    events = list(asm.feed(stream_commit(700)))
    assert _inserted(events) == [b"1"] and len(events) == 3


def test_empty_streamed_transaction_still_commits(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    events = feed_all(asm, [stream_start(700), STREAM_STOP, stream_commit(700, 0x10, 0x20)])
    assert events == [Begin(xid=700, final_lsn=0x10, commit_ts_us=TS_UNIX),
                      Commit(xid=700, commit_lsn=0x10, end_lsn=0x20, commit_ts_us=TS_UNIX)]


def test_relations_in_streams_enter_the_cache_at_replay(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path)
    feed_all(asm, [stream_start(700), relation(5, "five", xid=700), STREAM_STOP])
    assert 5 not in asm.relations  # not committed yet
    replay = asm.feed(stream_commit(700))
    assert isinstance(next(replay), Begin)
    assert next(replay) == decode(relation(5, "five"), in_stream=False)
    assert asm.relations[5].name == "five"
    assert isinstance(next(replay), Commit)


def test_abandoned_replay_deletes_its_spill_file(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path, memory_limit_bytes=0)
    feed_all(asm, [stream_start(700), insert(16384, b"1", xid=700),
                   insert(16384, b"2", xid=700), STREAM_STOP])
    replay = asm.feed(stream_commit(700))
    next(replay)
    assert spill_files(tmp_path)
    replay.close()  # type: ignore[attr-defined]
    assert spill_files(tmp_path) == []
    # a replay that was never started is cleaned up by reset()/close()
    feed_all(asm, [stream_start(701), insert(16384, b"1", xid=701), STREAM_STOP])
    asm.feed(stream_commit(701))
    assert spill_files(tmp_path)
    with asm:
        pass
    assert spill_files(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_big_streamed_transaction_spills_to_one_file(tmp_path: Path) -> None:
    asm = TransactionAssembler(tmp_path, memory_limit_bytes=64 * 1024)
    list(asm.feed(stream_start(700)))
    value = b"v" * 100
    for i in range(20_000):
        list(asm.feed(insert(16384, str(i).encode(), value, xid=700 + (i >= 10_000))))
    list(asm.feed(STREAM_STOP))
    files = spill_files(tmp_path)
    assert len(files) == 1 and files[0].stat().st_size > 2_000_000
    assert asm.memory_bytes == 0
    list(asm.feed(stream_abort(700, 701)))  # drops the second half, on disk
    assert files[0].stat().st_size < 1_300_000
    count = 0
    for ev in asm.feed(stream_commit(700)):
        if isinstance(ev, Insert):
            assert ev.new == (str(count).encode(), value)
            count += 1
    assert count == 10_000 and spill_files(tmp_path) == []


def test_negative_memory_limit_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_limit_bytes"):
        TransactionAssembler(tmp_path, memory_limit_bytes=-1)

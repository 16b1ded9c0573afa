"""The decoder and assembler on real pgoutput bytes from the server.

No replication protocol needed: ``pg_logical_slot_peek_binary_changes`` returns the very same
pgoutput messages a walsender would send, one per row. Streaming of large in-progress
transactions (protocol v2, ``streaming 'on'``) works through this SQL interface too (checked on
PostgreSQL 15): with ``logical_decoding_work_mem = 64kB`` set in the same session a big
transaction arrives as Stream Start/Stop chunks, Stream Abort for rolled-back savepoints and a
Stream Commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest
from pgutil import ScratchDatabase

from cdcengine.events import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Event,
    Insert,
    Relation,
    Truncate,
    Update,
)
from cdcengine_postgres.replication.pgoutput import (
    InStream,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    decode,
)
from cdcengine_postgres.replication.transactions import TransactionAssembler

SLOT = "pgo_slot"
PUB = "pgo_pub"


def setup(db: ScratchDatabase, ddl: str) -> int:
    """Create the tables, a publication for all of them and the slot; return t's relid."""
    db.execute(ddl)
    db.execute(f"CREATE PUBLICATION {PUB} FOR ALL TABLES")
    db.execute(f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    return int(db.execute("SELECT 't'::regclass::oid")[0][0])


def peek(db: ScratchDatabase, *, streaming: bool = False) -> list[bytes]:
    """All pgoutput messages in the slot (v1, or v2 streaming with a 64kB decoding budget)."""
    opts = "'proto_version', '1'"
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        if streaming:
            conn.execute("SET logical_decoding_work_mem = '64kB'")
            opts = "'proto_version', '2', 'streaming', 'on'"
        rows = conn.execute(
            f"SELECT data FROM pg_logical_slot_peek_binary_changes('{SLOT}', NULL, NULL, "
            f"{opts}, 'publication_names', '{PUB}')"
        ).fetchall()
    return [bytes(r[0]) for r in rows]


def assemble(payloads: Sequence[bytes], spill_dir: Path, limit: int = 64 << 20) -> list[Event]:
    with TransactionAssembler(spill_dir, memory_limit_bytes=limit) as asm:
        out: list[Event] = []
        for p in payloads:
            out.extend(asm.feed(p))
        assert asm.in_progress == ()
    return out


def changes(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, (Begin, Commit, Relation))]


def test_insert_update_delete_values(db: ScratchDatabase, tmp_path: Path) -> None:
    relid = setup(db, "CREATE TABLE t (id int PRIMARY KEY, name text, n numeric(6,2), "
                      "note text, ts timestamptz)")
    db.execute("INSERT INTO t VALUES (1, 'héllo', 1.5, NULL, '2024-01-02 03:04:05+00')")
    db.execute("UPDATE t SET name = 'bye' WHERE id = 1")
    db.execute("DELETE FROM t WHERE id = 1")
    events = assemble(peek(db), tmp_path)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Begin", "Relation", "Insert", "Commit", "Begin", "Update", "Commit",
                     "Begin", "Delete", "Commit"]
    rel = events[1]
    assert isinstance(rel, Relation)
    assert (rel.relid, rel.schema, rel.name, rel.replica_identity) == (
        relid, "public", "t", "default")
    assert [(c.name, c.key) for c in rel.columns] == [
        ("id", True), ("name", False), ("n", False), ("note", False), ("ts", False)]
    assert [c.type_oid for c in rel.columns] == [23, 25, 1700, 25, 1184]
    assert changes(events) == [
        Insert(relid=relid, new=(b"1", "héllo".encode(), b"1.50", None,
                                 b"2024-01-02 03:04:05+00")),
        Update(relid=relid, new=(b"1", b"bye", b"1.50", None, b"2024-01-02 03:04:05+00")),
        Delete(relid=relid, old=(b"1", None, None, None, None), old_is_key=True),
    ]
    begin, commit = events[0], events[3]
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert commit.xid == begin.xid and commit.commit_lsn == begin.final_lsn
    assert commit.end_lsn > commit.commit_lsn
    # commit timestamps come out in Unix-epoch microseconds (the server's clock, now-ish)
    now_us = int(db.execute("SELECT (extract(epoch FROM now()) * 1e6)::bigint")[0][0])
    assert abs(commit.commit_ts_us - now_us) < 600 * 10**6


def test_unchanged_toast_key_change_and_replica_identity_full(
        db: ScratchDatabase, tmp_path: Path) -> None:
    relid = setup(db, "CREATE TABLE t (id int PRIMARY KEY, big text, small int);"
                      "CREATE TABLE f (id int PRIMARY KEY, v text);"
                      "ALTER TABLE f REPLICA IDENTITY FULL")
    # 96 kB of md5 hex: too big and too random to stay inline, so it is TOASTed out of line
    db.execute("INSERT INTO t SELECT 1, string_agg(md5(g::text), '') , 0 "
               "FROM generate_series(1, 3000) g")
    db.execute("UPDATE t SET small = 1 WHERE id = 1")  # big untouched: sent as 'u'
    db.execute("UPDATE t SET id = 2, small = 2 WHERE id = 1")  # key change: old key 'K'
    db.execute("INSERT INTO f VALUES (1, 'one')")
    db.execute("UPDATE f SET v = 'uno' WHERE id = 1")
    db.execute("DELETE FROM f")
    frelid = int(db.execute("SELECT 'f'::regclass::oid")[0][0])
    events = assemble(peek(db), tmp_path)
    rels = {e.name: e for e in events if isinstance(e, Relation)}
    assert rels["f"].replica_identity == "full"
    assert rels["f"].key_columns == ("id", "v")  # FULL: every column is part of the identity
    ch = changes(events)
    ins = ch[0]
    assert isinstance(ins, Insert)
    big = ins.new[1]
    assert isinstance(big, bytes) and len(big) == 96_000
    assert ch[1] == Update(relid=relid, new=(b"1", UNCHANGED, b"1"))
    key_change = ch[2]
    assert isinstance(key_change, Update)
    assert key_change.old == (b"1", None, None) and key_change.old_is_key
    assert key_change.new[0] == b"2" and key_change.new[2] == b"2"
    assert ch[3:] == [
        Insert(relid=frelid, new=(b"1", b"one")),
        Update(relid=frelid, new=(b"1", b"uno"), old=(b"1", b"one"), old_is_key=False),
        Delete(relid=frelid, old=(b"1", b"uno"), old_is_key=False),
    ]


def test_truncate(db: ScratchDatabase, tmp_path: Path) -> None:
    relid = setup(db, "CREATE TABLE t (id serial PRIMARY KEY)")
    db.execute("INSERT INTO t DEFAULT VALUES")
    db.execute("TRUNCATE t RESTART IDENTITY")
    assert changes(assemble(peek(db), tmp_path))[1:] == [
        Truncate(relids=(relid,), cascade=False, restart_identity=True)]


@pytest.fixture
def streaming_server(db: ScratchDatabase) -> ScratchDatabase:
    if db.server.version < 140000:
        pytest.skip("streaming of in-progress transactions needs PostgreSQL 14")
    return db


BIG_TXN_WITH_SAVEPOINT = """
BEGIN;
INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g;
SAVEPOINT a;
INSERT INTO t SELECT g, repeat('y', 100) FROM generate_series(1001, 3000) g;
ROLLBACK TO SAVEPOINT a;
INSERT INTO t SELECT g, repeat('z', 100) FROM generate_series(3001, 4000) g;
COMMIT
"""


@pytest.mark.parametrize("limit", [64 << 20, 32 << 10], ids=["memory", "spilled"])
def test_streamed_transaction_with_rolled_back_savepoint(
        streaming_server: ScratchDatabase, tmp_path: Path, limit: int) -> None:
    db = streaming_server
    relid = setup(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.execute(BIG_TXN_WITH_SAVEPOINT)
    db.execute("INSERT INTO t VALUES (5000, 'after')")  # an ordinary one after it
    payloads = peek(db, streaming=True)

    # What the server really sent (checked with the decoder alone): chunks, a subtransaction
    # abort, changes whose leading xid is the subtransaction's own, a Stream Commit.
    in_stream = False
    starts: list[StreamStart] = []
    aborts: list[StreamAbort] = []
    xids: set[int] = set()
    for p in payloads:
        m = decode(p, in_stream=in_stream)
        if isinstance(m, StreamStart):
            in_stream = True
            starts.append(m)
        elif isinstance(m, InStream):
            xids.add(m.xid)
        elif isinstance(m, StreamAbort):
            aborts.append(m)
        elif isinstance(m, StreamStop):
            in_stream = False
    top = starts[0].xid
    assert len(starts) > 2 and starts[0].first and not starts[1].first
    assert len(aborts) == 1 and aborts[0].xid == top and aborts[0].subxid != top
    assert aborts[0].subxid in xids and top in xids and len(xids) == 3  # top, a, a again
    stream_commits = [decode(p, in_stream=False) for p in payloads if p[:1] == b"c"]
    assert len(stream_commits) == 1
    assert isinstance(stream_commits[0], StreamCommit) and stream_commits[0].xid == top

    events = assemble(payloads, tmp_path, limit)
    ids = [int(e.new[0]) for e in events if isinstance(e, Insert)]  # type: ignore[arg-type]
    assert ids == [*range(1, 1001), *range(3001, 4001), 5000]
    begins = [e for e in events if isinstance(e, Begin)]
    commits = [e for e in events if isinstance(e, Commit)]
    assert [b.xid for b in begins] == [top, begins[1].xid] and len(commits) == 2
    assert commits[0].xid == top and commits[0].commit_lsn == begins[0].final_lsn
    assert commits[0].end_lsn < commits[1].end_lsn
    assert all(isinstance(e, Insert) and e.relid == relid for e in changes(events))
    assert not list(tmp_path.rglob("*.log"))


def test_streamed_transaction_rolled_back_leaves_nothing(
        streaming_server: ScratchDatabase, tmp_path: Path) -> None:
    db = streaming_server
    setup(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.execute("BEGIN; INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 3000) g;"
               "ROLLBACK")
    db.execute("INSERT INTO t VALUES (1, 'kept')")
    payloads = peek(db, streaming=True)
    assert any(p[:1] == b"A" for p in payloads)  # it was streamed, then aborted
    events = assemble(payloads, tmp_path, 16 << 10)
    assert [e.new for e in events if isinstance(e, Insert)] == [(b"1", b"kept")]

"""Initial snapshot under an exported snapshot: exact point, bounded chunks, no leftovers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cdc_util import query, source_for

from cdcengine.lsn import parse_lsn
from cdcengine_postgres.replication.snapshot import TableSnapshot


def test_snapshot_sees_exactly_the_rows_before_its_consistent_point(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, d date, note text, "
               "g int GENERATED ALWAYS AS (id * 2) STORED);"
               "INSERT INTO t (id, d, note) SELECT i, DATE '2024-01-01' + i, 'n' || i "
               "FROM generate_series(1, 5000) i;"
               "INSERT INTO t (id, d, note) VALUES (0, 'infinity', E'tab\\there')")
    src = source_for(db.dsn, tmp_path, ["t"])
    tc = src.table_config("t")
    with TableSnapshot(src, tc, chunk_bytes=16 * 1024) as snap:
        db.execute("INSERT INTO t (id, d, note) VALUES (9999, '2025-01-01', 'late')")
        chunks = list(snap.chunks())
        temp = query(db.dsn, "SELECT slot_name FROM pg_replication_slots WHERE temporary")
        assert len(temp) == 1
    assert len(chunks) > 3  # bounded chunks
    rows = [r for c in chunks for r in c.to_pylist()]
    assert len(rows) == 5001 == snap.rows
    assert {r["id"] for r in rows} == set(range(5001))  # the late row is after C
    assert [c.name for c in snap.columns] == ["id", "d", "note"]  # generated not captured
    row0 = next(r for r in rows if r["id"] == 0)
    assert row0["d"] is None and row0["note"] == "tab\there"
    assert snap.masked == {"d": 1}
    assert next(r for r in rows if r["id"] == 7)["d"] == dt.date(2024, 1, 8)
    current = parse_lsn(query(db.dsn, "SELECT pg_current_wal_lsn()::text")[0][0])
    assert 0 < snap.consistent_point <= current
    # the temporary slot went away with its connection
    assert query(db.dsn, "SELECT slot_name FROM pg_replication_slots WHERE temporary") == []


def test_column_selection_keeps_the_key(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE s (id int PRIMARY KEY, a text, b text);"
               "INSERT INTO s VALUES (1, 'x', 'y')")
    src = source_for(db.dsn, tmp_path, ["s"], table={"s": {"columns": ["b"]}})
    with TableSnapshot(src, src.table_config("s")) as snap:
        rows = [r for c in snap.chunks() for r in c.to_pylist()]
    assert rows == [{"id": 1, "b": "y"}]


def test_empty_table_yields_one_empty_chunk_with_schema(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE e (id bigint PRIMARY KEY, v numeric(12,2))")
    src = source_for(db.dsn, tmp_path, ["e"])
    with TableSnapshot(src, src.table_config("e")) as snap:
        chunks = list(snap.chunks())
    assert len(chunks) == 1
    assert chunks[0].num_rows == 0
    assert str(chunks[0].schema.field("v").type) == "decimal128(12, 2)"


def test_chunks_of_a_never_analyzed_numeric_key_never_overlap(db, tmp_path: Path) -> None:
    """A table never analyzed has no histogram: the chunk bounds come from a row sample, which
    was sorted as text (`SELECT id::text ... ORDER BY id` orders by the output column), so the
    ranges of a bigint key overlapped and a 300k-row table was copied as ~550k rows."""
    db.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v text NOT NULL);"
               "INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 300000) g")
    assert query(db.dsn, "SELECT count(*) FROM pg_stats WHERE tablename = 't'")[0][0] == 0
    src = source_for(db.dsn, tmp_path, ["t"])
    with TableSnapshot(src, src.table_configs[0]) as snap:
        plan = snap.plan(20_000)
        assert len(plan) > 5
        ids: list[int] = []
        for chunk in plan:
            for part in snap.copy_chunk(chunk):
                ids.extend(part.column("id").to_pylist())
    los = [int(c.lo) for c in plan if c.lo is not None]
    assert los == sorted(los)
    assert len(ids) == len(set(ids)) == 300_000

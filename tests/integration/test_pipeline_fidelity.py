"""End to end through the whole pipeline (enable → Pipeline.run → consolidated Delta read back),
compared with the source value for value (SPEC §5, §6):

* every §6 type, through the snapshot and through the stream (inserts and updates), with the
  database in a non-UTC time zone and other hostile rendering defaults;
* transactions larger than logical_decoding_work_mem (pgoutput v2 stream chunks): applied in
  full and in one Delta commit, a rolled-back savepoint's rows absent, an aborted one no trace;
* a concurrent pgbench workload;
* PostgreSQL crashing (immediate stop) while streaming: nothing lost or duplicated; and a run
  that lost its source leaves no writer thread committing after it raised.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from cdc_util import query, source_for
from deltalake import DeltaTable
from pgutil import MakeCluster, ScratchDatabase
from psycopg import sql
from test_convert_roundtrip import DDL, HOSTILE, ROWS, TEXTUAL, TYPED, _mask_nan, _same
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import ChangeBatch
from cdcengine.pipeline.pipeline import Pipeline, RunStats
from cdcengine.sink.delta import DeltaSink
from cdcengine_postgres.connection import connect
from cdcengine_postgres.testing.cluster import ClusterError, find_bindir


def _alter_database(db: ScratchDatabase, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        db.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(db.name), sql.Identifier(name), sql.Literal(value)))


def _setup(src: SourceConfig, tmp_path: Path) -> str:
    state = "sqlite:///" + str(tmp_path / "state.db")
    api.enable_cdc(src, state=state)
    return state


def _delta(src: SourceConfig, table: str, kind: str = "consolidated",
           columns: list[str] | None = None) -> pa.Table:
    return DeltaSink(src.destination, source=src.name).read_table(TableRef.parse(table), kind,
                                                                  columns=columns)


def _applied(src: SourceConfig, table: str = "t", kind: str = "append") -> int | None:
    return DeltaSink(src.destination, source=src.name).applied_version(TableRef.parse(table), kind)


def _same_as_source(src: SourceConfig, dsn: str, table: str) -> None:
    """Non-deleted consolidated rows == the source table, all columns, exactly."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
        names = [d.name for d in cur.description or ()]
        want = sorted(cur.fetchall())
    got = sorted(tuple(r[n] for n in names) for r in _delta(src, table).to_pylist()
                 if not r["_cdc_deleted"])
    assert len(got) == len(want), table
    assert got == want, table


# ---- 1. types ---------------------------------------------------------------------------------

EXTRA_TEXTUAL = ["ci", "x", "bx", "tr"]
# unicode: combining characters, ZWJ emoji sequence, a flag; and text-array quoting
UNICODE_ROW = r"""
INSERT INTO conv (id, t, vc, at) VALUES
(7, E'e\u0301 Z\u0351\u0362 👩‍👩‍👧 🇺🇸 ∑', 'é✓🎉', ARRAY['é', '🎉,"x\y', 'a}b{', ' '])
"""


def _data_columns(db: ScratchDatabase) -> list[str]:
    rows = db.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'conv'::regclass"
                      " AND attnum > 1 AND NOT attisdropped ORDER BY attnum")
    return [str(r[0]) for r in rows]


def test_every_type_round_trips_through_snapshot_and_stream(db: ScratchDatabase,
                                                            tmp_path: Path) -> None:
    _alter_database(db, {**HOSTILE, "timezone": "America/New_York"})
    db.execute(DDL)
    db.execute("ALTER TABLE conv ADD COLUMN bx box, ADD COLUMN tr tstzrange")
    for ddl in ("CREATE EXTENSION IF NOT EXISTS citext; ALTER TABLE conv ADD COLUMN ci citext",
                "SELECT '<a/>'::xml; ALTER TABLE conv ADD COLUMN x xml"):
        with contextlib.suppress(psycopg.Error):  # contrib or libxml not on this server
            db.execute(ddl)
    db.execute(ROWS)
    db.execute(UNICODE_ROW)
    cols = _data_columns(db)
    db.execute("UPDATE conv SET bx = box(point(id, -id), point(0.5, 1e10)),"
               " tr = tstzrange(ts::timestamptz, NULL, '(]') WHERE id < 7")
    if "ci" in cols:
        db.execute("UPDATE conv SET ci = t || 'MiXeD'")
    if "x" in cols:
        db.execute("UPDATE conv SET x = '<a k=\"v\">b &amp; c ✓</a>' WHERE id IN (1, 4)")

    src = source_for(db.dsn, tmp_path, ["conv"], flush_interval_ms=100)
    state = _setup(src, tmp_path)
    masked: dict[str, int] = {}

    def count_masks(batch: ChangeBatch, _stats: RunStats) -> None:
        for (_ref, column), n in batch.masked.items():
            masked[column] = masked.get(column, 0) + n

    run = Running(src, state)
    run.pipeline = Pipeline(src, state=state, on_batch=count_masks)
    with run:
        wait_for(lambda: len(live_rows(src, "conv")) == 7)
        names = sql.SQL(", ").join(map(sql.Identifier, cols))
        db.execute(sql.SQL("INSERT INTO conv (id, {0}) SELECT id + 100, {0} FROM conv")
                   .format(names))
        # full-row updates to row 4's values (specials included), of a streamed row and a
        # snapshot row
        db.execute(sql.SQL("UPDATE conv SET ({0}) = (SELECT {0} FROM conv WHERE id = 4)"
                           " WHERE id IN (1, 101)").format(names))
        wait_for(lambda: live_rows(src, "conv").get(101, {}).get("i2") == 32767)
    rows: dict[Any, dict[str, Any]] = live_rows(src, "conv")
    assert sorted(rows) == [*range(1, 8), *range(101, 108)]

    # typed columns: psycopg's binary typed fetch on a plain connection (New York time zone),
    # with SPEC §6 masking; timestamptz compares as instants and must come back UTC-aware
    typed = list(TYPED)
    with psycopg.connect(db.dsn) as plain, plain.cursor(binary=True) as cur:
        assert plain.execute("SHOW timezone").fetchone() == ("America/New_York",)
        cur.execute(sql.SQL("SELECT id, {} FROM conv ORDER BY id").format(
            sql.SQL(", ").join(sql.SQL(TYPED[n]) for n in typed)))
        expected = {r[0]: dict(zip(typed, r[1:], strict=True)) for r in cur.fetchall()}
    # string columns: the server's output function under the pinned settings
    textual = [n for n in TEXTUAL + EXTRA_TEXTUAL if n in cols]
    with connect(db.dsn) as pinned:
        for r in pinned.execute(sql.SQL("SELECT id, {} FROM conv").format(sql.SQL(", ").join(
                sql.SQL("CASE WHEN {0} IS NOT NULL THEN format('%s', {0}) END").format(
                    sql.Identifier(n)) for n in textual))).fetchall():
            expected[r[0]].update(zip(textual, r[1:], strict=True))
    mismatches = []
    for key, want_row in expected.items():
        for name, want in want_row.items():
            got = rows[key][name]
            if name in ("n122", "an"):
                want = _mask_nan(want)
            if not _same(got, want):
                mismatches.append((key, name, got, want))
    assert not mismatches, mismatches[:10]
    assert rows[1]["tstz"] == rows[104]["tstz"] == datetime(1900, 1, 1, 5, tzinfo=UTC)
    assert {str(r["tstz"].tzinfo) for r in rows.values() if r["tstz"]} == {"UTC"}
    assert rows[106]["tr"] == '("0001-01-01 04:56:02+00",)'  # rendered in UTC, not New York
    assert rows[107]["t"] == "e\u0301 Z\u0351\u0362 👩‍👩‍👧 🇺🇸 ∑"
    assert rows[107]["at"] == ["é", '🎉,"x\\y', "a}b{", " "]
    assert rows[102]["bya"] == b"" and rows[106]["bya"] == b"\x00"
    assert rows[102]["n"] == "NaN" and rows[104]["d"] is None and rows[105]["ts"] is None
    # masked values are counted (streamed: rows 2, 4, 5 and the two updates to row 4's values)
    assert {c: masked.get(c) for c in ("d", "ts", "tstz")} == {"d": 5, "ts": 5, "tstz": 3}
    schema = _delta(src, "conv").schema
    assert {n: schema.field(n).type for n in ("i2", "f4", "n122", "n", "n402", "bya", "d", "ts",
                                              "tstz", "ai", "iv")} == {
        "i2": pa.int16(), "f4": pa.float32(), "n122": pa.decimal128(12, 2), "n": pa.string(),
        "n402": pa.string(), "bya": pa.binary(), "d": pa.date32(), "ts": pa.timestamp("us"),
        "tstz": pa.timestamp("us", tz="UTC"), "ai": pa.list_(pa.int32()), "iv": pa.string()}


def test_a_latin1_database_arrives_as_utf8_through_snapshot_and_stream(
        db: ScratchDatabase, tmp_path: Path) -> None:
    """The engine pins client_encoding=UTF8: the server converts a LATIN1 database's text for
    COPY and pgoutput alike. Before, a LATIN1 'é' arrived as one invalid UTF-8 byte, was
    masked and Delta held NULL."""
    latin = ScratchDatabase(db.server)
    with psycopg.connect(db.server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' "
                             "LC_CTYPE 'C' TEMPLATE template0").format(sql.Identifier(latin.name)))
    try:
        latin.execute("CREATE TABLE l (id int PRIMARY KEY, t text, v varchar(20));"
                      "INSERT INTO l VALUES (1, 'café', 'Ångström'), (2, '£5 ±1 µs', NULL)")
        src = source_for(latin.dsn, tmp_path, ["l"], flush_interval_ms=100)
        state = _setup(src, tmp_path)
        with Running(src, state):
            wait_for(lambda: len(live_rows(src, "l")) == 2)
            latin.execute("INSERT INTO l VALUES (3, 'naïve façade', 'Ø')")
            latin.execute("UPDATE l SET v = 'ÿ§' WHERE id = 1")
            wait_for(lambda: live_rows(src, "l").get(1, {}).get("v") == "ÿ§")
        rows = live_rows(src, "l")
        assert {k: (r["t"], r["v"]) for k, r in rows.items()} == {
            1: ("café", "ÿ§"), 2: ("£5 ±1 µs", None), 3: ("naïve façade", "Ø")}
    finally:
        latin.drop()


# ---- 2. streamed (v2) large transactions ------------------------------------------------------

def test_large_streamed_transactions_apply_whole_in_one_commit(db: ScratchDatabase,
                                                                tmp_path: Path) -> None:
    # the walsender of this database streams anything above 64 kB before it commits
    _alter_database(db, {"logical_decoding_work_mem": "64kB"})
    db.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
    src = source_for(db.dsn, tmp_path, ["big"], flush_interval_ms=100, max_batch_rows=500)
    state = _setup(src, tmp_path)
    ref = TableRef("public", "big")
    sink = DeltaSink(src.destination, source=src.name)
    with Running(src, state):
        wait_for(lambda: sink.applied_version(ref, "consolidated") is not None)
        db.execute("BEGIN;"
                   " INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 5000) g;"
                   " UPDATE big SET v = 'u' || id WHERE id <= 100;"
                   " SAVEPOINT s;"
                   " INSERT INTO big SELECT g, 'gone' FROM generate_series(10001, 12000) g;"
                   " UPDATE big SET v = 'gone' WHERE id > 4000;"
                   " ROLLBACK TO SAVEPOINT s;"
                   " INSERT INTO big VALUES (20000, 'after');"
                   " COMMIT")
        db.execute("BEGIN; INSERT INTO big SELECT g, 'aborted'"
                   " FROM generate_series(30001, 33000) g; ROLLBACK")
        db.execute("INSERT INTO big VALUES (40000, 'marker')")
        wait_for(lambda: 40000 in live_rows(src, "big"), timeout=60)
    streamed = query(db.dsn, "SELECT stream_txns FROM pg_stat_replication_slots"
                             " WHERE slot_name = %s", [src.slot_name])
    assert streamed and streamed[0][0] >= 2  # both large transactions went out as v2 chunks
    rows = live_rows(src, "big")
    assert set(rows) == {*range(1, 5001), 20000, 40000}
    _same_as_source(src, db.dsn, "big")
    lsn = rows[1]["_cdc_lsn"]
    assert {r["_cdc_lsn"] for k, r in rows.items() if k != 40000} == {lsn}
    # one source transaction's changes to one table land in one Delta commit: every version of
    # the table holds either none or all of that transaction's rows
    path = sink.path(ref, "consolidated")
    counts = set()
    for version in range(DeltaTable(path).version() + 1):
        lsns = DeltaTable(path, version=version).to_pyarrow_table(columns=["_cdc_lsn"])
        counts.add(lsns["_cdc_lsn"].to_pylist().count(lsn))
    assert counts == {0, 5001}


# ---- 3. concurrent workload -------------------------------------------------------------------

PGBENCH_TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"]


@pytest.mark.slow
def test_pgbench_workload_consolidates_to_the_source(db: ScratchDatabase, tmp_path: Path) -> None:
    try:
        pgbench_bin = find_bindir() / "pgbench"
    except ClusterError as exc:
        pytest.skip(f"needs the PostgreSQL binaries for pgbench: {exc}")
    server = db.server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = server.password or ""
    base = [str(pgbench_bin), "-h", server.host, "-p", str(server.port),
            "-U", server.superuser]

    def pgbench(*args: str) -> None:
        done = subprocess.run([*base, *args, db.name], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]

    pgbench("-i", "-s", "1", "-q")
    src = source_for(db.dsn, tmp_path, PGBENCH_TABLES, flush_interval_ms=200)
    state = _setup(src, tmp_path)
    with Running(src, state):
        sink = DeltaSink(src.destination, source=src.name)
        wait_for(lambda: all(sink.applied_version(TableRef.parse(t), "consolidated")
                             for t in PGBENCH_TABLES), timeout=60)
        pgbench("-c", "4", "-j", "2", "-T", "5", "-n")
        # a last transaction touching all three tables: once it is in Delta, all is
        db.execute("BEGIN; UPDATE pgbench_branches SET filler = 'done' WHERE bid = 1;"
                   " UPDATE pgbench_tellers SET filler = 'done' WHERE tid = 1;"
                   " UPDATE pgbench_accounts SET filler = 'done' WHERE aid = 1; COMMIT")

        def marked() -> bool:
            return all(
                any((r["filler"] or "").startswith("done") and r[key] == 1
                    for r in _delta(src, t, columns=[key, "filler"]).to_pylist())
                for t, key in (("pgbench_branches", "bid"), ("pgbench_tellers", "tid"),
                               ("pgbench_accounts", "aid")))

        wait_for(marked, timeout=60)
    assert query(db.dsn, "SELECT count(*) FROM pgbench_history")[0][0] > 0  # work was done
    for table in PGBENCH_TABLES:
        _same_as_source(src, db.dsn, table)


# ---- 4. source crash ----------------------------------------------------------------------------

@pytest.mark.slow
def test_postgres_crash_while_streaming_loses_and_duplicates_nothing(
        make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(timezone="America/New_York")
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int, at timestamptz DEFAULT now());"
                     " INSERT INTO t SELECT g, 0 FROM generate_series(1, 20) g")
    src = source_for(dsn, tmp_path, ["t"], table_mode="both", flush_interval_ms=50)
    state = _setup(src, tmp_path)

    def bump(n: int) -> None:  # n one-row transactions, each v = v + 1
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(n):
                conn.execute("UPDATE t SET v = v + 1, at = now() WHERE id = %s", [i % 20 + 1])

    def applied() -> int:
        return sum(_delta(src, "t")["v"].to_pylist())

    crashed = Running(src, state)
    crashed.thread.start()
    wait_for(lambda: len(live_rows(src, "t")) == 20)
    bump(100)
    wait_for(lambda: applied() >= 50)
    bump(100)  # still being streamed when the server goes down
    cluster.stop(mode="immediate")
    crashed.thread.join(60)
    # connection loss is retryable; the slot's confirmed position may now be behind Delta
    assert isinstance(crashed.error, CDCError) and crashed.error.retryable
    # the run's writer thread never outlives it (see the test below)
    assert not any(t.name == f"writer-{src.name}" for t in threading.enumerate())
    cluster.start()
    bump(60)
    with Running(src, state):
        wait_for(lambda: applied() == 260, timeout=60)
    _same_as_source(src, dsn, "t")
    log = sorted(_delta(src, "t", "append").to_pylist(),
                 key=lambda r: (r["_cdc_lsn"], r["_cdc_seq"]))
    assert len({(r["_cdc_lsn"], r["_cdc_seq"]) for r in log}) == len(log) == 20 + 260
    by_key: dict[int, list[Any]] = {}
    for r in log:
        by_key.setdefault(r["id"], []).append(r["v"])
    # each key's changes in (_cdc_lsn, _cdc_seq) order: 0, 1, 2, ... (none twice, none lost)
    assert all(vs == list(range(len(vs))) for vs in by_key.values())


@pytest.mark.slow
def test_run_that_lost_the_source_leaves_no_commit_behind(
        make_cluster: MakeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = make_cluster()
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    src = source_for(dsn, tmp_path, ["t"], table_mode="append", max_batch_rows=1)
    state = _setup(src, tmp_path)
    slow = threading.Event()
    write_append = DeltaSink.write_append

    def slow_append(self: DeltaSink, *args: Any, **kw: Any) -> Any:
        if slow.is_set():
            time.sleep(1.5)
        return write_append(self, *args, **kw)

    monkeypatch.setattr(DeltaSink, "write_append", slow_append)
    first = Running(src, state)
    first.thread.start()
    wait_for(lambda: _applied(src) is not None)
    slow.set()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1, 0)")  # batch 1: being committed (slowly)
        time.sleep(0.3)
        conn.execute("INSERT INTO t VALUES (2, 0)")  # batch 2: queued for the writer
        time.sleep(0.15)
    cluster.stop(mode="immediate")
    first.thread.join(60)
    assert isinstance(first.error, CDCError) and first.error.retryable
    returned_at = _applied(src)
    time.sleep(2.5)
    # nothing of a finished run may still be committing: a new run (the daemon retries at once)
    # reads the applied versions now, replays batch 2 cut differently and duplicates it
    assert _applied(src) == returned_at

"""`resync`: re-snapshot one table while the source streams; the swap is one Delta commit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from cdc_util import query, source_for, store
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.errors import ConfigError
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine.state.base import TableState


def _delta_version(src, ref: TableRef, kind: str) -> int:
    return DeltaSink(src.destination, source=src.name).table_info(ref, kind).version or 0


def test_resync_under_a_running_workload_is_exact(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE r (id int PRIMARY KEY, v int); CREATE TABLE o (id int PRIMARY KEY);"
               "INSERT INTO r SELECT i, i FROM generate_series(1, 2000) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["r", "o"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    ref = TableRef("public", "r")
    sink = DeltaSink(src.destination, source=src.name)
    with pytest.raises(ConfigError):
        api.resync_table(src, "nope", state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "r")) == 2000)
        # Delta drifts from the source behind the engine's back (what resync is for)
        sink_dt = sink.read_table(ref, "consolidated")
        assert sink_dt.num_rows == 2000
        stop = threading.Event()

        def workload() -> None:
            i = 0
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                while not stop.is_set():
                    i += 1
                    conn.execute("UPDATE r SET v = v + 1 WHERE id = %s", (i % 2000 + 1,))
                    conn.execute("INSERT INTO o VALUES (%s)", (i,))
                    if i % 7 == 0:
                        conn.execute("DELETE FROM r WHERE id = %s", (i % 2000 + 1,))
                    time.sleep(0.005)

        worker = threading.Thread(target=workload, daemon=True)
        worker.start()
        time.sleep(1)
        before = _delta_version(src, ref, "consolidated")
        res = api.resync_table(src, "r", state=state)
        assert res.queued and res.daemon_running
        wait_for(lambda: {t.name: t for t in store(tmp_path).list_tables(src.name)}
                 ["public.r"].state is TableState.STREAMING
                 and sink.applied_version(ref, "consolidated") is not None
                 and _resync_commits(src, ref) > 0, timeout=60)
        time.sleep(1)
        stop.set()
        worker.join()
        n_source = query(db.dsn, "SELECT count(*) FROM r")[0][0]
        n_o = query(db.dsn, "SELECT count(*) FROM o")[0][0]
        wait_for(lambda: len(live_rows(src, "r")) == n_source
                 and len(live_rows(src, "o")) == n_o, timeout=60)
    assert before < _delta_version(src, ref, "consolidated")
    rows = live_rows(src, "r")
    assert {k: r["v"] for k, r in rows.items()} == dict(query(db.dsn, "SELECT id, v FROM r"))
    log = sink.read_table(ref, "append").to_pylist()
    keys = [(r["_cdc_lsn"], r["_cdc_seq"]) for r in log]
    assert len(keys) == len(set(keys))
    # one commit per Delta table: no reader ever saw a half-loaded table
    assert _resync_commits(src, ref) == 1 and _resync_commits(src, ref, "append") == 1
    first = min(r["_cdc_lsn"] for r in log)
    assert any(r["_cdc_op"] == "R" and r["_cdc_lsn"] > first for r in log)
    assert any(r["_cdc_op"] == "D" for r in log)


def _resync_commits(src, ref: TableRef, kind: str = "consolidated") -> int:
    """How many commits the resync's swap took in one Delta table."""
    from deltalake import DeltaTable

    dt = DeltaTable(DeltaSink(src.destination, source=src.name).path(ref, kind))
    return sum(1 for e in dt.history() if e.get("cdcengine.operation") == "resync")


def test_resync_without_a_daemon_runs_at_the_next_start(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE r (id int PRIMARY KEY, v text);"
               "INSERT INTO r SELECT i, 'v' || i FROM generate_series(1, 100) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["r"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "r")) == 100)
    # rows change without reaching Delta's copy the normal way: an incompatible ALTER stops it
    db.execute("ALTER TABLE r ALTER COLUMN v TYPE int USING length(v)")
    db.execute("DELETE FROM r WHERE id <= 10; INSERT INTO r VALUES (101, 7)")
    with Running(src, state):
        wait_for(lambda: {t.name: t.state for t in store(tmp_path).list_tables(src.name)}
                 ["public.r"] is TableState.STOPPED)
    res = api.resync_table(src, "public.r", state=state)
    assert not res.daemon_running
    assert {t.name: t.state for t in store(tmp_path).list_tables(src.name)}["public.r"] \
        is TableState.PENDING
    with Running(src, state):
        wait_for(lambda: {t.name: t.state for t in store(tmp_path).list_tables(src.name)}
                 ["public.r"] is TableState.STREAMING, timeout=60)
        db.execute("UPDATE r SET v = 1000 WHERE id = 50")
        wait_for(lambda: live_rows(src, "r").get(50, {}).get("v") == 1000)
    rows = live_rows(src, "r")
    assert {k: r["v"] for k, r in rows.items()} == dict(query(db.dsn, "SELECT id, v FROM r"))


def test_resync_replaces_a_table_whose_schema_another_writer_replaced(db, tmp_path: Path) -> None:
    """Someone overwrote the consolidated Delta table with a schema of their own (issue 13):
    `resync` replaces it by the re-snapshot in one commit (the engine's columns back, theirs
    gone) instead of looping on a DeltaError while adding columns to their table."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); "
               "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "t")) == 10)
    path = DeltaSink(src.destination, source=src.name).path(TableRef.parse("t"),
                                                            "consolidated")
    other = pa.table({"something": pa.array(["else"]), "n": pa.array([1], pa.int64())})
    write_deltalake(path, other, mode="overwrite", schema_mode="overwrite")
    db.execute("UPDATE t SET v = 'changed' WHERE id = 1")
    api.resync_table(src, "public.t", state=state)
    def rows() -> dict[object, dict[str, object]]:
        try:
            return live_rows(src, "t")
        except KeyError:  # still the other writer's table
            return {}

    with Running(src, state) as running:
        wait_for(lambda: rows().get(1, {}).get("v") == "changed" and len(rows()) == 10,
                 timeout=60)
        db.execute("INSERT INTO t VALUES (11, 'after')")
        wait_for(lambda: len(rows()) == 11, timeout=60)
        assert running.error is None
    names = DeltaTable(path).schema().to_arrow().names
    assert "something" not in names and {"id", "v", "_cdc_lsn", "_cdc_deleted"} <= set(names)

"""End to end: snapshot, then streaming into consolidated Delta tables, exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from cdc_util import query, source_for, store
from deltalake import DeltaTable

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef
from cdcengine.pipeline.pipeline import Pipeline
from cdcengine.sink.delta import DeltaSink
from cdcengine.state.base import SourceState, TableState


def live_rows(src: SourceConfig, table: str) -> dict[object, dict[str, object]]:
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef.parse(table)
    if sink.applied_version(ref, "consolidated") is None:
        return {}
    rows = sink.read_table(ref, "consolidated").to_pylist()
    return {r["id"]: r for r in rows if not r["_cdc_deleted"]}


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


class Running:
    def __init__(self, src: SourceConfig, state: str) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.pipeline = Pipeline(src, state=state)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.pipeline.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_snapshot_then_stream_into_consolidated_delta(db, tmp_path: Path) -> None:
    # EXTERNAL: stored out of line uncompressed, so an update of another column really sends
    # it as an unchanged TOAST value (a compressible value would stay inline)
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric(12,2), note text,"
               " big text); ALTER TABLE orders ALTER COLUMN big SET STORAGE EXTERNAL;"
               "INSERT INTO orders SELECT i, i * 1.5, 'n' || i, NULL"
               " FROM generate_series(1, 100) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["orders"], flush_interval_ms=200)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "orders")) == 100)
        big = "x" * 96_000
        db.execute("INSERT INTO orders VALUES (101, 1, 'new', NULL);"
                   "UPDATE orders SET note = 'changed' WHERE id = 5;"
                   "DELETE FROM orders WHERE id = 6;"
                   f"UPDATE orders SET big = '{big}' WHERE id = 7")
        db.execute("UPDATE orders SET note = 'touched' WHERE id = 7")  # big is unchanged TOAST
        db.execute("BEGIN; UPDATE orders SET id = 1000 WHERE id = 8; COMMIT")
        wait_for(lambda: 1000 in live_rows(src, "orders")
                 and live_rows(src, "orders")[7]["note"] == "touched")
    rows = live_rows(src, "orders")
    assert len(rows) == 100  # +101, -6, 8 -> 1000
    assert rows[5]["note"] == "changed"
    assert 6 not in rows and 8 not in rows
    assert rows[7]["big"] == "x" * 96_000  # never nulled by the unchanged-TOAST update
    assert str(rows[101]["total"]) == "1.00"
    source_rows = {r[0]: r for r in query(db.dsn, "SELECT id, note FROM orders")}
    assert {k: v["note"] for k, v in rows.items()} == {k: v[1] for k, v in source_rows.items()}
    status = api.cdc_status(src, state=state)
    assert status.state == str(SourceState.STREAMING)
    assert {t.state for t in status.tables} == {str(TableState.STREAMING)}
    (orders,) = status.tables
    applied = DeltaSink(src.destination, source=src.name).applied_version(
        TableRef("public", "orders"), "consolidated")
    assert orders.rows == 100
    assert orders.applied_lsn == format_lsn(applied)  # type: ignore[arg-type]
    assert [(d.kind, d.exists, d.rows) for d in orders.delta] == [("consolidated", True, 100)]


def test_restart_applies_nothing_twice_and_idle_slot_advances(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v int); CREATE TABLE other (x int)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        db.execute("INSERT INTO t SELECT i, i FROM generate_series(1, 50) i")
        wait_for(lambda: len(live_rows(src, "t")) == 50)
    sink = DeltaSink(src.destination, source=src.name)
    version = sink.applied_version(TableRef("public", "t"), "consolidated")
    rows_before = len(sink.read_table(TableRef("public", "t"), "consolidated"))
    # writes elsewhere while stopped, then a restart: the slot advances past unrelated WAL and
    # nothing is written twice
    db.execute("INSERT INTO other SELECT generate_series(1, 1000)")
    with Running(src, state):
        db.execute("UPDATE t SET v = -1 WHERE id = 1")
        wait_for(lambda: live_rows(src, "t")[1]["v"] == -1)
        current = query(db.dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
        wait_for(lambda: query(db.dsn, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM "
                                        "pg_replication_slots WHERE slot_name = %s",
                               [current, src.slot_name])[0][0], timeout=30)
    assert len(sink.read_table(TableRef("public", "t"), "consolidated")) == rows_before
    assert sink.applied_version(TableRef("public", "t"), "consolidated") > version  # type: ignore[operator]


def test_truncate_is_applied_at_its_lsn(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY);"
               "INSERT INTO a VALUES (1, 'snap'), (2, 'snap')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        db.execute("INSERT INTO a VALUES (3, 'x'); INSERT INTO b VALUES (1)")
        wait_for(lambda: len(live_rows(src, "a")) == 3 and len(live_rows(src, "b")) == 1)
        # in one transaction: a change before the TRUNCATE (gone) and after it (kept)
        db.execute("BEGIN; UPDATE a SET v = 'lost' WHERE id = 1; TRUNCATE a, b;"
                   "INSERT INTO a VALUES (2, 'again'); COMMIT")
        db.execute("INSERT INTO a VALUES (4, 'after'); INSERT INTO b VALUES (2)")
        wait_for(lambda: set(live_rows(src, "a")) == {2, 4} and set(live_rows(src, "b")) == {2})
    rows = live_rows(src, "a")
    assert rows[2]["v"] == "again" and rows[4]["v"] == "after"
    tables = {t.name: t for t in store(tmp_path).list_tables(src.name)}
    assert {t.state for t in tables.values()} == {TableState.STREAMING}
    sink = DeltaSink(src.destination, source=src.name)
    gone = {r["id"]: r for r in sink.read_table(TableRef("public", "a"), "consolidated")
            .to_pylist() if r["_cdc_deleted"]}
    assert set(gone) == {1, 3} and gone[1]["v"] == "snap"
    log = sink.read_table(TableRef("public", "a"), "append").sort_by(
        [("_cdc_lsn", "ascending"), ("_cdc_seq", "ascending")]).to_pylist()
    assert [(r["_cdc_op"], r["id"]) for r in log][-4:] == [
        ("U", 1), ("T", None), ("I", 2), ("I", 4)]
    source_rows = {r[0]: r[1] for r in query(db.dsn, "SELECT id, v FROM a")}
    assert {k: v["v"] for k, v in rows.items()} == source_rows


@pytest.mark.slow
def test_source_identity_change_marks_broken(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t"])
    api.enable_cdc(src, state=state)
    st = store(tmp_path)
    rec = st.get_source(src.name)
    assert rec is not None
    # pretend enable happened against another cluster
    st.record_enabled(src.name, management_mode="managed", slot_name=src.slot_name,
                      publication_name=src.publication_name, consistent_point=None,
                      system_identifier="1", timeline=1, tables={"public.t": "consolidated"})
    with pytest.raises(CDCError) as info:
        Pipeline(src, state=state).run(threading.Event())
    assert info.value.reason is Reason.SOURCE_CHANGED
    broken = store(tmp_path).get_source(src.name)
    assert broken is not None and broken.broken is not None
    assert broken.broken.reason == "source_changed"


def test_both_mode_writes_the_change_log_too(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE e (id int PRIMARY KEY, v text); INSERT INTO e VALUES (1, 'a')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["e"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "e")) == {1})  # snapshot loaded first
        db.execute("INSERT INTO e VALUES (2, 'b'); UPDATE e SET v = 'c' WHERE id = 1")
        db.execute("DELETE FROM e WHERE id = 2")
        # (the set alone was {1} already before the changes arrived)
        wait_for(lambda: live_rows(src, "e").keys() == {1}
                 and live_rows(src, "e")[1]["v"] == "c")
    log = DeltaSink(src.destination, source=src.name).read_table(TableRef("public", "e"),
                                                                   "append")
    ops = sorted(zip(log["_cdc_lsn"].to_pylist(), log["_cdc_seq"].to_pylist(),
                     log["_cdc_op"].to_pylist(), log["id"].to_pylist(), strict=True))
    assert [o[2:] for o in ops] == [("R", 1), ("I", 2), ("U", 1), ("D", 2)]
    assert len({(o[0], o[1]) for o in ops}) == len(ops)  # (_cdc_lsn, _cdc_seq) unique


def test_tables_are_kept_healthy_while_streaming(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE m (id int PRIMARY KEY, v int)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["m"], flush_interval_ms=50, maintenance_interval_s=1)
    api.enable_cdc(src, state=state)
    ref = TableRef("public", "m")
    sink = DeltaSink(src.destination, source=src.name)
    with Running(src, state):
        for i in range(30):  # many small commits: many small files
            db.execute(f"INSERT INTO m VALUES ({i}, {i})")
            time.sleep(0.1)
        wait_for(lambda: len(live_rows(src, "m")) == 30)
    log_dir = Path(sink.path(ref, "consolidated")) / "_delta_log"
    assert list(log_dir.glob("*.checkpoint.parquet"))
    dt = DeltaTable(sink.path(ref, "consolidated"))
    assert "OPTIMIZE" in {h.get("operation") for h in dt.history()}
    assert len(dt.file_uris()) < 10  # compacted, not one file per commit
    assert sink.applied_version(ref, "consolidated") is not None
    assert len(live_rows(src, "m")) == 30


@pytest.mark.slow
def test_an_invalidated_slot_breaks_the_source(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster({"max_slot_wal_keep_size": "1MB"})
    dsn = cluster.dsn()

    def run(sql: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)

    run("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = SourceConfig(name="inval", dsn=dsn, tables=["t"], destination=str(tmp_path / "lake"))
    api.enable_cdc(src, state=state)
    # WAL far beyond max_slot_wal_keep_size while nothing reads the slot, then a checkpoint
    for i in range(4):
        run(f"INSERT INTO t SELECT g + {i * 1000}, repeat('x', 500) "
            "FROM generate_series(1, 1000) g")
        query(dsn, "SELECT pg_switch_wal()")
    run("CHECKPOINT")
    assert query(dsn, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                 [src.slot_name])[0][0] == "lost"
    with pytest.raises(CDCError) as info:
        Pipeline(src, state=state).run(threading.Event())
    assert info.value.reason is Reason.SLOT_INVALIDATED
    assert not info.value.retryable
    status = api.cdc_status(src, state=state)
    assert status.state == "broken"
    assert status.broken is not None and status.broken.reason == "slot_invalidated"


def test_a_burst_is_written_when_the_source_goes_quiet_a_trickle_waits_for_the_interval(
        db, tmp_path: Path) -> None:
    """Idle flush: once the source is quiet, many waiting rows (>= max_batch_rows / 20) are
    written at once with the writer free, not after the flush interval; a single small
    transaction still waits for the interval (one Delta commit per transaction would cost
    files and requests)."""
    db.execute("CREATE TABLE burst (id int PRIMARY KEY, v text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["burst"], flush_interval_ms=20_000, max_batch_rows=2000)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: api.cdc_status(src, state=state).tables[0].state == "streaming")
        t0 = time.monotonic()
        db.execute("INSERT INTO burst SELECT g, 'x' FROM generate_series(1, 500) g")
        wait_for(lambda: len(live_rows(src, "burst")) == 500, timeout=15)
        assert time.monotonic() - t0 < 15  # far below the 20 s flush interval
        db.execute("INSERT INTO burst VALUES (501, 'trickle')")  # 1 row < 2000 / 20
        time.sleep(3)
        assert len(live_rows(src, "burst")) == 500

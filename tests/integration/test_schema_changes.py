"""ALTER TABLE while streaming: added, dropped, widened and incompatibly changed columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from cdc_util import query, source_for, store
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine.state.base import TableState


def test_columns_added_dropped_and_widened_while_streaming(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE s (id int PRIMARY KEY, n int, gone text, price numeric(6,2));"
               "INSERT INTO s VALUES (1, 1, 'g1', 1.50), (2, 2, 'g2', 2.50)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["s"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef("public", "s")
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "s")) == {1, 2})
        db.execute("INSERT INTO s VALUES (3, 3, 'g3', 3.25)")
        db.execute("ALTER TABLE s ADD COLUMN extra text")
        db.execute("INSERT INTO s VALUES (4, 4, 'g4', 4.00, 'e4'); UPDATE s SET extra = 'e1' "
                   "WHERE id = 1")
        db.execute("ALTER TABLE s DROP COLUMN gone")
        db.execute("UPDATE s SET n = 20 WHERE id = 2")
        db.execute("ALTER TABLE s ALTER COLUMN n TYPE bigint")
        db.execute("ALTER TABLE s ALTER COLUMN price TYPE numeric(12,3)")
        db.execute("INSERT INTO s VALUES (5, 5000000000, 5.125, 'e5')")
        wait_for(lambda: set(live_rows(src, "s")) == {1, 2, 3, 4, 5})
    rows = live_rows(src, "s")
    assert rows[5]["n"] == 5_000_000_000  # int4 -> int8 widened, not truncated
    assert str(rows[5]["price"]) == "5.125" and str(rows[1]["price"]) == "1.500"
    assert rows[4]["extra"] == "e4" and rows[1]["extra"] == "e1" and rows[3]["extra"] is None
    assert rows[2]["gone"] is None  # dropped at the source: null once the row changes
    assert rows[3]["gone"] == "g3"  # untouched rows keep their last value
    dt = sink.table_info(ref, "consolidated")
    assert dt.applied_version is not None
    schema = pa.schema(sink.read_table(ref, "consolidated").schema)
    assert schema.field("n").type == pa.int64()
    assert schema.field("price").type == pa.decimal128(12, 3)
    log = sink.read_table(ref, "append")
    assert log.schema.field("n").type == pa.int64()
    source = {r[0]: r for r in query(db.dsn, "SELECT id, n, extra FROM s")}
    assert {k: (v["id"], v["n"], v["extra"]) for k, v in rows.items()} == source
    tables = store(tmp_path).list_tables(src.name)
    assert {t.state for t in tables} == {TableState.STREAMING}


def test_an_incompatible_type_change_stops_only_that_table(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY);"
               "INSERT INTO a VALUES (1, '10')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "a")) == {1})
        db.execute("ALTER TABLE a ALTER COLUMN v TYPE int USING v::int")
        db.execute("INSERT INTO a VALUES (2, 20)")
        db.execute("INSERT INTO b VALUES (1)")
        wait_for(lambda: set(live_rows(src, "b")) == {1})
        db.execute("INSERT INTO b VALUES (2)")
        wait_for(lambda: set(live_rows(src, "b")) == {1, 2})
    tables = {t.name: t for t in store(tmp_path).list_tables(src.name)}
    assert tables["public.a"].state is TableState.STOPPED
    assert "schema_incompatible" in (tables["public.a"].reason or "")
    assert tables["public.a"].remedy == "resync the table"
    assert tables["public.b"].state is TableState.STREAMING
    assert set(live_rows(src, "a")) == {1}

"""ADD COLUMN … DEFAULT while streaming: rows that existed before get the default in Delta
(constant default), or the table stops for a resync (volatile default: the table was
rewritten without WAL)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

from cdc_util import query, source_for, store
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine.state.base import TableState
from cdcengine_postgres.adapter import PostgresAdapter


def test_adapter_tells_fast_from_rewritten_defaults(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE d (id int PRIMARY KEY); INSERT INTO d VALUES (1);"
               "ALTER TABLE d ADD COLUMN plain text, ADD COLUMN k int DEFAULT 7,"
               " ADD COLUMN day date DEFAULT '2024-02-29', ADD COLUMN ok bool DEFAULT true,"
               " ADD COLUMN amount numeric(8,2) DEFAULT 12.5;"
               "CREATE TABLE v (id int PRIMARY KEY); INSERT INTO v VALUES (1);"
               "ALTER TABLE v ADD COLUMN r float8 DEFAULT random()")
    src = source_for(db.dsn, tmp_path, ["d"])
    found = PostgresAdapter().added_column_defaults(
        src, TableRef("public", "d"), ["plain", "k", "day", "ok", "amount", "nope"])
    assert found["plain"].kind == "none"
    assert found["k"].kind == "fast" and found["k"].value.as_py() == 7
    assert found["day"].value.as_py() == date(2024, 2, 29)
    assert found["ok"].value.as_py() is True
    assert found["amount"].value.as_py() == Decimal("12.50")
    assert "nope" not in found
    # a rewrite (volatile default) gives each row its own value: only a resync is exact
    volatile = PostgresAdapter().added_column_defaults(src, TableRef("public", "v"), ["r"])
    assert volatile["r"].kind == "rewritten"


def test_added_column_with_constant_default_is_backfilled(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE s (id int PRIMARY KEY, n int);"
               "INSERT INTO s SELECT i, i FROM generate_series(1, 50) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["s"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "s")) == 50)
        # one transaction before the ALTER lands in the same batch as the rows after it
        db.execute("UPDATE s SET n = -1 WHERE id = 1")
        db.execute("ALTER TABLE s ADD COLUMN kind text NOT NULL DEFAULT 'old',"
                   " ADD COLUMN v int DEFAULT 5, ADD COLUMN note text")
        db.execute("INSERT INTO s (id, n, kind, v) VALUES (51, 51, 'new', NULL);"
                   "UPDATE s SET kind = 'changed' WHERE id = 2")
        wait_for(lambda: len(live_rows(src, "s")) == 51)
    rows = live_rows(src, "s")
    source = {r[0]: r for r in query(db.dsn, "SELECT id, n, kind, v, note FROM s")}
    assert {k: (r["id"], r["n"], r["kind"], r["v"], r["note"]) for k, r in rows.items()} \
        == source
    assert rows[3]["kind"] == "old" and rows[3]["v"] == 5 and rows[51]["v"] is None
    # a restart replays nothing twice and changes nothing
    with Running(src, state):
        db.execute("INSERT INTO s (id, n) VALUES (52, 52)")
        wait_for(lambda: len(live_rows(src, "s")) == 52)
    assert live_rows(src, "s")[4]["kind"] == "old"
    assert {t.state for t in store(tmp_path).list_tables(src.name)} == {TableState.STREAMING}


def test_backfill_survives_a_restart_before_the_first_change(db, tmp_path: Path) -> None:
    """The ALTER and the first row under the new shape arrive in a run that never committed
    them: the next run no longer sees a shape change, and still backfills."""
    db.execute("CREATE TABLE s (id int PRIMARY KEY, n int);"
               "INSERT INTO s SELECT i, i FROM generate_series(1, 5) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["s"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "s")) == 5)
    db.execute("ALTER TABLE s ADD COLUMN kind text DEFAULT 'old'")
    db.execute("INSERT INTO s VALUES (6, 6, 'new')")
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "s")) == 6)
    rows = live_rows(src, "s")
    assert rows[1]["kind"] == "old" and rows[6]["kind"] == "new"


def test_added_column_with_volatile_default_stops_the_table(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);"
               "INSERT INTO a VALUES (1), (2)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "a")) == {1, 2})
        db.execute("ALTER TABLE a ADD COLUMN r float8 DEFAULT random()")
        db.execute("INSERT INTO a (id) VALUES (3); INSERT INTO b VALUES (1)")
        wait_for(lambda: set(live_rows(src, "b")) == {1})
        wait_for(lambda: {t.name: t.state for t in store(tmp_path).list_tables(src.name)}
                 ["public.a"] is TableState.STOPPED)
    tables = {t.name: t for t in store(tmp_path).list_tables(src.name)}
    assert "schema_incompatible" in (tables["public.a"].reason or "")
    assert tables["public.a"].remedy == "resync the table"
    assert tables["public.b"].state is TableState.STREAMING
    sink = DeltaSink(src.destination, source=src.name)
    assert "r" not in (sink.data_columns(TableRef("public", "a"), "consolidated") or ())

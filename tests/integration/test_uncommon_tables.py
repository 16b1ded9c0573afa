"""Tables off the common shape, end to end against a real server (issue 12, defects 1 and 2).

- REPLICA IDENTITY FULL on a table with a primary key: pgoutput flags *every* column as part of
  the identity, but rows are keyed on the primary key (or the declared `primary_key`): an update
  of a non-key column is an update, not a delete plus an insert; an unchanged TOASTed value is
  taken from the complete old row FULL sends; NULLs anywhere in the row merge fine.
- An array-typed key is refused at `check`/`enable` with the fix (never accepted, then stopped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cdc_util import by_name, one, query, slot_exists, source_for
from test_columns_and_keys import live, source_rows
from test_pipeline import Running, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import PrerequisitesFailed
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine.source.adapter import Severity
from cdcengine.state.base import TableState

BIG = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)"  # 12.8 kB: TOASTed


def _log(src: SourceConfig, table: str) -> list[dict[str, Any]]:
    sink = DeltaSink(src.destination, source=src.name)
    rows = sink.read_table(TableRef.parse(table), "append").to_pylist()
    return sorted(rows, key=lambda r: (r["_cdc_lsn"], r["_cdc_seq"]))


def _all_rows(src: SourceConfig, table: str) -> list[dict[str, Any]]:
    sink = DeltaSink(src.destination, source=src.name)
    return sink.read_table(TableRef.parse(table), "consolidated").to_pylist()


def _table_states(src: SourceConfig, state: str) -> dict[str, str]:
    with api.open_store(state) as store:
        return {t.name: str(t.state) for t in store.list_tables(src.name)}


def _in_sync(src: SourceConfig, db: Any, table: str, columns: list[str],
             key: list[str]) -> bool:
    return live(src, table, key) == source_rows(db.dsn, table, columns, key)


def test_replica_identity_full_with_a_primary_key_is_keyed_on_the_primary_key(
        db: Any, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, n int, big text, tags text[]);"
               "ALTER TABLE t REPLICA IDENTITY FULL;"
               f"INSERT INTO t VALUES (1, 10, {BIG}, NULL), (2, 10, 'short', NULL),"
               f" (3, 10, 'x', (SELECT array_agg(md5(i::text)) FROM generate_series(1, 500) i));"
               "CREATE TABLE other (id int PRIMARY KEY, v text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t", "other"], table_mode="both",
                     flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    cols = ["id", "n", "big", "tags"]
    with Running(src, state):
        wait_for(lambda: len(live(src, "public.t", ["id"])) == 3)
        # non-key updates: of a row with a TOASTed text, a short one, a TOASTed array
        db.execute("UPDATE t SET n = 20")
        # a row with several NULLs (and a masked value) merges
        db.execute("INSERT INTO t VALUES (4, NULL, NULL, NULL)")
        db.execute("UPDATE t SET n = 30 WHERE id = 4")
        db.execute("INSERT INTO other VALUES (1, 'still streaming')")
        db.execute("DELETE FROM t WHERE id = 2")
        wait_for(lambda: _in_sync(src, db, "public.t", cols, ["id"])
                 and len(live(src, "public.other", ["id"])) == 1, timeout=60)
    assert _table_states(src, state)["public.t"] == str(TableState.STREAMING)
    rows = _all_rows(src, "public.t")
    ids = [r["id"] for r in rows]
    assert sorted(ids) == [1, 2, 3, 4], "one row per primary key (2 soft-deleted)"
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["big"] == query(db.dsn, f"SELECT {BIG}")[0][0]  # not nulled
    assert len(by_id[3]["tags"]) == 500
    assert by_id[2]["_cdc_deleted"] and not by_id[1]["_cdc_deleted"]
    ops = [(r["id"], r["_cdc_op"]) for r in _log(src, "public.t") if r["_cdc_op"] != "R"]
    assert ops == [(1, "U"), (2, "U"), (3, "U"), (4, "I"), (4, "U"), (2, "D")]
    # the change log's update rows carry the complete new row, TOASTed values included
    updates = {r["id"]: r for r in _log(src, "public.t") if r["_cdc_op"] == "U"}
    assert updates[1]["big"] == by_id[1]["big"] and updates[1]["n"] == 20
    assert len(updates[3]["tags"]) == 500


def test_replica_identity_full_with_a_declared_key_and_nulls(db: Any, tmp_path: Path) -> None:
    """The issue's reproducer: `INSERT (2, NULL, NULL)` into a FULL table with a primary key
    failed the MERGE and stalled every table of the source; here also with 'infinity' dates,
    which are masked to NULL, and a declared key."""
    db.execute("CREATE TABLE t (pk int PRIMARY KEY, x text, y text, d date);"
               "ALTER TABLE t REPLICA IDENTITY FULL;"
               "CREATE TABLE u (a int NOT NULL, b int NOT NULL, x text, y text);"
               "CREATE UNIQUE INDEX ON u (a, b); ALTER TABLE u REPLICA IDENTITY FULL;"
               "INSERT INTO t VALUES (1, 'a', 'b', '2020-01-01')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t", "u"], flush_interval_ms=100,
                     table={"public.u": {"primary_key": ["a", "b"]}})
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live(src, "public.t", ["pk"])) == 1)
        db.execute("INSERT INTO t VALUES (2, NULL, NULL, 'infinity')")
        db.execute("UPDATE t SET x = 'now set' WHERE pk = 2")
        db.execute("INSERT INTO u VALUES (1, 1, NULL, NULL), (1, 2, 'v', NULL)")
        db.execute("UPDATE u SET y = 'w' WHERE a = 1 AND b = 1")
        wait_for(lambda: len(live(src, "public.u", ["a", "b"])) == 2
                 and live(src, "public.t", ["pk"]).get((2,), {}).get("x") == "now set"
                 and live(src, "public.u", ["a", "b"])[(1, 1)]["y"] == "w", timeout=60)
    assert set(_table_states(src, state).values()) == {str(TableState.STREAMING)}
    assert sorted(r["pk"] for r in _all_rows(src, "public.t")) == [1, 2]
    assert sorted((r["a"], r["b"]) for r in _all_rows(src, "public.u")) == [(1, 1), (1, 2)]


def test_an_array_typed_key_is_refused_at_check_and_enable_with_the_fix(
        db: Any, tmp_path: Path) -> None:
    """Rows cannot be grouped, looked up or merged on array values: `check` and `tables` say so
    with the fix, `enable` refuses and creates nothing (before: accepted, snapshotted, then the
    table stopped at its first streamed change with `resync` as the remedy, which cannot help)."""
    db.execute("CREATE TABLE t (a int[] PRIMARY KEY, b text);"
               "INSERT INTO t VALUES ('{1,2}', 'x');"
               "CREATE TABLE ok (id int PRIMARY KEY, tags int[])")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t", "ok"])
    checks = api.check_prerequisites(src)
    bad = one(checks, "key_type", "public.t")
    assert bad.severity is Severity.ERROR
    assert "a (integer[])" in bad.message and "array" in bad.message
    assert "primary_key" in bad.fix and "REPLICA IDENTITY USING INDEX" in bad.fix
    assert not by_name(checks, "key_type", "public.ok")  # arrays elsewhere are fine
    info = {t.qualified: t for t in api.discover_tables(src)}
    assert not info["public.t"].capturable
    assert any("array" in r for r in info["public.t"].reasons)
    assert info["public.ok"].capturable
    with pytest.raises(PrerequisitesFailed, match="key_type"):
        api.enable_cdc(src, state=state)
    assert not slot_exists(db.dsn, src.slot_name)
    # with a scalar key declared (the fix), the same table is captured
    db.execute("ALTER TABLE t ADD COLUMN row_id bigint GENERATED ALWAYS AS IDENTITY;"
               "CREATE UNIQUE INDEX t_row_id ON t (row_id);"
               "ALTER TABLE t REPLICA IDENTITY USING INDEX t_row_id")
    src = source_for(db.dsn, tmp_path, ["t"], flush_interval_ms=100,
                     table={"public.t": {"primary_key": ["row_id"]}})
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live(src, "public.t", ["row_id"])) == 1)
        db.execute("INSERT INTO t (a, b) VALUES ('{3}', 'y'); UPDATE t SET a = '{4}', b = 'z' "
                   "WHERE b = 'x'")
        wait_for(lambda: sorted((tuple(r["a"]), r["b"]) for r in
                                live(src, "public.t", ["row_id"]).values())
                 == [((3,), "y"), ((4,), "z")], timeout=60)


def test_a_table_whose_rows_the_destination_refuses_stops_alone(db: Any, tmp_path: Path) -> None:
    """One table's deterministic failure (its consolidated Delta table carries a CHECK
    constraint the new rows violate) stops that table with its reason and remedy after a few
    retries; the other table streams on and the slot advances past the refused transaction.
    After the constraint is lifted, a resync loads the table exactly. (Before: the MERGE failed,
    the source retried forever and every table of the source stalled.)"""
    from deltalake import DeltaTable

    db.execute("CREATE TABLE a (id int PRIMARY KEY, n int); CREATE TABLE b (id int PRIMARY KEY);"
               "INSERT INTO a VALUES (1, 1)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    sink = DeltaSink(src.destination, source=src.name)
    path = sink.path(TableRef.parse("a"), "consolidated")
    with Running(src, state) as running:
        wait_for(lambda: len(live(src, "public.a", ["id"])) == 1)
        DeltaTable(path).alter.add_constraint({"n_positive": "n > 0"})
        db.execute("INSERT INTO a VALUES (2, -1); INSERT INTO b VALUES (1)")
        wait_for(lambda: _table_states(src, state).get("public.a") == str(TableState.STOPPED),
                 timeout=60)
        db.execute("INSERT INTO b VALUES (2); INSERT INTO a VALUES (3, 3)")
        wait_for(lambda: set(live(src, "public.b", ["id"])) == {(1,), (2,)}, timeout=60)
        assert running.error is None
        # the slot moved past the refused transaction: the others are not held back by it
        lsn = query(db.dsn, "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM "
                            "pg_replication_slots WHERE slot_name = %s", [src.slot_name])[0][0]
        assert lsn < 64 * 1024
    with api.open_store(state) as store:
        rec = next(t for t in store.list_tables(src.name) if t.name == "public.a")
    assert rec.reason is not None and rec.reason.startswith("table_write_failed")
    assert "failed validation check" in rec.reason  # the destination's own words
    assert rec.remedy is not None and "cdcengine resync" in rec.remedy
    assert set(live(src, "public.a", ["id"])) == {(1,)}  # nothing half-applied
    # lift the constraint, resync: the table is exact again, and streams on
    DeltaTable(path).alter.drop_constraint("n_positive")
    api.resync_table(src, "public.a", state=state)
    with Running(src, state):
        wait_for(lambda: _in_sync(src, db, "public.a", ["id", "n"], ["id"]), timeout=60)
        db.execute("UPDATE a SET n = 5 WHERE id = 1")
        wait_for(lambda: _in_sync(src, db, "public.a", ["id", "n"], ["id"]), timeout=60)
    assert _table_states(src, state)["public.a"] == str(TableState.STREAMING)


def test_an_unchanged_toasted_array_under_the_default_identity(db: Any, tmp_path: Path) -> None:
    """REPLICA IDENTITY DEFAULT: an update of another column leaves the TOASTed array unsent;
    its value comes from the stored row, in both Delta tables."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY, n int, tags text[]);"
               "INSERT INTO t VALUES (1, 10, (SELECT array_agg(md5(i::text)) "
               "FROM generate_series(1, 500) i))")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live(src, "public.t", ["id"])) == 1)
        db.execute("UPDATE t SET n = 20")
        db.execute("UPDATE t SET n = 30")
        wait_for(lambda: _in_sync(src, db, "public.t", ["id", "n", "tags"], ["id"]), timeout=60)
    assert _table_states(src, state)["public.t"] == str(TableState.STREAMING)
    updates = [r for r in _log(src, "public.t") if r["_cdc_op"] == "U"]
    assert [r["n"] for r in updates] == [20, 30]
    assert all(len(r["tags"]) == 500 for r in updates)


@pytest.mark.slow
def test_run_time_failures_name_the_table_and_the_fix(make_cluster: Any, tmp_path: Path) -> None:
    """Slots exhausted when a snapshot's temporary slot is created: the error names the table,
    says the slots are in use and how to free one (before: "Some prerequisite checks failed.")."""
    import psycopg

    from cdcengine.errors import CDCError, Reason
    from cdcengine.pipeline.pipeline import Pipeline

    cluster = make_cluster({"max_replication_slots": 3})
    dsn = cluster.dsn("postgres")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(dsn, tmp_path, ["items"])
    api.enable_cdc(src, state=state)
    with psycopg.connect(dsn, autocommit=True) as conn:  # another tool takes the rest
        for name in ("other_a", "other_b"):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])
    with pytest.raises(CDCError) as info:
        Pipeline(src, state=state).run()
    err = info.value
    assert err.reason is Reason.PREREQUISITES_FAILED
    assert "public.items" in err.message and "replication slots are in use" in err.message
    assert "max_replication_slots" in err.fix and "pg_replication_slots" in err.fix


@pytest.mark.slow
def test_a_table_dropped_while_streaming_stops_alone(db: Any, tmp_path: Path) -> None:
    """DROP TABLE at the source while the daemon streams: that table stops with why and what
    to do, its Delta table keeps its last state, the other table streams on and the source is
    not broken; `enable` with the table removed from the config takes it out cleanly. (Before:
    the whole source went broken with publication_missing, and only `repair` cleared it.)"""
    from cdc_util import daemon_config, logs_on_failure, start_daemon

    db.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);"
               "INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], flush_interval_ms=100, lag_check_interval_s=1)
    api.enable_cdc(src, state=state)
    cfg = daemon_config(tmp_path, src, state, ["a", "b"], flush_interval_ms=100,
                        lag_check_interval_s=1)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(cfg, log)
    try:
        with logs_on_failure(log):
            wait_for(lambda: len(live(src, "public.a", ["id"])) == 1
                     and len(live(src, "public.b", ["id"])) == 1, timeout=60)
            db.execute("DROP TABLE a")
            wait_for(lambda: _table_states(src, state).get("public.a") == str(TableState.STOPPED),
                     timeout=60)
            db.execute("INSERT INTO b VALUES (2)")
            wait_for(lambda: len(live(src, "public.b", ["id"])) == 2, timeout=60)
            with api.open_store(state) as store:
                rec = store.get_source(src.name)
                table = next(t for t in store.list_tables(src.name) if t.name == "public.a")
            assert rec is not None and rec.broken is None
            assert table.reason is not None and table.reason.startswith("table_gone")
            assert table.remedy is not None and "cdcengine enable" in table.remedy
            assert len(live(src, "public.a", ["id"])) == 1  # the last state stays
            # the user takes the table out of the config and runs enable
            smaller = source_for(db.dsn, tmp_path, ["b"], flush_interval_ms=100)
            api.enable_cdc(smaller, state=state)
            assert "public.a" not in _table_states(src, state)
            db.execute("INSERT INTO b VALUES (3)")
            wait_for(lambda: len(live(src, "public.b", ["id"])) == 3, timeout=60)
            with api.open_store(state) as store:
                rec = store.get_source(src.name)
            assert rec is not None and rec.broken is None
    finally:
        daemon.kill()
        daemon.wait(30)


def test_select_revoked_after_enable_names_the_table(db: Any, tmp_path: Path) -> None:
    """SELECT revoked after `enable`: the snapshot's failure names the table (before: "lacks a
    privilege", no table named) and the source is paused for `resume`."""
    from cdcengine.errors import CDCError, Reason
    from cdcengine.pipeline.pipeline import Pipeline

    if db.server.host.startswith("/"):
        pytest.skip("the test server is reached over a unix socket; its auth method is unknown")
    role, dsn = db.create_role(password="Revoked-Pw-1", replication=True)
    db.execute("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1);"
               "CREATE PUBLICATION items_pub FOR TABLE items;"
               f'GRANT SELECT ON items TO "{role}"')
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(dsn, tmp_path, ["items"], management_mode="self_managed",
                     publication_name="items_pub")
    api.enable_cdc(src, state=state)
    db.execute(f'REVOKE SELECT ON items FROM "{role}"')
    with pytest.raises(CDCError) as info:
        Pipeline(src, state=state).run()
    assert info.value.reason is Reason.PERMISSION_DENIED
    assert "public.items" in info.value.message
    assert "Revoked-Pw-1" not in str(info.value)

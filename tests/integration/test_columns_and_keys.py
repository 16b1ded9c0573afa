"""Per-table `columns` and declared `primary_key` (SPEC §2) end to end against a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cdc_util import query, source_for
from test_pipeline import Running, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import PrerequisitesFailed
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink

ENGINE_CONSOLIDATED = ["_cdc_lsn", "_cdc_committed_at", "_cdc_deleted", "_cdc_deleted_at"]
ENGINE_APPEND = ["_cdc_lsn", "_cdc_seq", "_cdc_op", "_cdc_committed_at", "_cdc_unchanged"]


def live(src: SourceConfig, table: str, key: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef.parse(table)
    if sink.applied_version(ref, "consolidated") is None:
        return {}
    out = {}
    for r in sink.read_table(ref, "consolidated").to_pylist():
        if not r["_cdc_deleted"]:
            out[tuple(r[k] for k in key)] = {k: v for k, v in r.items()
                                             if not k.startswith("_cdc_")}
    return out


def source_rows(dsn: str, table: str, columns: list[str],
                key: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    cols = ", ".join(columns)
    rows = query(dsn, f"SELECT {cols} FROM {table}")
    out = {}
    for r in rows:
        row = dict(zip(columns, r, strict=True))
        out[tuple(row[k] for k in key)] = row
    return out


def caught_up(src: SourceConfig, db, table: str, columns: list[str],
              key: list[str]) -> bool:
    return live(src, table, key) == source_rows(db.dsn, table, columns, key)


def test_selected_columns_only_through_snapshot_and_stream(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b text, c int);"
               "CREATE TABLE k (id int PRIMARY KEY, a text, secret text);"
               "INSERT INTO t SELECT i, 'a' || i, 'b' || i, i FROM generate_series(1, 20) i;"
               "INSERT INTO k VALUES (1, 'x', 's1')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["t", "k"], table_mode="both", flush_interval_ms=100,
                     table={"public.t": {"columns": ["id", "a"]},
                            "public.k": {"columns": ["a"]}})  # the key is added
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live(src, "public.t", ["id"])) == 20
                 and len(live(src, "public.k", ["id"])) == 1)
        db.execute("INSERT INTO t VALUES (21, 'new', 'hidden', 0);"
                   "UPDATE t SET a = 'changed', b = 'nope' WHERE id = 1;"
                   "UPDATE t SET b = 'only b' WHERE id = 2;"
                   "DELETE FROM t WHERE id = 3;"
                   "UPDATE k SET a = 'y', secret = 's2' WHERE id = 1")
        wait_for(lambda: caught_up(src, db, "public.t", ["id", "a"], ["id"])
                 and caught_up(src, db, "public.k", ["id", "a"], ["id"]))
    sink = DeltaSink(src.destination, source=src.name)
    for table, cols in (("public.t", ["id", "a"]), ("public.k", ["id", "a"])):
        ref = TableRef.parse(table)
        assert sink.read_table(ref, "consolidated").column_names == [*cols,
                                                                     *ENGINE_CONSOLIDATED]
        assert sink.read_table(ref, "append").column_names == [*cols, *ENGINE_APPEND]
    rows = live(src, "public.t", ["id"])
    assert rows[(1,)] == {"id": 1, "a": "changed"} and (3,) not in rows
    assert rows[(21,)] == {"id": 21, "a": "new"}
    log = sink.read_table(TableRef("public", "t"), "append").to_pylist()
    assert {r["_cdc_op"] for r in log} == {"R", "I", "U", "D"}


def _run_keyed(db, tmp_path: Path, table: str, key: list[str]) -> SourceConfig:
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, [table], table_mode="both", flush_interval_ms=100,
                     table={f"public.{table}": {"primary_key": key}})
    api.enable_cdc(src, state=state)
    cols = ["a", "b", "v"]
    qualified = f"public.{table}"
    with Running(src, state):
        wait_for(lambda: caught_up(src, db, qualified, cols, key))
        db.execute(f"INSERT INTO {table} VALUES (10, 'x', 'new');"
                   f"UPDATE {table} SET v = 'upd' WHERE a = 1;"
                   f"UPDATE {table} SET b = 'bb' WHERE a = 2;"  # a key part changes
                   f"DELETE FROM {table} WHERE a = 3")
        db.execute(f"UPDATE {table} SET v = NULL WHERE a = 10;"
                   f"DELETE FROM {table} WHERE a = 4")
        wait_for(lambda: caught_up(src, db, qualified, cols, key))
    assert live(src, qualified, key) == source_rows(db.dsn, qualified, cols, key)
    sink = DeltaSink(src.destination, source=src.name)
    log = sink.read_table(TableRef.parse(qualified), "append").to_pylist()
    assert len({(r["_cdc_lsn"], r["_cdc_seq"]) for r in log}) == len(log)
    return src


def _make(db, table: str) -> None:
    db.execute(f"CREATE TABLE {table} (a int NOT NULL, b text NOT NULL, v text);"
               f"INSERT INTO {table} SELECT i, 'k' || i, 'v' || i FROM generate_series(1, 6) i")


def test_declared_key_with_replica_identity_full(db, tmp_path: Path) -> None:
    _make(db, "nopk")
    db.execute("ALTER TABLE nopk REPLICA IDENTITY FULL")
    src = _run_keyed(db, tmp_path, "nopk", ["a", "b"])
    sink = DeltaSink(src.destination, source=src.name)
    log = sink.read_table(TableRef("public", "nopk"), "append").to_pylist()
    deletes = {r["a"]: r["v"] for r in log if r["_cdc_op"] == "D"}
    # identity FULL: the old row comes whole; a key change is a delete plus an insert
    assert deletes == {2: "v2", 3: "v3", 4: "v4"}


def test_declared_key_with_a_unique_index_as_replica_identity(db, tmp_path: Path) -> None:
    _make(db, "uidx")
    db.execute("CREATE UNIQUE INDEX uidx_ab ON uidx (a, b);"
               "ALTER TABLE uidx REPLICA IDENTITY USING INDEX uidx_ab")
    src = _run_keyed(db, tmp_path, "uidx", ["a", "b"])
    sink = DeltaSink(src.destination, source=src.name)
    log = sink.read_table(TableRef("public", "uidx"), "append").to_pylist()
    # `both`: deletes carry the last values (from the batch or the consolidated table)
    deletes = {r["a"]: r["v"] for r in log if r["_cdc_op"] == "D"}
    assert deletes == {2: "v2", 3: "v3", 4: "v4"}


def test_unique_index_replica_identity_without_a_declared_key_is_refused(
        db, tmp_path: Path) -> None:
    """SPEC §2: a table without a primary key needs `primary_key` declared; the check says
    which one to declare."""
    _make(db, "uidx2")
    db.execute("CREATE UNIQUE INDEX uidx2_ab ON uidx2 (a, b);"
               "ALTER TABLE uidx2 REPLICA IDENTITY USING INDEX uidx2_ab")
    src = source_for(db.dsn, tmp_path, ["uidx2"], table_mode="both")
    with pytest.raises(PrerequisitesFailed) as info:
        api.enable_cdc(src, state="sqlite:///" + str(tmp_path / "state.db"))
    (check,) = [c for c in info.value.checks if c.name == "primary_key" and not c.ok]
    assert 'primary_key = ["a", "b"]' in check.fix

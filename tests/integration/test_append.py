"""The change log (append table) against a real server: last values on deletes and unchanged
TOAST (filled from the consolidated table in `both` mode), and replay to the consolidated
state through `cdcengine.control.history`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cdc_util import query, source_for
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.control import history
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink


def big_value(db, seed: int) -> str:
    """~96 kB of text stored out of line (EXTERNAL storage: never compressed inline)."""
    return query(db.dsn, "SELECT string_agg(md5((%s * 10000 + g)::text), '') "
                         "FROM generate_series(1, 3000) g", [seed])[0][0]


def change_log(src: SourceConfig, table: str) -> list[dict[str, object]]:
    sink = DeltaSink(src.destination, source=src.name)
    log = sink.read_table(TableRef.parse(table), "append")
    return log.sort_by([("_cdc_lsn", "ascending"), ("_cdc_seq", "ascending")]).to_pylist()


def replay_matches_consolidated(src: SourceConfig, table: str, key: list[str]) -> None:
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef.parse(table)
    latest = sink.applied_version(ref, "consolidated")
    assert latest is not None and sink.applied_version(ref, "append") == latest
    consolidated = sink.read_table(ref, "consolidated")
    live = [
        {k: v for k, v in r.items() if k not in ("_cdc_deleted", "_cdc_deleted_at")}
        for r in consolidated.to_pylist() if not r["_cdc_deleted"]
    ]
    replayed = history.as_of(sink.dataset(ref, "append"), key, latest).to_pylist()

    def order(r: dict[str, object]) -> tuple[object, ...]:
        return tuple(r[k] for k in key)

    assert sorted(replayed, key=order) == sorted(live, key=order)
    log = change_log(src, table)
    assert len({(r["_cdc_lsn"], r["_cdc_seq"]) for r in log}) == len(log)


def test_both_mode_deletes_and_unchanged_toast_carry_last_values(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE e (id int PRIMARY KEY, v text, n int, big text);"
               "ALTER TABLE e ALTER COLUMN big SET STORAGE EXTERNAL")
    snap_big = big_value(db, 1)
    db.execute("INSERT INTO e VALUES (1, 'a', 1, NULL), (2, 'b', 2, %s), (3, 'c', 3, 'small')",
               [snap_big])
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["e"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    later_big = big_value(db, 2)
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "e")) == {1, 2, 3})  # snapshot loaded
        db.execute("INSERT INTO e VALUES (10, 'ten', 10, %s)", [later_big])
        wait_for(lambda: 10 in live_rows(src, "e"))
        # later batches: nothing about these keys is in the batch itself
        db.execute("DELETE FROM e WHERE id = 10")
        db.execute("UPDATE e SET v = 'b2' WHERE id = 2")  # big: unchanged TOAST, 96 kB
        db.execute("DELETE FROM e WHERE id = 1")
        wait_for(lambda: set(live_rows(src, "e")) == {2, 3}
                 and live_rows(src, "e")[2]["v"] == "b2")
        # unchanged TOAST again, then a delete, in one transaction: filled within the batch
        db.execute("BEGIN; UPDATE e SET n = 22 WHERE id = 2; DELETE FROM e WHERE id = 3;"
                   "COMMIT")
        wait_for(lambda: set(live_rows(src, "e")) == {2} and live_rows(src, "e")[2]["n"] == 22)
    log = [(r["_cdc_op"], r["id"], r["v"], r["n"], r["big"], r["_cdc_unchanged"])
           for r in change_log(src, "public.e")]
    assert log == [
        ("R", 1, "a", 1, None, None),
        ("R", 2, "b", 2, snap_big, None),
        ("R", 3, "c", 3, "small", None),
        ("I", 10, "ten", 10, later_big, None),
        ("D", 10, "ten", 10, later_big, None),  # last values from the consolidated table
        ("U", 2, "b2", 2, snap_big, None),  # unchanged TOAST filled from it too
        ("D", 1, "a", 1, None, None),
        ("U", 2, "b2", 22, snap_big, None),
        ("D", 3, "c", 3, "small", None),
    ]
    assert len(snap_big) == 96_000
    assert live_rows(src, "public.e")[2]["big"] == snap_big
    replay_matches_consolidated(src, "public.e", ["id"])


@pytest.mark.parametrize("pause_s", [0.0, 0.6], ids=["batched", "one_batch_per_transaction"])
def test_replay_of_a_busy_change_log_equals_the_consolidated_table(db, tmp_path: Path,
                                                                   pause_s: float) -> None:
    """With a pause each transaction is its own batch: deletes then look their last values up
    in a consolidated table whose MERGE-written files hold strings as string_view."""
    db.execute("CREATE TABLE o (tenant text, n int, amount numeric(12,2), note text,"
               " PRIMARY KEY (tenant, n));"
               "INSERT INTO o SELECT 't' || (i % 3), i, i * 1.25, 'snap' FROM "
               "generate_series(1, 30) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["o"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)

    def count() -> int:
        sink = DeltaSink(src.destination, source=src.name)
        if sink.applied_version(TableRef("public", "o"), "consolidated") is None:
            return -1
        return sink.row_count(TableRef("public", "o"), "consolidated", live_only=True) or 0

    with Running(src, state):
        wait_for(lambda: count() == 30)
        for statement in (
                "UPDATE o SET amount = amount + 1 WHERE n % 2 = 0",
                "DELETE FROM o WHERE n % 5 = 0",
                "BEGIN; INSERT INTO o VALUES ('t0', 5, 0, 'back'); "
                "UPDATE o SET note = 'moved', n = n + 100 WHERE n = 7; COMMIT",
                "TRUNCATE o",
                "INSERT INTO o SELECT 'u', i, i, 'after' FROM generate_series(1, 5) i",
                "UPDATE o SET note = NULL WHERE n = 3; DELETE FROM o WHERE n = 4"):
            db.execute(statement)
            time.sleep(pause_s)
        wait_for(lambda: count() == 4)
        rows = query(db.dsn, "SELECT count(*) FROM o")[0][0]
        assert rows == 4
        # wait until the last transaction is in both tables
        sink = DeltaSink(src.destination, source=src.name)
        ref = TableRef("public", "o")
        wait_for(lambda: sink.applied_version(ref, "append")
                 == sink.applied_version(ref, "consolidated"))
    replay_matches_consolidated(src, "public.o", ["tenant", "n"])
    ops = [r["_cdc_op"] for r in change_log(src, "public.o")]
    assert ops.count("T") == 1
    deletes = [r for r in change_log(src, "public.o") if r["_cdc_op"] == "D"]
    # every delete of a row known before it carries its values (note is never null there)
    assert all(r["note"] is not None for r in deletes if r["n"] != 3)


def _key_change_with_unchanged_toast(db, tmp_path: Path) -> tuple[SourceConfig, str]:
    db.execute("CREATE TABLE kc (id int PRIMARY KEY, v text, big text);"
               "ALTER TABLE kc ALTER COLUMN big SET STORAGE EXTERNAL")
    value = big_value(db, 3)
    db.execute("INSERT INTO kc VALUES (2, 'b', %s)", [value])
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["kc"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "kc")) == {2})
        db.execute("UPDATE kc SET id = 20 WHERE id = 2")  # big: unchanged TOAST, new key
        wait_for(lambda: set(live_rows(src, "kc")) == {20})
    return src, value


def test_key_change_keeps_unchanged_toast_in_the_change_log(db, tmp_path: Path) -> None:
    src, value = _key_change_with_unchanged_toast(db, tmp_path)
    log = [(r["_cdc_op"], r["id"], r["big"], r["_cdc_unchanged"])
           for r in change_log(src, "public.kc")]
    assert log == [("R", 2, value, None), ("D", 2, value, None), ("I", 20, value, None)]


def test_key_change_keeps_unchanged_toast_in_the_consolidated_table(db, tmp_path: Path) -> None:
    src, value = _key_change_with_unchanged_toast(db, tmp_path)
    assert live_rows(src, "kc")[20]["big"] == value


def test_consolidated_table_switched_to_both_gets_its_change_log_from_a_snapshot(
        db, tmp_path: Path) -> None:
    """consolidated → both: the change log starts with R rows at its own snapshot point C and
    records every change after C; the consolidated table keeps its history and progress."""
    import dataclasses

    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["items"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "items")) == 20)
        db.execute("UPDATE items SET v = 'before' WHERE id = 1; DELETE FROM items WHERE id = 2")
        wait_for(lambda: 2 not in live_rows(src, "items"))
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef.parse("items")
    consolidated_at = sink.applied_version(ref, "consolidated")
    assert consolidated_at is not None and sink.applied_version(ref, "append") is None

    both = dataclasses.replace(src, table_mode="both")  # type: ignore[arg-type]
    db.execute("UPDATE items SET v = 'between' WHERE id = 3")  # while nothing runs
    with Running(both, state):
        wait_for(lambda: DeltaSink(src.destination, source=src.name
                                   ).applied_version(ref, "append") is not None, timeout=60)
        db.execute("UPDATE items SET v = 'after' WHERE id = 4; INSERT INTO items VALUES (99, 'n')")
        wait_for(lambda: 99 in live_rows(src, "items") and len(change_log(src, "items")) >= 21)
    rows = change_log(src, "items")
    snap = [r for r in rows if r["_cdc_op"] == "R"]
    assert sorted(r["id"] for r in snap) == sorted(set(range(1, 21)) - {2})
    assert {r["id"]: r["v"] for r in snap}[3] == "between"  # the snapshot saw it
    later = [(r["_cdc_op"], r["id"], r["v"]) for r in rows if r["_cdc_op"] != "R"]
    assert later == [("U", 4, "after"), ("I", 99, "n")]
    assert all(r["_cdc_lsn"] > snap[0]["_cdc_lsn"] for r in rows if r["_cdc_op"] != "R")
    live = live_rows(src, "items")
    assert live[3]["v"] == "between" and live[4]["v"] == "after" and live[1]["v"] == "before"
    # replaying the change log gives the consolidated values (R rows carry C, not the
    # position of each row's last change before the log existed)
    now = DeltaSink(src.destination, source=src.name)
    replayed = history.as_of(now.dataset(ref, "append"), ["id"],
                             now.applied_version(ref, "consolidated") or 0)
    assert {r["id"]: r["v"] for r in replayed.to_pylist()} == {
        k: r["v"] for k, r in live_rows(src, "items").items()}

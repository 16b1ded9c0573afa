"""The change log (append table) against a real server: last values on deletes and unchanged
TOAST (filled from the consolidated table in `both` mode), and replay to the consolidated
state through `cdcengine.history`."""

from __future__ import annotations

from pathlib import Path

from cdc_util import query, source_for
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api, history
from cdcengine.config import SourceConfig
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


def test_replay_of_a_busy_change_log_equals_the_consolidated_table(db, tmp_path: Path) -> None:
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
        db.execute("UPDATE o SET amount = amount + 1 WHERE n % 2 = 0")
        db.execute("DELETE FROM o WHERE n % 5 = 0")
        db.execute("BEGIN; INSERT INTO o VALUES ('t0', 5, 0, 'back'); "
                   "UPDATE o SET note = 'moved', n = n + 100 WHERE n = 7; COMMIT")
        db.execute("TRUNCATE o")
        db.execute("INSERT INTO o SELECT 'u', i, i, 'after' FROM generate_series(1, 5) i")
        db.execute("UPDATE o SET note = NULL WHERE n = 3; DELETE FROM o WHERE n = 4")
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

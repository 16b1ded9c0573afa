"""`cdcengine verify` against a real server: exact tables are equal, drift is found, a running
workload gives no false differences, and the CLI's exit codes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from cdc_util import query, source_for
from cli_util import assert_no_secret, closed_port, run_cli, write_config
from deltalake import DeltaTable, write_deltalake
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink

WAIT_S = 45.0


def _setup(db, tmp_path: Path, tables: list[str], **kw: object) -> tuple[SourceConfig, str]:
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, tables, flush_interval_ms=100, **kw)
    api.enable_cdc(src, state=state)
    return src, state


def _orders(db, n: int = 200) -> None:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric(12,2), note text,"
               " at timestamptz, tags text[], data bytea);"
               f"INSERT INTO orders SELECT i, i * 1.5, 'n' || i, '2024-01-01'::timestamptz"
               f" + i * interval '1 hour', ARRAY['a', i::text], '\\x00ff'::bytea"
               f" FROM generate_series(1, {n}) i")


def _advance_slot_past_changes(db, src: SourceConfig, sql: str) -> None:
    """Change the source so that the stream never sees it: the slot (inactive: no pipeline)
    is moved past the change's WAL."""
    db.execute(sql)
    lsn = query(db.dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    query(db.dsn, "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [src.slot_name, lsn])


def test_an_exact_table_is_equal_while_streaming(db, tmp_path: Path) -> None:
    _orders(db)
    src, state = _setup(db, tmp_path, ["orders"])
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "orders")) == 200)
        db.execute("INSERT INTO orders VALUES (201, 1, 'new', now(), '{}', NULL);"
                   "UPDATE orders SET note = 'changed', tags = NULL WHERE id = 5;"
                   "DELETE FROM orders WHERE id = 6;"
                   "UPDATE orders SET id = 1000 WHERE id = 8")
        wait_for(lambda: 1000 in live_rows(src, "orders"))
        res = api.verify(src, state=state, wait_s=WAIT_S)
    assert res.ok, res
    (t,) = res.tables
    assert t.status == "equal" and t.kind == "consolidated"
    assert t.comparison is not None
    assert t.comparison.source_rows == t.comparison.delta_rows == 200
    assert t.comparison.rows_compared == 200
    assert t.key == ("id",)
    assert t.consistent_point is not None and t.applied_lsn is not None
    assert res.differences == 0
    # no temporary slot is left behind
    assert query(db.dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE "
                         "'%\\_vfy\\_%'")[0][0] == 0


def test_drift_is_found_with_keys_and_kinds(db, tmp_path: Path) -> None:
    _orders(db, 50)
    src, state = _setup(db, tmp_path, ["orders"])
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "orders")) == 50)
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef("public", "orders")
    path = sink.path(ref, "consolidated")
    # behind the engine's back, in Delta: a changed row, a removed row, an extra row
    dt = DeltaTable(path)
    dt.update(updates={"note": "'tampered'"}, predicate="id = 3")
    DeltaTable(path).delete("id = 4")
    row = sink.read_table(ref, "consolidated").filter(pc.field("id") == 5)
    extra = row.set_column(row.column_names.index("id"), "id", pa.array([999], pa.int32()))
    write_deltalake(path, extra, mode="append")
    # ... and in the source, without the stream seeing it
    _advance_slot_past_changes(db, src, "UPDATE orders SET total = 0 WHERE id = 10;"
                                        "DELETE FROM orders WHERE id = 11;"
                                        "INSERT INTO orders (id, note) VALUES (500, 'x')")
    with Running(src, state):
        res = api.verify(src, "orders", state=state, wait_s=WAIT_S)
    (t,) = res.tables
    assert t.status == "different", t
    c = t.comparison
    assert c is not None
    assert [k["id"] for k in c.missing_examples] == [4, 500]
    assert [k["id"] for k in c.extra_examples] == [11, 999]
    assert [(d.key["id"], d.columns) for d in c.different_examples] == [
        (3, ("note",)), (10, ("total",))]
    assert (c.missing_in_delta, c.extra_in_delta, c.different) == (2, 2, 2)
    assert t.fix == f"cdcengine resync --source {src.name} --table public.orders"
    assert not res.ok and res.differences == 6


def test_no_false_differences_under_a_running_workload(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE hot (id int PRIMARY KEY, v int, note text);"
               "INSERT INTO hot SELECT i, 0, 'x' FROM generate_series(1, 2000) i")
    src, state = _setup(db, tmp_path, ["hot"])
    stop = threading.Event()
    errors: list[BaseException] = []

    def workload() -> None:
        import psycopg

        try:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    i += 1
                    conn.execute("UPDATE hot SET v = v + 1, note = %s WHERE id %% 97 = %s",
                                 [f"w{i}", i % 97])
                    conn.execute("INSERT INTO hot VALUES (%s, 0, 'new') ON CONFLICT DO NOTHING",
                                 [10_000 + i])
                    conn.execute("DELETE FROM hot WHERE id = %s", [10_000 + i - 3])
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "hot")) >= 2000)
        th = threading.Thread(target=workload, daemon=True)
        th.start()
        try:
            time.sleep(1.0)
            results = [api.verify(src, state=state, wait_s=WAIT_S) for _ in range(2)]
        finally:
            stop.set()
            th.join(30)
    assert not errors, errors
    for res in results:
        (t,) = res.tables
        assert t.status == "equal", repr(t.to_dict())
        c = t.comparison
        assert c is not None and c.rows_compared > 200 and c.in_flux > 0


def test_append_mode_and_column_selection(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE ev (id int PRIMARY KEY, kind text, secret text);"
               "INSERT INTO ev SELECT i, 'k' || i, 's' FROM generate_series(1, 20) i;"
               "CREATE TABLE part (id int PRIMARY KEY, a text, b text);"
               "INSERT INTO part SELECT i, 'a', 'b' FROM generate_series(1, 10) i")
    src, state = _setup(db, tmp_path, ["ev", "part"], table={
        "ev": {"mode": "append"}, "part": {"columns": ["id", "a"]}})
    sink = DeltaSink(src.destination, source=src.name)
    with Running(src, state):
        wait_for(lambda: sink.applied_version(TableRef("public", "ev"), "append") is not None
                 and len(live_rows(src, "part")) == 10)
        db.execute("UPDATE ev SET kind = 'u' WHERE id = 1; DELETE FROM ev WHERE id = 2;"
                   "INSERT INTO ev VALUES (21, 'n', 's'); UPDATE part SET b = 'ignored'")
        res = api.verify(src, state=state, wait_s=WAIT_S)
    by = {t.table: t for t in res.tables}
    assert res.ok, res
    assert by["public.ev"].kind == "append"
    assert by["public.ev"].comparison is not None
    assert by["public.ev"].comparison.source_rows == 20
    assert by["public.part"].columns == ("id", "a")


def test_cli_exit_codes_and_output(db, pg_server, tmp_path: Path) -> None:
    _orders(db, 30)
    src, state = _setup(db, tmp_path, ["orders"])
    cfg = write_config(tmp_path, [{
        "name": src.name, "dsn": db.dsn, "tables": ["orders"], "destination": src.destination,
        "flush_interval_ms": 100}])
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "orders")) == 30)
        ok = run_cli(cfg, "verify", "--source", src.name, "--wait", "30")
        assert ok.returncode == 0, ok
        assert "✅ public.orders: equal" in ok.stdout
        as_json = run_cli(cfg, "verify", "--source", src.name, "--table", "public.orders",
                          "--json")
        assert as_json.returncode == 0, as_json
        doc = as_json.json()
        assert doc["sources"][0]["ok"] is True
        assert doc["sources"][0]["tables"][0]["comparison"]["rows_compared"] == 30
    DeltaTable(DeltaSink(src.destination, source=src.name).path(
        TableRef("public", "orders"), "consolidated")).delete("id = 7")
    with Running(src, state):
        bad = run_cli(cfg, "verify", "--source", src.name, "--wait", "30")
    assert bad.returncode == 1, bad
    assert "❌ public.orders: 1 difference(s): 1 missing in Delta" in bad.stdout
    assert "missing in Delta: id=7" in bad.stdout
    assert f"fix: cdcengine resync --source {src.name} --table public.orders" in bad.stdout
    # nothing streams now and the source moved on: not caught up, a failure but no difference
    db.execute("UPDATE orders SET note = 'later' WHERE id = 1")
    stale = run_cli(cfg, "verify", "--source", src.name, "--wait", "1", "--json")
    assert stale.returncode == 1, stale
    assert stale.json()["sources"][0]["tables"][0]["status"] == "not_caught_up"
    usage = run_cli(cfg, "verify", "--source", src.name, "--table", "nope")
    assert usage.returncode == 2, usage
    assert run_cli(cfg, "verify").returncode == 2  # --source is required
    # an unreachable source: exit 1 with a reason, never the password
    password = "s3cr3t-verify-pw"
    down = write_config(tmp_path / "down", [{
        "name": "down", "dsn": f"postgresql://u:{password}@127.0.0.1:{closed_port()}/x",
        "tables": ["orders"], "destination": str(tmp_path / "down-lake")}])
    write_deltalake(str(tmp_path / "down-lake" / "public" / "orders"),
                    pa.table({"id": pa.array([1], pa.int32())}))
    unreachable = run_cli(down, "verify", "--source", "down")
    assert unreachable.returncode == 1, unreachable
    assert "connection_failed" in unreachable.output
    assert_no_secret([ok, bad, stale, usage, unreachable], [password, pg_server.password])


def test_verify_of_a_never_enabled_source_says_to_enable_it(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["items"])
    result = api.verify(src, state=state)
    (table,) = result.tables
    assert table.status == "no_delta_table"
    assert "cdcengine enable" in table.fix and "never enabled" in table.message

"""kill -9 of `cdcengine run` at the moments that matter, then a restart: exactly once.

Each case arms one failpoint (`cdcengine.failpoints`), runs a live workload against two tables
in `both` mode until the daemon kills itself there, restarts it without the failpoint and waits
until Delta caught up. Then: the consolidated tables equal the source value for value, the change
logs hold every change exactly once ((_cdc_lsn, _cdc_seq) unique, and replaying them rebuilds
the source), and no row's `_cdc_lsn` went backwards across the crash.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cdc_util import TransactionLoop, crash_at, daemon_config, query, source_for, start_daemon
from test_pipeline import wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink

pytestmark = pytest.mark.slow

TABLES = ("acct", "ledger")


def write_config(tmp_path: Path, src: SourceConfig, state: str) -> Path:
    # compacted often: a backlog of tiny commits must not make every merge slower
    return daemon_config(tmp_path, src, state, [f"public.{t}" for t in TABLES],
                         table_mode="both", flush_interval_ms=50, max_batch_rows=400,
                         maintenance_interval_s=3)


class Workload(TransactionLoop):
    """Small multi-table transactions (inserts, updates, deletes, key changes) until stopped."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(dsn, seed)
        self.next_id = 1000

    def transaction(self, conn: psycopg.Connection[Any]) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 6)):
            self.next_id += 1
            choice = rng.random()
            if choice < 0.4:
                conn.execute("INSERT INTO acct VALUES (%s, %s, %s)",
                             [self.next_id, rng.randint(0, 99), "n" * rng.randint(0, 30)])
            elif choice < 0.7:
                conn.execute("UPDATE acct SET v = v + 1, note = note || 'u' WHERE id = "
                             "(SELECT id FROM acct ORDER BY random() LIMIT 1)")
            elif choice < 0.8:
                conn.execute("DELETE FROM acct WHERE id = "
                             "(SELECT id FROM acct ORDER BY random() LIMIT 1)")
            elif choice < 0.85:
                conn.execute("UPDATE acct SET id = %s WHERE id = "
                             "(SELECT id FROM acct ORDER BY random() LIMIT 1)", [self.next_id])
            else:
                conn.execute("INSERT INTO ledger (acct, amount) VALUES (%s, %s)",
                             [rng.randint(1, 2000), rng.randint(-500, 500)])


def source_rows(dsn: str, table: str) -> dict[int, tuple[Any, ...]]:
    return {r[0]: r for r in query(dsn, f"SELECT * FROM {table} ORDER BY 1")}


def delta_rows(sink: DeltaSink, table: str, columns: list[str]) -> dict[int, tuple[Any, ...]]:
    ref = TableRef("public", table)
    if not sink.exists(ref, "consolidated"):
        return {}
    rows = sink.read_table(ref, "consolidated").to_pylist()
    return {r[columns[0]]: tuple(r[c] for c in columns) for r in rows if not r["_cdc_deleted"]}


def replay_log(sink: DeltaSink, table: str, columns: list[str]) -> dict[int, tuple[Any, ...]]:
    """The change log applied in (_cdc_lsn, _cdc_seq) order: must rebuild the source table."""
    log = sink.read_table(TableRef("public", table), "append").to_pylist()
    positions = [(r["_cdc_lsn"], r["_cdc_seq"]) for r in log]
    assert len(positions) == len(set(positions)), f"{table}: a change was written twice"
    state: dict[int, tuple[Any, ...]] = {}
    for r in sorted(log, key=lambda r: (r["_cdc_lsn"], r["_cdc_seq"])):
        if r["_cdc_op"] == "D":
            state.pop(r[columns[0]], None)
        else:
            state[r[columns[0]]] = tuple(r[c] for c in columns)
    return state


def lsns(sink: DeltaSink, table: str) -> dict[int, int]:
    ref = TableRef("public", table)
    if not sink.exists(ref, "consolidated"):
        return {}
    rows = sink.read_table(ref, "consolidated", columns=["id", "_cdc_lsn"]).to_pylist()
    return {r["id"]: r["_cdc_lsn"] for r in rows}


COLUMNS = {"acct": ["id", "v", "note"], "ledger": ["id", "acct", "amount"]}

# failpoint -> how often it is passed before the kill (later kills leave more behind them)
CASES = {
    "batch_taken": "batch_taken:5",
    "between_tables": "between_tables:3",
    "between_kinds": "between_kinds:7",
    "after_commit": "after_commit:6",
    "after_confirm": "after_confirm:4",
    "after_snapshot": "after_snapshot:2",
}


@pytest.mark.parametrize("failpoint", sorted(CASES))
def test_kill_9_then_restart_is_exactly_once(db, tmp_path: Path, failpoint: str) -> None:
    db.execute("CREATE TABLE acct (id int PRIMARY KEY, v int, note text);"
               "CREATE TABLE ledger (id serial PRIMARY KEY, acct int, amount int);"
               "INSERT INTO acct SELECT i, i % 7, 'seed' FROM generate_series(1, 200) i;"
               "INSERT INTO ledger (acct, amount) SELECT i, i FROM generate_series(1, 50) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, [f"public.{t}" for t in TABLES], table_mode="both")
    api.enable_cdc(src, state=state)
    cfg = write_config(tmp_path, src, state)
    sink = DeltaSink(src.destination, source=src.name)

    with Workload(db.dsn, seed=hash(failpoint) & 0xFFFF):
        log = tmp_path / "daemon.log"
        crash_at(cfg, log, CASES[failpoint], timeout=90)
        before = {t: lsns(sink, t) for t in TABLES}
        daemon = start_daemon(cfg, log)
        try:
            # a little more workload against the restarted daemon
            wait_for(lambda: all(sink.exists(TableRef("public", t), "consolidated")
                                 for t in TABLES), timeout=60)
        except BaseException:
            daemon.kill()
            raise
    try:
        for t in TABLES:
            wait_for(lambda t=t: delta_rows(sink, t, COLUMNS[t]) == source_rows(db.dsn, t),
                     timeout=90)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]

    for t in TABLES:
        expected = source_rows(db.dsn, t)
        assert delta_rows(sink, t, COLUMNS[t]) == expected
        assert replay_log(sink, t, COLUMNS[t]) == expected
        after = lsns(sink, t)
        went_back = {k: (v, after.get(k)) for k, v in before[t].items()
                     if after.get(k) is not None and after[k] < v}
        assert went_back == {}

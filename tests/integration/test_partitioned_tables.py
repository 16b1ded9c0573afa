"""Partitioned tables end to end (SPEC "Partitioned tables"): captured through their root
(`publish_via_partition_root`), each leaf copied on its own, into ONE Delta table per root.

PostgreSQL does not publish a TRUNCATE of one partition, a DETACH, or the rows an ATTACHed
table already holds: `verify` finds that drift and `resync` repairs it (what the README's
"Partitioned tables" section promises); a TRUNCATE of the root is published and applied.
"""

from __future__ import annotations

import json
import signal
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog.testing
from cdc_util import (
    TransactionLoop,
    crash_at,
    daemon_config,
    logs_on_failure,
    one,
    query,
    source_for,
    start_daemon,
    store,
)
from cli_util import run_cli
from test_append import replay_matches_consolidated
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.control import history
from cdcengine.control.verify import TableVerify
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine.source.adapter import Severity
from cdcengine.state.base import TableState
from cdcengine_postgres.control.discovery import NOTE_PARTITION_DRIFT

WAIT_S = 45.0
KEY = ["id", "day"]
REF = TableRef("public", "events")

# A root range-partitioned by month: January plain, February hash-partitioned on id, March
# list-partitioned on region. The primary key is declared on the root and must include the
# partition keys (PostgreSQL requires it), so every leaf inherits it as its replica identity.
SCHEMA = """
CREATE TABLE events (id int, day date, region text, v text, PRIMARY KEY (id, day, region))
  PARTITION BY RANGE (day);
CREATE TABLE events_01 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE events_02 PARTITION OF events FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')
  PARTITION BY HASH (id);
CREATE TABLE events_02_h0 PARTITION OF events_02 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE events_02_h1 PARTITION OF events_02 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE events_03 PARTITION OF events FOR VALUES FROM ('2024-03-01') TO ('2024-04-01')
  PARTITION BY LIST (region);
CREATE TABLE events_03_eu PARTITION OF events_03 FOR VALUES IN ('eu');
CREATE TABLE events_03_us PARTITION OF events_03 FOR VALUES IN ('us');
INSERT INTO events SELECT i, date '2024-01-01' + (i % 90), CASE WHEN i % 2 = 0 THEN 'eu'
  ELSE 'us' END, 'snap ' || i FROM generate_series(1, 1800) i;
"""
LEAVES = ("events_01", "events_02_h0", "events_02_h1", "events_03_eu", "events_03_us")
KEY_COLUMNS = ["id", "day", "region"]


def source_rows(dsn: str) -> dict[tuple[Any, ...], str]:
    return {(r[0], r[1], r[2]): r[3] for r in query(dsn, "SELECT id, day, region, v FROM events")}


def delta_rows(src: SourceConfig) -> dict[tuple[Any, ...], str]:
    """The live rows in Delta: the consolidated table's, else the change log replayed (append
    mode) to its latest position."""
    sink = DeltaSink(src.destination, source=src.name)
    if src.table_mode == "append":
        latest = sink.applied_version(REF, "append")
        if latest is None:
            return {}
        live = history.as_of(sink.dataset(REF, "append"), KEY_COLUMNS, latest).to_pylist()
    else:
        if sink.applied_version(REF, "consolidated") is None:
            return {}
        live = [r for r in sink.read_table(REF, "consolidated").to_pylist()
                if not r["_cdc_deleted"]]
    out = {(r["id"], r["day"], r["region"]): r["v"] for r in live}
    assert len(out) == len(live), "a key is in the Delta table twice"
    return out


def delta_tables(src: SourceConfig) -> set[str]:
    """The Delta tables written under the destination: one per root, never one per leaf."""
    return {p.parent.parent.relative_to(Path(src.destination)).as_posix()
            for p in Path(src.destination).rglob("_delta_log/00000000000000000000.json")}


def verified(src: SourceConfig, state: str) -> TableVerify:
    (t,) = api.verify(src, state=state, wait_s=WAIT_S).tables
    return t


def keys_of(examples: tuple[dict[str, object], ...]) -> set[int]:
    return {int(e["id"]) for e in examples}  # type: ignore[call-overload]


def test_root_snapshot_and_stream_into_one_delta_table(db, tmp_path: Path) -> None:
    db.execute(SCHEMA)
    state = "sqlite:///" + str(tmp_path / "state.db")
    # small chunks, two workers: every leaf is cut into several chunks copied in parallel
    src = source_for(db.dsn, tmp_path, ["events"], table_mode="both", flush_interval_ms=100,
                     snapshot_chunk_rows=150, snapshot_workers=2)
    api.enable_cdc(src, state=state)
    with structlog.testing.capture_logs() as logs, Running(src, state):
        wait_for(lambda: len(delta_rows(src)) == 1800, timeout=60)
        db.execute(
            # inserts into several partitions (and both sub-partitioning schemes)
            "INSERT INTO events VALUES (5001, '2024-01-15', 'eu', 'new jan'),"
            " (5002, '2024-02-15', 'us', 'new feb'), (5003, '2024-02-16', 'eu', 'new feb'),"
            " (5004, '2024-03-15', 'eu', 'new mar eu'), (5005, '2024-03-15', 'us', 'new mar us');"
            # an update inside one partition
            "UPDATE events SET v = 'changed' WHERE id = 10;"
            # the partition key changes: the row moves from January (11 % 90 = day 11) to March
            "UPDATE events SET day = '2024-03-20', v = 'moved' WHERE id = 11;"
            # a row moving between March's list sub-partitions (61 % 90 = day 61 = March 2)
            "UPDATE events SET region = 'eu', v = 'moved region' WHERE id = 61;"
            # a delete in a hash sub-partition (45 % 90 = day 45 = February 15)
            "DELETE FROM events WHERE id = 45")
        wait_for(lambda: delta_rows(src) == source_rows(db.dsn), timeout=60)
        t = verified(src, state)
    assert t.status == "equal" and t.comparison is not None, t
    assert t.comparison.source_rows == t.comparison.rows_compared == 1804
    rows = delta_rows(src)
    assert sorted((k, v) for k, v in rows.items() if k[0] in (10, 11, 61)) == [
        ((10, date(2024, 1, 11), "eu"), "changed"), ((11, date(2024, 3, 20), "us"), "moved"),
        ((61, date(2024, 3, 2), "eu"), "moved region")]
    assert not any(k[0] == 45 for k in rows)
    # the snapshot was copied leaf by leaf, each leaf in several chunks
    copied = [e["leaf"] for e in logs if e["event"] == "snapshot_chunk_committed"]
    assert sorted(set(copied)) == [f"public.{leaf}" for leaf in LEAVES]
    assert all(copied.count(f"public.{leaf}") >= 2 for leaf in LEAVES), copied
    # one Delta table per root (the consolidated table and its change log), none per leaf
    assert delta_tables(src) == {"public/events", "public/events_cdc"}
    replay_matches_consolidated(src, "events", KEY_COLUMNS)
    # PostgreSQL publishes a move between partitions as a DELETE of the old row and an INSERT
    # of the new one, both on the root, in that order within the same transaction
    log = DeltaSink(src.destination, source=src.name).read_table(REF, "append").to_pylist()
    moved = sorted((r["_cdc_lsn"], r["_cdc_seq"], r["_cdc_op"], r["day"], r["region"])
                   for r in log if r["id"] in (11, 61))
    assert [m[2:] for m in moved] == [
        ("R", date(2024, 1, 12), "us"), ("R", date(2024, 3, 2), "us"),
        ("D", date(2024, 1, 12), "us"), ("I", date(2024, 3, 20), "us"),
        ("D", date(2024, 3, 2), "us"), ("I", date(2024, 3, 2), "eu")], moved
    assert moved[2][0] == moved[3][0] and moved[2][1] < moved[3][1]


@pytest.mark.parametrize("mode", ["consolidated", "append"])
def test_partition_ddl_drift_is_found_by_verify_and_repaired_by_resync(
        db, tmp_path: Path, mode: str) -> None:
    db.execute(SCHEMA)
    # April's partition is prepared (and filled) beside the table, then attached while streaming
    db.execute("CREATE TABLE events_04 (LIKE events INCLUDING ALL);"
               "INSERT INTO events_04 SELECT i, date '2024-04-01' + (i % 30), 'eu', 'pre ' || i"
               " FROM generate_series(7001, 7040) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["events"], table_mode=mode, flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    us_march = {r[0] for r in query(db.dsn, "SELECT id FROM events_03_us")}
    eu_march = {r[0] for r in query(db.dsn, "SELECT id FROM events_03_eu")}
    january = {r[0] for r in query(db.dsn, "SELECT id FROM events_01")}
    with Running(src, state):
        wait_for(lambda: len(delta_rows(src)) == 1800, timeout=60)
        # none of these three is published by PostgreSQL
        db.execute("ALTER TABLE events ATTACH PARTITION events_04"
                   " FOR VALUES FROM ('2024-04-01') TO ('2024-05-01')")
        db.execute("ALTER TABLE events DETACH PARTITION events_01")
        db.execute("TRUNCATE events_03_us")
        db.execute("DROP TABLE events_03_eu")
        # ...but what follows is: through the root into the attached partition and into a
        # partition created meanwhile, and not into the detached table (no longer part of the
        # published root)
        db.execute("CREATE TABLE events_05 PARTITION OF events"
                   " FOR VALUES FROM ('2024-05-01') TO ('2024-06-01')")
        db.execute("INSERT INTO events VALUES (8001, '2024-04-10', 'us', 'after attach');"
                   "INSERT INTO events_01 VALUES (8002, '2024-01-10', 'eu', 'detached');"
                   "INSERT INTO events VALUES (8004, '2024-05-10', 'eu', 'new partition');"
                   "INSERT INTO events VALUES (8003, '2024-03-10', 'us', 'after truncate')")
        wait_for(lambda: any(k[0] == 8003 for k in delta_rows(src)), timeout=60)
        rows = delta_rows(src)
        assert {k[0] for k in rows if k[0] > 8000} == {8001, 8003, 8004}
        drift = verified(src, state)
        assert drift.status == "different", drift
        cmp = drift.comparison
        assert cmp is not None
        assert cmp.missing_in_delta == 40  # the rows events_04 held when it was attached
        assert cmp.extra_in_delta == len(january) + len(us_march) + len(eu_march)
        assert cmp.different == 0
        assert keys_of(cmp.missing_examples) <= set(range(7001, 7041))
        assert keys_of(cmp.extra_examples) <= january | us_march | eu_march
        assert drift.fix is not None and "resync" in drift.fix
        res = api.resync_table(src, "events", state=state)
        assert res.queued and res.daemon_running
        wait_for(lambda: delta_rows(src) == source_rows(db.dsn), timeout=90)
        wait_for(lambda: {t.name: t.state for t in store(tmp_path).list_tables(src.name)}
                 == {"public.events": TableState.STREAMING}, timeout=30)
        repaired = verified(src, state)
        assert repaired.status == "equal", repaired
        if mode == "consolidated":  # the detached partition's rows are kept, marked deleted
            stored = DeltaSink(src.destination, source=src.name).read_table(REF, "consolidated")
            gone = {r["id"] for r in stored.to_pylist() if r["_cdc_deleted"]}
            assert january <= gone
        # a TRUNCATE of the root is published (for every leaf) and applied at its position
        db.execute("BEGIN; TRUNCATE events;"
                   "INSERT INTO events VALUES (9001, '2024-02-02', 'eu', 'after root truncate');"
                   "COMMIT")
        wait_for(lambda: delta_rows(src) == source_rows(db.dsn), timeout=60)
    assert list(delta_rows(src)) == [(9001, date(2024, 2, 2), "eu")]


def test_tables_and_check_say_what_postgresql_does_not_publish(db, tmp_path: Path) -> None:
    """The root is capturable (its primary key, which includes the partition keys, cascades to
    every leaf as its replica identity); a leaf is refused with the root to list instead; a
    root whose identity is FULL on the root only is refused with the leaves to fix."""
    db.execute(SCHEMA)
    db.execute("CREATE TABLE logs (at date, msg text) PARTITION BY RANGE (at);"
               "CREATE TABLE logs_2024 PARTITION OF logs FOR VALUES FROM ('2024-01-01')"
               " TO ('2025-01-01');"
               "ALTER TABLE logs REPLICA IDENTITY FULL")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["events", "events_01", "logs"],
                     table={"public.logs": {"primary_key": ["at", "msg"]}})
    cfg = daemon_config(tmp_path, src, state, src.tables)
    listed = run_cli(cfg, "tables", "--json")
    infos = {t["qualified"]: t for t in json.loads(listed.stdout)["sources"][0]["tables"]}
    events = infos["public.events"]
    assert events["capturable"] and events["kind"] == "partitioned table", events
    assert NOTE_PARTITION_DRIFT in events["notes"]
    assert "ATTACH" in NOTE_PARTITION_DRIFT and "resync" in NOTE_PARTITION_DRIFT
    assert events["replica_identity_columns"] == KEY_COLUMNS
    leaf = infos["public.events_02_h0"]
    assert not leaf["capturable"] and leaf["partition_of"] == "public.events"
    assert "captured only through its root public.events" in leaf["reasons"][0]

    checks = api.check_prerequisites(src, state=state)
    warning = one(checks, "partitioned_table", "public.events")
    assert warning.severity is Severity.WARNING
    assert "ATTACH" in warning.message and "DETACH" in warning.message
    assert f"cdcengine resync --source {src.name} --table public.events" in warning.fix
    assert one(checks, "replica_identity", "public.events").ok
    assert one(checks, "table_kind", "public.events_01").severity is Severity.ERROR
    assert "Capture public.events" in one(checks, "table_kind", "public.events_01").fix
    # the declared key is fine on the root, but its only partition has no identity of its own:
    # enabling would make every UPDATE and DELETE there fail for the application
    assert one(checks, "primary_key", "public.logs").ok
    bare = one(checks, "replica_identity", "public.logs")
    assert bare.severity is Severity.ERROR and "public.logs_2024" in bare.message, bare
    assert "REPLICA IDENTITY FULL" in bare.fix
    db.execute("ALTER TABLE logs_2024 REPLICA IDENTITY FULL")
    checks = api.check_prerequisites(src, state=state)
    assert one(checks, "replica_identity", "public.logs").ok



def test_replica_identity_full_on_root_and_leaves_with_a_declared_key(db, tmp_path: Path
                                                                      ) -> None:
    """No primary key (it would have to include the partition key): REPLICA IDENTITY FULL on
    the root and on every partition, rows matched on the declared `primary_key`."""
    db.execute("CREATE TABLE logs (id int NOT NULL, at date NOT NULL, msg text)"
               " PARTITION BY RANGE (at);"
               "CREATE TABLE logs_h1 PARTITION OF logs FOR VALUES FROM ('2024-01-01')"
               " TO ('2024-07-01');"
               "CREATE TABLE logs_h2 PARTITION OF logs FOR VALUES FROM ('2024-07-01')"
               " TO ('2025-01-01');"
               "ALTER TABLE logs REPLICA IDENTITY FULL; ALTER TABLE logs_h1 REPLICA IDENTITY FULL;"
               "ALTER TABLE logs_h2 REPLICA IDENTITY FULL;"
               "INSERT INTO logs SELECT i, date '2024-01-01' + i, 'm' || i"
               " FROM generate_series(1, 300) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["logs"], flush_interval_ms=100,
                     table={"public.logs": {"primary_key": ["id"]}})
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "logs")) == 300, timeout=60)
        db.execute("UPDATE logs SET msg = 'changed' WHERE id = 3;"
                   "UPDATE logs SET at = '2024-12-01', msg = 'moved' WHERE id = 4;"  # h1 → h2
                   "DELETE FROM logs WHERE id = 250;"
                   "INSERT INTO logs VALUES (301, '2024-02-02', 'new')")
        wait_for(lambda: 250 not in live_rows(src, "logs") and 301 in live_rows(src, "logs"),
                 timeout=60)
        assert verified(src, state).status == "equal"
    rows = live_rows(src, "logs")
    assert (rows[3]["msg"], rows[4]["msg"], str(rows[4]["at"])) == (
        "changed", "moved", "2024-12-01")
    assert len(rows) == 300


class PartitionWorkload(TransactionLoop):
    """Small transactions across the partitions: inserts, updates, moves between partitions
    (range and list keys), deletes."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(dsn, seed)
        self.next_id = 20_000

    def transaction(self, conn: psycopg.Connection[Any]) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 5)):
            day, region = rng.randint(0, 89), rng.choice(["eu", "us"])
            pick = "(SELECT id FROM events ORDER BY random() LIMIT 1)"
            choice = rng.random()
            if choice < 0.4:
                self.next_id += 1
                conn.execute("INSERT INTO events VALUES (%s, date '2024-01-01' + %s, %s, 'w')",
                             [self.next_id, day, region])
            elif choice < 0.6:
                conn.execute(f"UPDATE events SET v = v || 'u' WHERE id = {pick}")
            elif choice < 0.85:
                conn.execute("UPDATE events SET day = date '2024-01-01' + %s, region = %s, "
                             f"v = 'moved' WHERE id = {pick}", [day, region])
            else:
                conn.execute(f"DELETE FROM events WHERE id = {pick}")


@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_is_exactly_once(db, tmp_path: Path) -> None:
    db.execute(SCHEMA)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.events"], table_mode="both")
    api.enable_cdc(src, state=state)
    cfg = daemon_config(tmp_path, src, state, ["public.events"], table_mode="both",
                        flush_interval_ms=50, max_batch_rows=400, maintenance_interval_s=3)
    log = tmp_path / "daemon.log"
    with logs_on_failure(log):
        with PartitionWorkload(db.dsn, seed=17):
            crash_at(cfg, log, "after_commit:6", timeout=90)
            sink = DeltaSink(src.destination, source=src.name)
            before = sink.applied_version(REF, "consolidated") or 0
            daemon = start_daemon(cfg, log)
            try:
                # more of the workload is applied by the restarted daemon while it runs
                wait_for(lambda: (sink.applied_version(REF, "consolidated") or 0) > before,
                         timeout=60)
            except BaseException:
                daemon.kill()
                raise
        try:
            wait_for(lambda: delta_rows(src) == source_rows(db.dsn), timeout=90)
            # verify needs the daemon: Delta reaches verify's position through the stream
            assert verified(src, state).status == "equal"
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        assert daemon.returncode == 0
    replay_matches_consolidated(src, "events", KEY_COLUMNS)

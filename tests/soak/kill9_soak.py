"""Randomized kill -9 soak: the daemon killed at random moments, many times, must lose nothing.

Not part of the default test run (a smoke run of it is: `tests/integration/test_soak_smoke.py`).
Run it by hand, for as long as you like:

    .venv/bin/python tests/soak/kill9_soak.py --kills 60 --scale 10 --seed 7

What it does, on a throwaway PostgreSQL 15 (a `TempCluster`, like the tests):
1. pgbench tables at `--scale` (100k accounts per unit) plus a `churn` table, captured in
   `both` mode (consolidated + change log). `pgbench_history` gets a primary key first.
2. Snapshot phase: the daemon (`cdcengine run`, its own process) is started and killed with
   SIGKILL at random moments while it snapshots (`--snapshot-kills` times), then left to finish.
3. Streaming phase: pgbench runs (`-R` rate-limited) plus a loop of deletes and re-inserts of
   the same keys on `churn`; the daemon is started and killed at random moments until
   `--kills` kills in all happened.
4. The workload stops; the daemon runs until Delta caught up; then the checks:
   - every consolidated table equals its source table, row for row;
   - every change-log row is there once: (_cdc_lsn, _cdc_seq) unique per table;
   - completeness: the change log's U rows of pgbench_accounts/_tellers/_branches and its I rows
     of pgbench_history each equal the pgbench transactions COMMITTED in the streaming phase
     (rows pgbench_history gained: each transaction updates one row of each table and inserts
     one history row); churn's D and I rows equal n_tup_del / n_tup_ins. (pg_stat's n_tup_*
     count aborted work too: pgbench stopped by SIGINT can abort a transaction after its first
     UPDATE, so n_tup_upd is shown beside, not compared, for the pgbench tables.)
Exit 0 when every check passed, 1 otherwise; a JSON summary is printed either way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine_postgres.testing.cluster import TempCluster

PGBENCH = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]
KEYS = {"pgbench_accounts": ["aid"], "pgbench_branches": ["bid"], "pgbench_tellers": ["tid"],
        "pgbench_history": ["hid"], "churn": ["id"]}
TABLES = [*PGBENCH, "churn"]


def _q(dsn: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


COMMITTED = "committed pgbench transactions"


def _stats(dsn: str) -> dict[str, tuple[int, int, int]]:
    _q(dsn, "SELECT pg_stat_force_next_flush()")
    time.sleep(0.6)  # the stats collector's flush interval
    rows = _q(dsn, "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")
    out = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}
    # committed pgbench transactions so far: one history row each (aborted ones leave none)
    out[COMMITTED] = (int(_q(dsn, "SELECT count(*) FROM pgbench_history")[0][0]), 0, 0)
    return out


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(tempfile.mkdtemp(prefix="cdcengine-soak-"))
        self.kills = 0
        self.log = self.work / "daemon.log"

    # ---- set-up -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with TempCluster({"max_wal_senders": 10, "max_replication_slots": 10}) as cluster:
            self.dsn = cluster.dsn()
            self.pgbench_base = [str(cluster.bindir / "pgbench"), "-h", cluster.host, "-p",
                                 str(cluster.port), "-U", cluster.superuser]
            self.pg_env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")},
                           "PGPASSWORD": cluster.password}
            self._pgbench("-i", "-s", str(self.args.scale), "-q")
            _q(self.dsn, "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY;"
                         "CREATE TABLE churn (id int PRIMARY KEY, v int NOT NULL);"
                         "INSERT INTO churn SELECT g, 0 FROM generate_series(1, 1000) g")
            self.state = f"sqlite:///{self.work / 'state.db'}"
            self.src = SourceConfig(name="soak", dsn=self.dsn, tables=TABLES,
                                    destination=str(self.work / "lake"), table_mode="both",
                                    flush_interval_ms=200, snapshot_chunk_rows=20_000)
            api.enable_cdc(self.src, state=self.state)
            self.cfg = self.work / "cdcengine.toml"
            self.cfg.write_text(
                f'[engine]\nstate = "{self.state}"\nhttp_port = 0\n[[source]]\nname = "soak"\n'
                f'dsn = "{self.dsn}"\ntables = {json.dumps(TABLES)}\n'
                f'destination = "{self.src.destination}"\ntable_mode = "both"\n'
                "flush_interval_ms = 200\nsnapshot_chunk_rows = 20000\n")
            self._snapshot_phase()
            before = _stats(self.dsn)
            self._streaming_phase()
            after = _stats(self.dsn)
            self._catch_up()
            return self._check(before, after)

    def _pgbench(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.pgbench_base, *args, "postgres"], env=self.pg_env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench {args}: {done.stderr[-2000:]}")
        return done

    # ---- the daemon ---------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDCENGINE")}
        return subprocess.Popen([sys.executable, "-m", "cdcengine", "--config",
                                 str(self.cfg), "run"], cwd=self.work, env=env,
                                stdout=self.log.open("a"), stderr=subprocess.STDOUT, text=True)

    def _kill_after(self, lo: float, hi: float) -> None:
        proc = self._start()
        time.sleep(self.rng.uniform(lo, hi))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.kills += 1

    def _snapshotted(self) -> bool:
        sink = DeltaSink(self.src.destination, source="soak")
        return all(sink.applied_version(TableRef.parse(t), kind) is not None
                   for t in TABLES for kind in ("consolidated", "append"))

    def _snapshot_phase(self) -> None:
        for _ in range(self.args.snapshot_kills):
            if self._snapshotted():
                break
            self._kill_after(0.5, 3.0)
        proc = self._start()  # the rest of the snapshot, uninterrupted
        try:
            self._until(self._snapshotted, 600)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    def _streaming_phase(self) -> None:
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn() -> None:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    rng = random.Random(self.args.seed + 1)
                    while not stop.is_set():
                        k = rng.randint(1, 1000)
                        with conn.transaction():
                            conn.execute("DELETE FROM churn WHERE id = %s", [k])
                            conn.execute("INSERT INTO churn VALUES (%s, %s)", [k, rng.randint(
                                1, 10**6)])
                        time.sleep(0.01)
            except BaseException as exc:  # noqa: BLE001 - reported at the end
                errors.append(exc)

        bench = subprocess.Popen([*self.pgbench_base, "-n", "-c", "2", "-j", "2", "-R",
                                  str(self.args.rate), "-T", "100000", "postgres"],
                                 env=self.pg_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        try:
            while self.kills < self.args.kills:
                self._kill_after(0.5, 6.0)
        finally:
            bench.send_signal(signal.SIGINT)
            bench.wait(60)
            stop.set()
            worker.join(30)
        if errors:
            raise errors[0]

    def _catch_up(self) -> None:
        proc = self._start()
        try:
            self._until(lambda: all(self._same(t) for t in TABLES), self.args.catch_up_s)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    @staticmethod
    def _until(check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError("not reached in time")
            time.sleep(1.0)

    # ---- the checks ---------------------------------------------------------------------------
    def _delta(self, table: str, kind: str) -> list[dict[str, Any]]:
        sink = DeltaSink(self.src.destination, source="soak")
        return sink.read_table(TableRef.parse(table), kind).to_pylist()  # type: ignore[no-any-return]

    def _same(self, table: str) -> bool:
        with psycopg.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {table}")
            names = [d.name for d in cur.description or ()]
            want = sorted(cur.fetchall())
        got = sorted(tuple(r[n] for n in names) for r in self._delta(table, "consolidated")
                     if not r["_cdc_deleted"])
        return got == want

    def _check(self, before: dict[str, tuple[int, int, int]],
               after: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
        failures: list[str] = []
        counts: dict[str, dict[str, int]] = {}
        for table in TABLES:
            if not self._same(table):
                failures.append(f"{table}: consolidated differs from the source")
            log = self._delta(table, "append")
            positions = [(r["_cdc_lsn"], r["_cdc_seq"]) for r in log]
            if len(positions) != len(set(positions)):
                failures.append(f"{table}: a change-log row is there twice")
            ops = {op: sum(r["_cdc_op"] == op for r in log) for op in "IUDR"}
            ins, upd, dele = (a - b for a, b in zip(after[table], before[table], strict=True))
            counts[table] = {**ops, "pg_inserts": ins, "pg_updates": upd, "pg_deletes": dele}
            want = (ins, upd, dele)
            if table in PGBENCH:
                txns = after[COMMITTED][0] - before[COMMITTED][0]
                counts[table]["committed_transactions"] = txns
                want = (txns, 0, 0) if table == "pgbench_history" else (0, txns, 0)
            if (ops["I"], ops["U"], ops["D"]) != want:
                failures.append(f"{table}: change log I/U/D {ops['I']}/{ops['U']}/{ops['D']} "
                                f"!= PostgreSQL's committed {'/'.join(map(str, want))}")
        return {"ok": not failures, "kills": self.kills, "failures": failures,
                "counts": counts, "work_dir": str(self.work), "seed": self.args.seed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kill -9s in all (default 50)")
    parser.add_argument("--snapshot-kills", type=int, default=5,
                        help="of them, during the first snapshot at most (default 5)")
    parser.add_argument("--scale", type=int, default=5, help="pgbench scale (default 5)")
    parser.add_argument("--rate", type=int, default=200,
                        help="pgbench transactions per second (default 200)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--catch-up-s", type=float, default=600)
    args = parser.parse_args(argv)
    result = Soak(args).run()
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

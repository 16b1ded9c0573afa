"""Raw replication-stream throughput: `ReplicationStream` against `pg_recvlogical`.

Why a script and not a test: timings on a shared 2-core box are too noisy to assert on, but the
stream is the first stage of every row's path, so its cost relative to PostgreSQL's own client
should be easy to re-measure by hand. pg_recvlogical (C, discarding its output) is the ceiling a
Python reader can hope to match: at ~110k rows/s the walsender's decoding is the limit
(research/limits-and-pitfalls.md §4b/§4c), so a ratio near 1.0 means the stream adds nothing.

What it does: starts a throwaway `TempCluster`, creates the §4 dataset table
`t(id bigint primary key, a int, b text, c timestamptz, d numeric(12,2), e jsonb, f boolean,
g double precision)` with publication `pb` and a base pgoutput slot, inserts N rows (default
1,000,000) in 1000-row transactions, then alternately, for each round:
(a) `pg_recvlogical --start --no-loop -E <end> -f /dev/null -o proto_version=1
    -o publication_names=pb` on a fresh copy of the base slot;
(b) `ReplicationStream` (proto 1) on another fresh copy, reading raw payloads only (counting
    'I' frames, stopping at the Commit after the last row).
Every run starts from the same slot state (`pg_copy_logical_replication_slot`), so runs repeat.
It prints each run, the medians as rows/s, the ratio (b)/(a), and the walsender's and the
client's CPU seconds (the walsender burns less per row when the client reads more slowly,
because it can batch its sends: §4c).

Usage: ``.venv/bin/python benchmarks/stream_bench.py [rows] [rounds]`` (defaults 1000000, 3).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psycopg

from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine_postgres.replication.stream import ReplicationStream
from cdcengine_postgres.testing.cluster import TempCluster

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_BATCH = 1000

_SCHEMA = (
    "CREATE TABLE t (id bigint PRIMARY KEY, a int, b text, c timestamptz, d numeric(12,2),"
    " e jsonb, f boolean, g double precision)"
)
# One DO block, COMMIT after every 1000 rows (procedure-level transaction control): 1000-row
# transactions without 1000 client round trips.
_LOAD = """
DO $$
DECLARE lo bigint;
BEGIN
  FOR i IN 0 .. {batches} - 1 LOOP
    lo := i::bigint * {batch};
    INSERT INTO t
      SELECT g, (g % 100000)::int, md5(g::text) || md5((g + 7)::text),
             timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
             (g % 1000000) / 100.0, jsonb_build_object('k', g, 's', 'v' || g),
             g % 2 = 0, g * 0.5
      FROM generate_series(lo + 1, lo + {batch}) g;
    COMMIT;
  END LOOP;
END $$
"""


@dataclass
class Run:
    seconds: float
    walsender_cpu_s: float
    client_cpu_s: float


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (Linux /proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class WalsenderCpu(threading.Thread):
    """Samples the CPU time of the walsender serving `slot` until stopped (it exits with the
    client, so the last sample taken while it lived is the total)."""

    def __init__(self, dsn: str, slot: str) -> None:
        super().__init__(daemon=True)
        self._dsn, self._slot = dsn, slot
        self._halt = threading.Event()
        self.cpu_s = 0.0

    def run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            self._sample(conn)

    def _sample(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        pid: int | None = None
        while not self._halt.is_set():
            if pid is None:
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    [self._slot],
                ).fetchone()
                pid = row[0] if row and isinstance(row[0], int) else None
            if pid is not None:
                cpu = proc_cpu_s(pid)
                if cpu is not None:
                    self.cpu_s = cpu
            self._halt.wait(0.05)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.cpu_s


def _fresh_copy(admin: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    admin.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        " WHERE slot_name = %s",
        [name],
    )
    admin.execute("SELECT pg_copy_logical_replication_slot('base', %s)", [name])


def _drop(admin: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.execute("SELECT pg_drop_replication_slot(%s)", [name])
            return
        except psycopg.errors.ObjectInUse:  # pitfall 13: the walsender is still exiting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def run_recvlogical(
    cluster: TempCluster, admin: psycopg.Connection[tuple[object, ...]], end_lsn: int
) -> Run:
    slot = "bench_recv"
    _fresh_copy(admin, slot)
    cmd = [
        str(cluster.bindir / "pg_recvlogical"),
        "-d", f"host={cluster.host} port={cluster.port} user={cluster.superuser} dbname=postgres",
        "-S", slot, "--start", "--no-loop", "-E", format_lsn(end_lsn), "-f", "/dev/null",
        "-o", "proto_version=1", "-o", "publication_names=pb",
    ]  # fmt: skip
    env = {**os.environ, "PGPASSWORD": cluster.password}
    sampler = WalsenderCpu(cluster.admin_dsn, slot)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    sampler.start()
    subprocess.run(cmd, env=env, check=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    walsender = sampler.stop()
    _drop(admin, slot)
    client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(seconds, walsender, client)


def run_stream(
    cluster: TempCluster, admin: psycopg.Connection[tuple[object, ...]], rows: int
) -> Run:
    slot = "bench_stream"
    _fresh_copy(admin, slot)
    sampler = WalsenderCpu(cluster.admin_dsn, slot)
    inserts = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    sampler.start()
    with ReplicationStream(
        cluster.admin_dsn, slot=slot, publications=["pb"], secrets=[cluster.password]
    ) as stream:
        read = stream.read
        while True:
            msg = read(5.0)
            if msg is None:
                raise RuntimeError(f"stream stalled after {inserts} inserts")
            kind = msg.payload[0]
            if kind == 0x49:  # 'I'
                inserts += 1
            elif kind == 0x43 and inserts >= rows:  # 'C' after the last row
                break
        seconds = time.perf_counter() - t0
        client = time.process_time() - cpu0
    walsender = sampler.stop()
    _drop(admin, slot)
    if inserts != rows:
        raise RuntimeError(f"expected {rows} inserts, got {inserts}")
    return Run(seconds, walsender, client)


def _report(name: str, runs: list[Run], rows: int) -> float:
    med = statistics.median(r.seconds for r in runs)
    wal = statistics.median(r.walsender_cpu_s for r in runs)
    cli = statistics.median(r.client_cpu_s for r in runs)
    print(
        f"{name:32s} runs={[round(r.seconds, 2) for r in runs]} median={med:.2f}s "
        f"-> {rows / med:,.0f} rows/s; walsender CPU {wal:.1f}s, client CPU {cli:.1f}s",
        flush=True,
    )
    return med


def main(argv: list[str]) -> int:
    rows = int(argv[1]) if len(argv) > 1 else 1_000_000
    rounds = int(argv[2]) if len(argv) > 2 else 3
    if rows % _BATCH:
        raise SystemExit(f"rows must be a multiple of {_BATCH}")
    settings = {"shared_buffers": "1GB", "max_wal_size": "8GB", "synchronous_commit": "off"}
    with (
        TempCluster(settings) as cluster,
        psycopg.connect(cluster.admin_dsn, autocommit=True) as admin,
    ):
        print(f"PostgreSQL {cluster.version}, {os.cpu_count()} CPUs, {rows:,} rows in "
              f"{_BATCH}-row transactions", flush=True)
        admin.execute(_SCHEMA)
        admin.execute("CREATE PUBLICATION pb FOR TABLE t")
        admin.execute("SELECT pg_create_logical_replication_slot('base', 'pgoutput')")
        t0 = time.perf_counter()
        admin.execute(_LOAD.format(batches=rows // _BATCH, batch=_BATCH))
        row = admin.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        end_lsn = parse_lsn(str(row[0]))
        print(f"loaded in {time.perf_counter() - t0:.1f}s; end LSN {format_lsn(end_lsn)}",
              flush=True)
        recv: list[Run] = []
        ours: list[Run] = []
        for i in range(rounds):
            recv.append(run_recvlogical(cluster, admin, end_lsn))
            ours.append(run_stream(cluster, admin, rows))
            print(f"round {i + 1}: pg_recvlogical {recv[-1].seconds:.2f}s, "
                  f"ReplicationStream {ours[-1].seconds:.2f}s", flush=True)
        a = _report("(a) pg_recvlogical -> /dev/null", recv, rows)
        b = _report("(b) ReplicationStream raw", ours, rows)
        print(f"ratio (b)/(a) throughput: {a / b:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

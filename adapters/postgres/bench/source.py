"""The PostgreSQL side of `cdcengine bench` (it satisfies `cdcengine.bench.source.BenchSource`).

`open_bench(None)` starts a throwaway server from the machine's binaries (`TempCluster`: fsync and
full_page_writes off, synchronous_commit on; the report says so) with a database `bench`;
`open_bench(dsn)` works in the named database (superuser or a role that may create slots,
publications and tables; the harness drops its slots and publications, `bench_*`, afterwards).

Backlogs are written by one session while nothing consumes them; each ends with a transaction
from the client that reads `pg_current_wal_insert_lsn()` just before its COMMIT (the floor every
consumer must reach, see `Backlog`). The baselines are returned as argv for the harness to time
as processes: `pg_recvlogical` (pgoutput proto 1, same publication) for streaming, `COPY … TO
STDOUT (FORMAT binary)` for bulk reads, `pg_logical_slot_peek_binary_changes` through `COPY` for
SQL decoding; all run with stdout to /dev/null.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdcengine.bench.source import CHECKSUM_FIELDS, Backlog, SteadyStats
from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import parse_lsn
from cdcengine.secrets import mask_dsn
from cdcengine_postgres.connection import connect
from cdcengine_postgres.testing.binaries import find_bindir
from cdcengine_postgres.testing.cluster import TempCluster, start_with_database

__all__ = ["BENCH_DATABASE", "PostgresBench", "open_bench"]

BENCH_DATABASE = "bench"
_APP = "cdcengine-bench"
#: Throwaway server settings beyond TempCluster's defaults: room for many slots and a big backlog.
_SERVER = {"max_wal_size": "16GB", "max_replication_slots": 64, "max_wal_senders": 32,
           "shared_buffers": "256MB", "track_commit_timestamp": "on"}
_FACT_SETTINGS = ("fsync", "full_page_writes", "synchronous_commit", "wal_level",
                  "shared_buffers", "max_wal_size", "logical_decoding_work_mem",
                  "track_commit_timestamp")


def _row(g: str) -> str:
    """The select list of one bench row whose id is the SQL expression `g` (bigint)."""
    return (f"{g}, (({g} * 7919) % 1000000)::int, md5({g}::text) || md5(({g} + 1)::text), "
            f"timestamptz '2024-01-01 00:00:00+00' + {g} * interval '1 second', "
            f"((({g} * 7919) % 10000000) / 100.0)::numeric(12,2), "
            f"jsonb_build_object('k', {g} % 100, 'tag', 'x' || ({g} % 7)::text), "
            f"{g} % 3 = 0, {g} * 0.5")


_DDL = ("CREATE TABLE {t} (id bigint PRIMARY KEY, a int, b text, c timestamptz, "
        "d numeric(12,2), e jsonb, f boolean, g double precision)")
_UPDATE = ("UPDATE {t} SET a = a + 1, d = d + 1, f = NOT f, c = c + interval '1 minute', "
           "g = g + 1 WHERE id = ANY(%s)")
_DELETE = "DELETE FROM {t} WHERE id = ANY(%s)"
_CHECKSUM = """SELECT count(*), coalesce(sum(id), 0), coalesce(sum(a), 0), coalesce(sum(d), 0),
  coalesce(sum(length(b)), 0), count(*) FILTER (WHERE f),
  coalesce(sum((extract(epoch FROM c) * 1000000)::bigint), 0),
  coalesce(sum(length(e::text)), 0) FROM {t}"""


def _ident(table: str) -> sql.Composable:
    return sql.Identifier(*table.split(".", 1))


class PostgresBench:
    def __init__(self, dsn: str, *, cluster: TempCluster | None = None,
                 description: str) -> None:
        self._dsn = dsn
        self._cluster = cluster
        self._description = description
        self._bindir = cluster.bindir if cluster is not None else find_bindir()
        info = conninfo_to_dict(dsn)
        self._password = str(info.pop("password", "") or "")
        self._client_dsn = make_conninfo(**info)  # for the client binaries: no password

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def description(self) -> str:
        return self._description

    def _connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        return connect(self._dsn, autocommit=autocommit, application_name=_APP,
                       connect_timeout=30)

    def _one(self, query: str | sql.Composable, params: Any = None) -> Any:
        with self._connect() as conn:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return row[0]

    def facts(self) -> dict[str, object]:
        with self._connect() as conn:
            settings = dict(conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings "
                "WHERE name = ANY(%s)", [list(_FACT_SETTINGS)]).fetchall())
            version = conn.execute("SHOW server_version").fetchone()
        return {"engine": "postgresql", "version": version[0] if version else None,
                "throwaway_server": self._cluster is not None, "settings": settings,
                "where": self._description}

    def create_table(self, table: str, rows: int = 0) -> None:
        t = _ident(table)
        with self._connect() as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
            conn.execute(sql.SQL(_DDL).format(t=t))  # type: ignore[arg-type]
            step = 1_000_000
            for lo in range(0, rows, step):
                conn.execute(sql.SQL(  # type: ignore[arg-type]
                    "INSERT INTO {t} SELECT " + _row("g") +  # noqa: S608 - fixed text
                    " FROM generate_series({lo}::bigint, {hi}::bigint) g").format(
                        t=t, lo=sql.Literal(lo + 1), hi=sql.Literal(min(rows, lo + step))))
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t))

    def max_id(self, table: str) -> int:
        return int(self._one(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
            _ident(table))))

    def create_publication(self, name: str, table: str) -> None:
        with self._connect() as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(name), _ident(table)))

    def create_slot(self, name: str) -> None:
        self._one("SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput')", [name])

    def drop_slots(self, prefix: str) -> None:
        like = prefix.replace("_", r"\_") + "%"
        with self._connect() as conn:
            deadline = time.monotonic() + 15
            while True:
                left = conn.execute(
                    "SELECT slot_name, active_pid FROM pg_replication_slots "
                    "WHERE slot_name LIKE %s", [like]).fetchall()
                for name, pid in left:
                    if pid is None:
                        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                                     "pg_replication_slots WHERE slot_name = %s AND NOT active",
                                     [name])
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            for (pub,) in conn.execute("SELECT pubname FROM pg_publication WHERE pubname LIKE %s",
                                       [like]).fetchall():
                conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                    sql.Identifier(pub)))

    def current_lsn(self) -> int:
        return parse_lsn(str(self._one("SELECT pg_current_wal_lsn()")))

    def _finish(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        """In the open last transaction: read the floor, commit, read the end."""
        row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        conn.commit()
        end = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        conn.commit()
        assert row is not None
        assert end is not None
        return parse_lsn(str(row[0])), parse_lsn(str(end[0]))

    def insert_backlog(self, table: str, rows: int, txn_rows: int) -> Backlog:
        t = _ident(table)
        start = self.max_id(table)
        txns = max(1, -(-rows // txn_rows))
        insert = sql.SQL("INSERT INTO {t} SELECT " + _row("g") +  # type: ignore[arg-type]  # noqa: S608 - fixed text
                         " FROM generate_series({lo}::bigint, {hi}::bigint) g")
        if txns > 1:  # all but the last transaction: one DO block, COMMIT per transaction
            with self._connect() as conn:
                name = t.as_string(conn)
                conn.execute(  # numbers and a quoted identifier only
                    f"DO $$ DECLARE lo bigint; BEGIN FOR i IN 0 .. {txns - 2} LOOP "  # noqa: S608 - fixed text
                    f"lo := {start} + i::bigint * {txn_rows}; INSERT INTO {name} SELECT "
                    f"{_row('g')} FROM generate_series(lo + 1, lo + {txn_rows}) g; COMMIT; "
                    "END LOOP; END $$")
        lo = start + (txns - 1) * txn_rows
        with self._connect(autocommit=False) as conn:
            conn.execute(insert.format(t=t, lo=sql.Literal(lo + 1),
                                       hi=sql.Literal(start + rows)))
            floor, end = self._finish(conn)
        return Backlog(floor, end, {"I": rows})

    def _pick(self, conn: psycopg.Connection[Any], table: str, n: int, keys: str,
              rng: random.Random, exclude: set[int]) -> list[int]:
        hi = int(conn.execute(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(
            _ident(table))).fetchone()[0])  # type: ignore[index]
        if keys == "recent":
            pool = range(max(1, hi - 2 * n), hi + 1)
            return rng.sample([i for i in pool if i not in exclude], n)
        chosen: set[int] = set()
        while len(chosen) < n:
            i = rng.randint(1, hi)
            if i not in exclude:
                chosen.add(i)
        return sorted(chosen)

    def update_delete_backlog(self, table: str, updates: int, deletes: int, *,
                              keys: str = "random") -> Backlog:
        t = _ident(table)
        rng = random.Random(len(table) * 7919 + updates + deletes)
        ops = {"U": 0, "D": 0}
        with self._connect(autocommit=False) as conn:
            ids = self._pick(conn, table, updates, keys, rng, set())
            if updates:
                cur = conn.execute(sql.SQL(_UPDATE).format(t=t), [ids])  # type: ignore[arg-type]
                ops["U"] = cur.rowcount
            if deletes:
                conn.commit()
                gone = self._pick(conn, table, deletes, keys, rng, set(ids))
                cur = conn.execute(sql.SQL(_DELETE).format(t=t), [gone])  # type: ignore[arg-type]
                ops["D"] = cur.rowcount
            floor, end = self._finish(conn)
        return Backlog(floor, end, {k: v for k, v in ops.items() if v})

    def checksum(self, table: str) -> dict[str, str]:
        with self._connect() as conn:
            row = conn.execute(sql.SQL(_CHECKSUM).format(t=_ident(table))).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return {k: str(v) for k, v in zip(CHECKSUM_FIELDS, row, strict=True)}

    # ---- baselines: argv the harness times as processes (stdout to /dev/null) -------------

    def _bin(self, name: str) -> str:
        return str(Path(self._bindir) / name)

    def baseline_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self._password:
            env["PGPASSWORD"] = self._password
        return env

    def stream_baseline(self, slot: str, publication: str, end_lsn: int) -> list[str]:
        from cdcengine.lsn import format_lsn
        return [self._bin("pg_recvlogical"), "-d", self._client_dsn, "--slot", slot, "--start",
                "--no-loop", "-o", "proto_version=1", "-o", f"publication_names={publication}",
                "--endpos", format_lsn(end_lsn), "-f", "/dev/null"]

    def _psql(self, query: str) -> list[str]:
        return [self._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self._client_dsn,
                "-c", query]

    def sql_decode_baseline(self, slot: str, publication: str) -> list[str]:
        query = ("COPY (SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes("  # noqa: S608 - fixed text
                 f"'{slot}', NULL, NULL, 'proto_version', '1', 'publication_names', "
                 f"'{publication}')) TO STDOUT (FORMAT binary)")
        return self._psql(query)

    def copy_baseline(self, table: str) -> list[str]:
        return self._psql(f"COPY {table} TO STDOUT (FORMAT binary)")

    # ---- live loads ------------------------------------------------------------------------

    def latency_load(self, table: str, *, rate: int, seconds: float) -> dict[str, object]:
        """pgbench at `-R rate` for `seconds`: one-row updates (random ids) and one-row inserts
        (new ids from a sequence), half each."""
        import subprocess

        hi = self.max_id(table)
        seq = f"{table}_bench_seq"
        with self._connect() as conn:
            conn.execute(sql.SQL("DROP SEQUENCE IF EXISTS {}").format(_ident(seq)))
            conn.execute(sql.SQL("CREATE SEQUENCE {} START {}").format(
                _ident(seq), sql.Literal(hi + 1)))
        with tempfile.TemporaryDirectory(prefix="cdcengine-bench-") as tmp:
            upd = Path(tmp) / "update.sql"
            upd.write_text(f"\\set id random(1, {max(hi, 1)})\n"
                           f"UPDATE {table} SET a = a + 1, g = g + 1 WHERE id = :id;\n")
            ins = Path(tmp) / "insert.sql"
            ins.write_text(f"INSERT INTO {table} SELECT {_row('n')} FROM "  # noqa: S608 - fixed text
                           f"(SELECT nextval('{seq}') AS n) s;\n")
            argv = [self._bin("pgbench"), "-n", "-c", "4", "-j", "2", "-R", str(rate),
                    "-T", str(max(1, round(seconds))), "-f", f"{upd}@1", "-f", f"{ins}@1",
                    self._client_dsn]
            done = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  env=self.baseline_env(), timeout=seconds + 120)
        if done.returncode != 0:
            raise CDCError(f"pgbench failed: {done.stderr.strip()[-500:]}",
                           reason=Reason.UNKNOWN)
        summary = [line for line in done.stdout.splitlines()
                   if line.startswith(("number of transactions actually", "latency", "tps"))]
        return {"command": f"pgbench -R {rate} -T {max(1, round(seconds))} -c 4 -j 2 "
                           "(one-row update / insert)", "summary": summary}

    def steady_load(self, table: str, *, rate: int, seconds: float,
                    stop: threading.Event) -> SteadyStats:
        """Every 100 ms one transaction of rate/10 changes (90 % updates, 10 % deletes of random
        ids); the WAL position after each."""
        t = _ident(table)
        rng = random.Random(42)
        per_tick = max(1, rate // 10)
        upd_n = per_tick - per_tick // 10
        updates = deletes = 0
        wal: list[tuple[float, int]] = []
        error: str | None = None
        t0 = time.monotonic()
        try:
            with self._connect(autocommit=False) as conn:
                hi = int(conn.execute(sql.SQL("SELECT max(id) FROM {}").format(t))
                         .fetchone()[0])  # type: ignore[index]
                conn.commit()
                tick = 0
                while not stop.is_set() and time.monotonic() - t0 < seconds:
                    ids = [rng.randint(1, hi) for _ in range(per_tick)]
                    updates += conn.execute(sql.SQL(_UPDATE).format(t=t),  # type: ignore[arg-type]
                                            [ids[:upd_n]]).rowcount
                    deletes += conn.execute(sql.SQL(_DELETE).format(t=t),  # type: ignore[arg-type]
                                            [ids[upd_n:]]).rowcount
                    conn.commit()
                    lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
                    conn.commit()
                    wal.append((time.monotonic(), parse_lsn(str(lsn[0]))))  # type: ignore[index]
                    tick += 1
                    pause = t0 + tick * 0.1 - time.monotonic()
                    if pause > 0:
                        stop.wait(pause)
        except psycopg.Error as exc:
            error = f"{type(exc).__name__}: {exc}"
        return SteadyStats(updates, deletes, time.monotonic() - t0, wal, error)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.cleanup()


def open_bench(dsn: str | None, *, say: Callable[[str], None] = print) -> PostgresBench:
    """The bench's source: the given database, or a throwaway server started here."""
    if dsn is not None:
        return PostgresBench(dsn, description=f"PostgreSQL at {mask_dsn(dsn)}")
    base = Path(os.environ.get("CDCENGINE_BENCH_TMP", tempfile.gettempdir()))
    cluster = TempCluster(_SERVER, base_dir=base)
    dsn = start_with_database(cluster, BENCH_DATABASE, application_name=_APP, say=say,
                              starting="wal_level=logical, fsync off",
                              instead="point the bench at a server with --dsn URL")
    v = cluster.version
    return PostgresBench(
        dsn, cluster=cluster,
        description=f"throwaway PostgreSQL {v // 10000}.{v % 10000} on {cluster.host}:"
                    f"{cluster.port} (fsync off, full_page_writes off; removed at the end)")

"""The snapshot's per-row libpq read loop alone (`replication.copy_reader.read_copy`, pieces
handed to a no-op consumer) against psycopg's own copy iterator, on 2M rows of the bench table
in a throwaway cluster: wall seconds and the reading thread's CPU seconds. 3 rounds.

    .venv/bin/python benchmarks/copy_reader_bench.py [rows]

(Used in RESULTS.md, issue 16's snapshot miss: the loop's CPU per row, and whether it keeps the
server's pace.)
"""

from __future__ import annotations

import sys
import time

import psycopg

from cdcengine_postgres.bench.source import _DDL, _row
from cdcengine_postgres.replication.copy_reader import read_copy
from cdcengine_postgres.testing.cluster import TempCluster

QUERY = "COPY (SELECT * FROM bt) TO STDOUT (FORMAT binary)"


def main(rows: int) -> None:
    with TempCluster({"fsync": "off"}) as cluster, \
            psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute(_DDL.replace("{t}", "bt"))
        conn.execute(f"INSERT INTO bt SELECT {_row('g')} "  # noqa: S608 - fixed text
                     f"FROM generate_series(1, {rows}::bigint) g")
        conn.execute("VACUUM ANALYZE bt")
        for rnd in range(3):
            got: list[int] = []
            wall, cpu = time.perf_counter(), time.thread_time()
            read_copy(conn, QUERY.encode(), binary=True, piece_rows=100_000,
                      piece_bytes=16 << 20, put=lambda p, got=got: got.append(p.rows) or True)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            assert sum(got) == rows
            print(f"round {rnd + 1} read_copy: wall {wall:.2f} s, thread CPU {cpu:.2f} s "
                  f"({cpu / rows * 1e6:.2f} µs/row)", flush=True)
            wall = time.perf_counter()
            with conn.cursor() as cur, cur.copy(QUERY) as copy:
                for _ in copy:
                    pass
            print(f"round {rnd + 1} psycopg copy iterator: wall {time.perf_counter() - wall:.2f} s",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000)

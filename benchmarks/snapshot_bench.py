"""Snapshot throughput: `cdcengine.pipeline.snapshots.snapshot_table` beside a raw COPY, same run.

1. starts a throwaway `TempCluster` (or uses `--dsn`), creates `snap_bench(id bigint pk,
   customer int, amount numeric(12,2), note text(40), created_at timestamptz)` with `--rows`
   rows and ANALYZEs it;
2. raw leg: `COPY (SELECT …) TO STDOUT` (text) through psycopg, every CopyData read and
   discarded (what any client must at least do);
3. engine leg: the full chunked snapshot into a fresh Delta table (temporary slot + exported
   snapshot, key-range chunks, `--workers` connections, COPY → Arrow → Delta, one commit per
   chunk, final commit), for each worker count given;
4. prints rows/s of each leg (median of `--repeat`) and the engine/raw ratio.

    .venv/bin/python benchmarks/snapshot_bench.py [--rows 1000000] [--workers 1,2]
        [--chunk-rows 100000] [--repeat 3] [--dsn URL] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from cdcengine.config import SourceConfig
from cdcengine.pipeline.snapshots import snapshot_table
from cdcengine.sink.delta import DeltaSink
from cdcengine.source.registry import adapter_for
from cdcengine.state import open_state

RAW_COPY = "COPY (SELECT id, customer, amount, note, created_at FROM snap_bench) TO STDOUT"


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from cdcengine_postgres.testing.cluster import TempCluster

    with TempCluster({"max_wal_size": "4GB", "shared_buffers": "512MB"}) as cluster:
        yield cluster.admin_dsn


def load(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS snap_bench")
        conn.execute("CREATE TABLE snap_bench (id bigint PRIMARY KEY, customer int, "
                     "amount numeric(12,2), note text, created_at timestamptz)")
        conn.execute("INSERT INTO snap_bench SELECT i, i %% 5000, (i %% 100000) / 100.0, "
                     "md5(i::text) || 'abcdefgh', timestamptz '2024-01-01' + i * interval '1 s' "
                     "FROM generate_series(1, %s) i", [rows])
        conn.execute("VACUUM ANALYZE snap_bench")


def raw_copy(dsn: str) -> tuple[int, float]:
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        n = 0
        with conn.cursor().copy(RAW_COPY) as copy:
            for _ in copy:
                n += 1
        return n, time.perf_counter() - started


def engine(dsn: str, work: Path, workers: int, chunk_rows: int) -> tuple[int, float, int]:
    lake = work / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    src = SourceConfig(name="bench", dsn=dsn, tables=("public.snap_bench",),
                       destination=str(lake), snapshot_workers=workers,
                       snapshot_chunk_rows=chunk_rows)
    sink = DeltaSink(src.destination, source=src.name)
    with open_state("sqlite:///" + str(work / "state.db")) as store:
        started = time.perf_counter()
        out = snapshot_table(adapter_for(src), src, src.table_config("public.snap_bench"), sink,
                             store, stop=threading.Event(), progress_every_s=3600)
        elapsed = time.perf_counter() - started
    assert out.finished
    return out.rows_copied, elapsed, out.chunks_total


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--chunk-rows", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dsn")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, object] = {"rows": args.rows, "cpus": os.cpu_count(),
                                  "chunk_rows": args.chunk_rows}
    with server(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="snap-bench-") as tmp:
        load(dsn, args.rows)
        raw = []
        for _ in range(args.repeat):
            n, s = raw_copy(dsn)
            raw.append(n / s)
        results["raw_copy_rows_per_s"] = round(statistics.median(raw))
        for w in workers:
            rates = []
            chunks = 0
            for _ in range(args.repeat):
                n, s, chunks = engine(dsn, Path(tmp), w, args.chunk_rows)
                assert n == args.rows, n
                rates.append(n / s)
            results[f"engine_w{w}_rows_per_s"] = round(statistics.median(rates))
            results[f"engine_w{w}_chunks"] = chunks
            results[f"ratio_w{w}"] = round(statistics.median(rates) / statistics.median(raw), 2)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{args.rows:,} rows, {results['cpus']} CPUs, chunk_rows {args.chunk_rows:,}, "
              f"median of {args.repeat}")
        print(f"| leg | rows/s | × raw |\n|---|---|---|\n"
              f"| raw COPY TO STDOUT (psycopg, discarded) | {results['raw_copy_rows_per_s']:,} "
              f"| 1.00 |")
        for w in workers:
            print(f"| snapshot → Delta, {w} worker(s), {results[f'engine_w{w}_chunks']} chunks | "
                  f"{results[f'engine_w{w}_rows_per_s']:,} | {results[f'ratio_w{w}']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

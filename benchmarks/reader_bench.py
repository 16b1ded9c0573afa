"""The engine's reading thread without a server: pgoutput frames -> events -> batcher -> Arrow.

Why: `e2e_bench.py` showed the reading thread is the end-to-end limit, but its rate moves with
the walsender and the machine's load. This replays synthetic frames of `e2e_bench`'s table
(`id bigint, customer int, amount numeric(12,2), note text (40 chars), created_at timestamptz`,
1000-row transactions) through the same code the pipeline runs on its reading thread --
`PostgresChanges.events` (with a stand-in for the replication stream), `Batcher.add`, and
`Batcher.take` every `--batch-rows` rows (text -> typed Arrow included) -- and prints µs per row.
The Delta writer is not involved.

    .venv/bin/python benchmarks/reader_bench.py [--rows 300000] [--batch-rows 100000]
        [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from cdcengine.config import SourceConfig
from cdcengine.events import Commit
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import Batcher, CaptureSpec
from cdcengine_postgres.replication.changes import PostgresChanges
from cdcengine_postgres.replication.frames import XLogData
from cdcengine_postgres.types.mapping import PgType

RELID = 16400
REF = TableRef("public", "e2e_bench")
_PG_EPOCH_US = 946_684_800_000_000
_TYPES = {
    20: PgType("int8", 20, "b", "N", -1),
    23: PgType("int4", 23, "b", "N", -1),
    1700: PgType("numeric", 1700, "b", "N", -1),
    25: PgType("text", 25, "b", "S", -1),
    1184: PgType("timestamptz", 1184, "b", "D", -1),
}
_COLS = (("id", 20, -1, True), ("customer", 23, -1, False),
         ("amount", 1700, ((12 << 16) | 2) + 4, False), ("note", 25, -1, False),
         ("created_at", 1184, -1, False))


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def relation_msg() -> bytes:
    body = struct.pack(">I", RELID) + _cstr("public") + _cstr("e2e_bench") + b"d"
    body += struct.pack(">h", len(_COLS))
    for name, oid, typmod, key in _COLS:
        body += bytes([1 if key else 0]) + _cstr(name) + struct.pack(">Ii", oid, typmod)
    return b"R" + body


def insert_msg(g: int) -> bytes:
    secs = 1_704_067_200 + g
    tm = time.gmtime(secs)
    values = [
        str(g).encode(), str(g % 100000).encode(), b"%d.%02d" % divmod((g * 7919) % 10000000, 100),
        (b"%032x" % (g * 2654435761 % (1 << 128)))[:32] + b"abcdef01",
        time.strftime("%Y-%m-%d %H:%M:%S+00", tm).encode(),
    ]
    out = b"I" + struct.pack(">I", RELID) + b"N" + struct.pack(">h", len(values))
    for v in values:
        out += b"t" + struct.pack(">i", len(v)) + v
    return out


def frames(rows: int, txn_rows: int) -> list[bytes]:
    out = [relation_msg()]
    lsn = 0x1000000
    for t in range(rows // txn_rows):
        out.append(b"B" + struct.pack(">QqI", lsn + 100, 0, 1000 + t))
        out += [insert_msg(t * txn_rows + i + 1) for i in range(txn_rows)]
        out.append(b"C" + struct.pack(">BQQq", 0, lsn + 100, lsn + 150, 0))
        lsn += 200
    return out


class _FakeStream:
    """Stands in for `ReplicationStream`: hands out the prepared payloads (fresh copies with
    `copy`, so they are freed once the engine lets go of them, as with a real stream)."""

    def __init__(self, payloads: list[bytes], copy: bool = False) -> None:
        it: Iterator[bytes] = iter(payloads)
        self._it = (bytes(bytearray(p)) for p in it) if copy else it
        self.keepalive_lsn = 0

    def read(self, timeout_s: float) -> XLogData | None:
        p = next(self._it, None)
        return None if p is None else XLogData(0, 0, 0, p)

    def read_payloads(self, timeout_s: float, limit: int) -> list[bytes]:
        out = []
        for p in self._it:
            out.append(p)
            if len(out) >= limit:
                break
        return out


def _session(payloads: list[bytes], tmp: Path, copy: bool = False) -> PostgresChanges:
    src = SourceConfig(name="bench", dsn="postgresql://x@127.0.0.1/x",
                       tables=("public.e2e_bench",), destination=str(tmp / "delta"))
    ses = PostgresChanges(src, spill_dir=tmp)
    ses._stream = _FakeStream(payloads, copy)  # type: ignore[assignment]
    ses._types = dict(_TYPES)
    return ses


def run_once(payloads: list[bytes], batch_rows: int, tmp: Path,
             copy: bool = False) -> tuple[float, int]:
    ses = _session(payloads, tmp, copy)
    batcher = Batcher({REF: CaptureSpec(ref=REF)}, ses.converters, max_rows=batch_rows,
                      max_bytes=256 << 20, flush_interval_s=3600, spill_dir=tmp)
    rows = 0
    add = batcher.add
    t0 = time.perf_counter()
    while True:
        n = 0
        for event in ses.events(0):
            n += 1
            add(event)
            if type(event) is Commit and batcher.ready():
                rows += batcher.take().rows  # type: ignore[union-attr]
        if n == 0:
            break
    if batcher.version is not None:
        rows += batcher.take().rows  # type: ignore[union-attr]
    return time.perf_counter() - t0, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--txn-rows", type=int, default=1000)
    ap.add_argument("--batch-rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--memory", action="store_true",
                    help="one run with fresh payload copies; print the peak RSS it added")
    args = ap.parse_args()
    payloads = frames(args.rows, args.txn_rows)
    tmp = Path("/tmp/reader-bench")
    tmp.mkdir(exist_ok=True)
    if args.memory:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        secs, rows = run_once(payloads, args.batch_rows, tmp, copy=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pool = pa.default_memory_pool().max_memory() / 2**20
        print(f"{rows} rows in {secs:.3f} s; peak RSS {before:.0f} -> {after:.0f} MB "
              f"(+{after - before:.0f}); Arrow pool peak {pool:.0f} MB")
        return 0
    best = float("inf")
    for _ in range(args.repeat):
        secs, rows = run_once(payloads, args.batch_rows, tmp)
        assert rows == args.rows, rows
        best = min(best, secs)
        print(f"{rows} rows in {secs:.3f} s: {secs / rows * 1e6:.2f} µs/row "
              f"({rows / secs:,.0f} rows/s)")
    print(f"best: {best / args.rows * 1e6:.2f} µs/row")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_once(payloads, args.batch_rows, tmp)
        prof.disable()
        stats: Any = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

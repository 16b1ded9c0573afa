"""Decode-only throughput of the pgoutput decoder: N synthetic 8-column Insert messages.

Why a script and not a test: timing assertions are flaky on shared CI machines, but the
decoder is on the engine's hot path (every row of every transaction goes through it), so a
regression should be easy to spot by hand. Target: >= 250k rows/s on a 2-core box.

Usage: ``.venv/bin/python benchmarks/decode_bench.py [rows]`` (default 1,000,000).
The row shape mimics research/scripts/bench_insert.py's table: bigint id, int, two short
texts, numeric, timestamptz, bool, one NULL.
"""

from __future__ import annotations

import struct
import sys
import time

from cdcengine_postgres.replication.pgoutput import decode


def _text(value: bytes) -> bytes:
    return b"t" + struct.pack(">i", len(value)) + value


def insert_message(i: int) -> bytes:
    """One v1 'I' message: relid, 'N', 8 columns (7 text, 1 NULL)."""
    cols = [
        _text(str(i).encode()),
        _text(str(i % 1000).encode()),
        _text(b"customer-%d" % (i % 5000)),
        _text(b"some moderately long note text for row %d" % i),
        _text(b"%d.%02d" % (i % 100000, i % 100)),
        _text(b"2024-01-01 00:00:%02d.123456+00" % (i % 60)),
        _text(b"t" if i % 2 else b"f"),
        b"n",
    ]
    return b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">h", len(cols)) + b"".join(cols)


def main(argv: list[str]) -> int:
    rows = int(argv[1]) if len(argv) > 1 else 1_000_000
    # 1000 distinct messages cycled: realistic sizes without spending the run building input.
    pool = [insert_message(i) for i in range(1000)]
    messages = (pool * (rows // len(pool) + 1))[:rows]
    total_bytes = sum(len(m) for m in messages)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for m in messages:
            decode(m, in_stream=False)
        elapsed = time.perf_counter() - start
        best = max(best, rows / elapsed)
        print(
            f"{rows} rows in {elapsed:.2f} s: {rows / elapsed:,.0f} rows/s, "
            f"{total_bytes / elapsed / 1e6:.1f} MB/s"
        )
    print(f"best: {best:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

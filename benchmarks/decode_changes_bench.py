"""The reading thread's cost of 100k UPDATE + 10k DELETE pgoutput messages, in-process: the
change session packs them (`PostgresChanges.decode`), the batcher buffers them and `take()`
builds the batch. Converters pass the text through, so type conversion is excluded: this
measures decoding and batching only. Best of 3.

    .venv/bin/python benchmarks/decode_changes_bench.py            # this checkout
    /other/checkout/.venv/bin/python benchmarks/decode_changes_bench.py   # another build

(Used in RESULTS.md, issue 16: 3.6 s before, 0.3 s after, same minutes.)
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "unit"), str(ROOT / "tests")]

from test_pgoutput import begin, commit, delete, relation, update  # noqa: E402

from cdcengine.config import SourceConfig  # noqa: E402
from cdcengine.names import TableRef  # noqa: E402
from cdcengine.pipeline.batcher import Batcher, CaptureSpec  # noqa: E402
from cdcengine_postgres.replication.changes import PostgresChanges  # noqa: E402


def _passthrough(values: object) -> tuple[pa.Array, int]:
    return (values if isinstance(values, pa.Array) else pa.array(values, pa.binary())), 0


def main() -> None:
    cols = (("id", 20, -1, True), *((f"c{i}", 25, -1, False) for i in range(7)))
    rng = random.Random(1)
    msgs = [relation(1, "t", cols=cols), begin(1, final_lsn=0x100)]
    for i in range(100_000):
        msgs.append(update(1, [str(i).encode()]
                           + [b"value-%d" % rng.randint(0, 10**9) for _ in range(7)]))
    for i in range(10_000):
        msgs.append(delete(1, [str(i).encode()] + [None] * 7))
    msgs.append(commit(commit_lsn=0x100, end_lsn=0x108))
    table = TableRef("public", "t")
    best = float("inf")
    for rep in range(3):
        tmp = Path(tempfile.mkdtemp())
        src = SourceConfig(name="s", dsn="postgresql://u@127.0.0.1/d", tables=("public.t",),
                           destination=str(tmp / "lake"))
        session = PostgresChanges(src, spill_dir=tmp)
        batcher = Batcher({table: CaptureSpec(ref=table)},
                          lambda r: [_passthrough] * len(r.columns), max_rows=10**9,
                          max_bytes=256 << 20, flush_interval_s=3600, spill_dir=tmp)
        t0 = time.perf_counter()
        for i in range(0, len(msgs), 2000):  # the stream's drain size
            for ev in session.decode(msgs[i:i + 2000]):
                batcher.add(ev)
        batch = batcher.take()
        seconds = time.perf_counter() - t0
        best = min(best, seconds)
        assert batch is not None
        print(f"rep {rep}: {seconds:.3f} s, {batch.rows:,} rows")
    print(f"best {best:.3f} s = {110_000 / best:,.0f} changes/s")


if __name__ == "__main__":
    main()

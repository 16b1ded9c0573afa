"""One `write_deltalake` of 1M rows shaped like the bench table (8 columns + engine columns),
per Parquet writer setting: wall seconds, CPU seconds of the whole process (delta-rs's threads
included) and the bytes written. In-process, 3 rounds, settings alternating within a round.

    .venv/bin/python benchmarks/parquet_settings_bench.py [setting …]

The figures behind `sink/delta/spool.py` `PARQUET_COMPRESSION` (issue 16): the engine's
`WRITER_PROPERTIES` is the `engine` setting; `old` is what deltalake wrote before it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from deltalake import ColumnProperties, WriterProperties, write_deltalake

from cdcengine.sink.delta.spool import ROW_GROUP_ROWS, WRITER_PROPERTIES

N = 1_000_000
NO_DICT = ColumnProperties(dictionary_enabled=False)
SETTINGS = {
    "old": WriterProperties(max_row_group_size=ROW_GROUP_ROWS),
    "engine": WRITER_PROPERTIES,
    "snappy": WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="SNAPPY"),
    "nodict_snappy": WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="SNAPPY",
                                      default_column_properties=NO_DICT),
    "nodict_lz4": WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="LZ4_RAW",
                                   default_column_properties=NO_DICT),
    "nodict_uncompressed": WriterProperties(max_row_group_size=ROW_GROUP_ROWS,
                                            default_column_properties=NO_DICT),
}


def table() -> pa.Table:
    ids = np.arange(1, N + 1, dtype=np.int64)
    return pa.table({
        "id": ids,
        "a": ((ids * 7919) % 1_000_000).astype(np.int32),
        "b": pa.array([hashlib.md5(str(i).encode()).hexdigest() * 2 for i in range(N)]),
        "c": pa.array((ids * 1_000_000 + 1_704_067_200_000_000).astype("datetime64[us]"))
               .cast(pa.timestamp("us", tz="UTC")),
        "d": pa.array(((ids * 7919) % 10_000_000) / 100.0).cast(pa.decimal128(12, 2)),
        "e": pa.array([f'{{"k": {i % 100}, "tag": "x{i % 7}"}}' for i in range(N)]),
        "f": pa.array(ids % 3 == 0),
        "g": ids * 0.5,
        "_cdc_lsn": np.full(N, 123_456_789, dtype=np.int64),
        "_cdc_deleted": np.zeros(N, dtype=bool),
    })


def main(names: list[str]) -> None:
    data = table()
    print(f"{N:,} rows, {data.nbytes / 1e6:.0f} MB of Arrow")
    for rnd in range(3):
        for name in names:
            where = tempfile.mkdtemp()
            cpu, wall = time.process_time(), time.perf_counter()
            write_deltalake(where, data, writer_properties=SETTINGS[name])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(where)
                       for f in fs)
            shutil.rmtree(where)
            print(f"round {rnd + 1} {name:20} wall {wall:.3f} s  cpu {cpu:.3f} s  "
                  f"{size / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))

"""Throughput of `cdcengine_postgres.types.convert.to_arrow`: values per second per column type.

Each case converts one column of N text values, exactly as pgoutput or COPY deliver them, from a
Python list of bytes (so the time includes building the Arrow binary array) to its SPEC §6 Arrow
type. Input generation is not timed. Reports the median of `--repeat` runs.

    .venv/bin/python benchmarks/convert_bench.py [--rows 1000000] [--repeat 3] [--json]

Target (task brief): >= 2M values/s for int8, numeric(12,2), timestamptz, text and bool.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.copy_text import parse_copy_text
from cdcengine_postgres.types.mapping import PgType

NUMERIC_12_2 = ((12 << 16) | 2) + 4


def base(name: str, oid: int, typmod: int = -1) -> PgType:
    return PgType(name, oid, "b", "N", typmod)


CASES: dict[str, tuple[PgType, Callable[[int], bytes | None]]] = {
    "int8": (base("int8", 20), lambda i: str(i * 7919 - 10**9).encode()),
    "numeric(12,2)": (
        base("numeric", 1700, NUMERIC_12_2),
        lambda i: f"{(i * 7919) % 10**9}.{i % 100:02d}".encode(),
    ),
    "timestamptz": (
        base("timestamptz", 1184),
        lambda i: (
            f"2024-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:"
            f"{(i * 7) % 60:02d}.{i % 1000000:06d}+00"
        ).encode(),
    ),
    "text": (base("text", 25), lambda i: f"customer-{i:08d} ünïcode {i % 97}".encode()),
    "bool": (base("bool", 16), lambda i: b"t" if i % 3 else b"f"),
    "float8": (base("float8", 701), lambda i: repr(i / 7).encode()),
    "date": (base("date", 1082), lambda i: f"20{i % 100:02d}-{1 + i % 12:02d}-15".encode()),
    "timestamptz with 1% infinity": (
        base("timestamptz", 1184),
        lambda i: b"infinity" if i % 100 == 0 else b"2024-05-06 07:08:09.123456+00",
    ),
    "bytea (16 bytes)": (base("bytea", 17), lambda i: b"\\x" + f"{i:032x}".encode()),
    "int4[] (3 elements)": (
        PgType("_int4", 1007, "b", "A", -1, element=base("int4", 23)),
        lambda i: f"{{{i},{i + 1},NULL}}".encode(),
    ),
    "text[] (quoted)": (
        PgType("_text", 1009, "b", "A", -1, element=base("text", 25)),
        lambda i: f'{{"a b {i}",c,NULL}}'.encode(),
    ),
}


def timed(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    report: dict[str, dict[str, float]] = {}
    for name, (pgtype, make) in CASES.items():
        values = [make(i) for i in range(args.rows)]
        seconds = timed(lambda v=values, t=pgtype: to_arrow(v, t), args.repeat)  # type: ignore[misc]
        report[name] = {"seconds": seconds, "values_per_s": args.rows / seconds}
        del values

    # COPY text → columns → typed arrays (the snapshot path), 5 columns per row.
    row = b"%d\t1234.56\t2024-05-06 07:08:09.123456+00\tsome text value\tt\n"
    chunk = b"".join(row % i for i in range(args.rows))
    types = [CASES[n][0] for n in ("int8", "numeric(12,2)", "timestamptz", "text", "bool")]

    def copy_path() -> None:
        for column, pgtype in zip(parse_copy_text(chunk, 5), types, strict=True):
            to_arrow(column, pgtype)

    seconds = timed(copy_path, args.repeat)
    report["COPY chunk → 5 typed columns (rows)"] = {
        "seconds": seconds,
        "values_per_s": args.rows / seconds,
    }

    if args.json:
        print(json.dumps({"rows": args.rows, "repeat": args.repeat, "results": report}))
        return
    print(f"{args.rows:,} values per column, median of {args.repeat}")
    for name, r in report.items():
        print(f"  {name:38s} {r['seconds'] * 1000:8.1f} ms  {r['values_per_s'] / 1e6:6.2f} M/s")


if __name__ == "__main__":
    main()

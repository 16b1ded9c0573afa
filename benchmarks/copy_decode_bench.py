"""The snapshot's column-wise decode alone (`types.copy_binary.decode_copy_binary`) on 2M rows
of the bench table, read once from a throwaway cluster with `read_copy` in 100k-row pieces:
CPU seconds of the decode per layout, 3 rounds each, alternating.

    .venv/bin/python benchmarks/copy_decode_bench.py [rows]

Layouts: `table order, numeric as ::text, validated` (the columns as the table lists them: only
the two leading fixed-width ones read as one record; numeric(12,2) as text, cast by Arrow; UTF-8
validated) against `wire order, numeric binary, utf8` (what a snapshot of this table does now:
fixed-width columns first, numeric decoded from its binary digits, no validation pass on a UTF8
server). Used in RESULTS.md (issue 16, snapshot).
"""

from __future__ import annotations

import sys
import time

import psycopg

from cdcengine_postgres.bench.source import open_bench
from cdcengine_postgres.replication.copy_reader import CopyPiece, read_copy
from cdcengine_postgres.types.copy_binary import BinaryColumn, decode_copy_binary, plan_binary
from cdcengine_postgres.types.mapping import PgType


def _t(name: str, oid: int, category: str, typmod: int = -1) -> PgType:
    return PgType(name, oid, "b", category, typmod)


TYPES = {"id": _t("int8", 20, "N"), "a": _t("int4", 23, "N"), "b": _t("text", 25, "S"),
         "c": _t("timestamptz", 1184, "D"), "d": _t("numeric", 1700, "N", 786438),
         "e": _t("jsonb", 3802, "U"), "f": _t("bool", 16, "B"), "g": _t("float8", 701, "N")}


def _layout(order: list[str], numeric_binary: bool) -> tuple[str, list[BinaryColumn]]:
    plan = plan_binary([(n, TYPES[n]) for n in order])
    assert plan is not None
    if not numeric_binary:
        plan = [BinaryColumn(c.name, c.pg_type, "text") if c.decoder == "numeric" else c
                for c in plan]
    select = ", ".join(f"{c.name}::text" if c.decoder == "text" else c.name for c in plan)
    return f"COPY (SELECT {select} FROM bt) TO STDOUT (FORMAT binary)", plan  # noqa: S608


def main(rows: int) -> None:
    layouts = {
        "table order, numeric as ::text, validated":
            (*_layout(["id", "a", "b", "c", "d", "e", "f", "g"], False), False),
        "wire order, numeric binary, utf8":
            (*_layout(["id", "a", "c", "f", "g", "b", "d", "e"], True), True),
    }
    bench = open_bench(None)  # a throwaway server; the bench table as `cdcengine bench` makes it
    try:
        bench.create_table("public.bt", rows)
        pieces = _read(bench.dsn, layouts, rows)
    finally:
        bench.close()
    for rnd in range(3):
        for name, (_query, plan, utf8) in layouts.items():
            cpu = time.thread_time()
            for p in pieces[name]:
                decode_copy_binary(p.data, p.row_lengths, plan, utf8=utf8)
            cpu = time.thread_time() - cpu
            print(f"round {rnd + 1} {name}: {cpu:.2f} CPU-s ({cpu / rows * 1e6:.2f} µs/row)",
                  flush=True)


def _read(dsn: str, layouts: dict[str, tuple[str, list[BinaryColumn], bool]],
          rows: int) -> dict[str, list[CopyPiece]]:
    pieces: dict[str, list[CopyPiece]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, (query, _plan, _utf8) in layouts.items():
            got: list[CopyPiece] = []
            read_copy(conn, query.encode(), binary=True, piece_rows=100_000,
                      piece_bytes=32 << 20, put=lambda p, got=got: got.append(p) or True)
            assert sum(p.rows for p in got) == rows
            pieces[name] = got
    return pieces


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000)

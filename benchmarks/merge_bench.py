"""Cost of `DeltaSink.write_consolidated`: 100k changes merged into a 1M (or 10M) row table.

Each scenario copies a prepared base table, then times ONE `write_consolidated` call (fold, key
check, optional unresolved-TOAST probe, merge with the txn action, commit) and reads the merge's
own metrics from the Delta history. Reports the median of `--repeat` runs.

Batches (100k changes, 8 columns like the research baseline, 20% of updates leave the `payload`
TOAST column unchanged, 5% of keys changed twice so the fold has work):
- random: 50% updates and 10% deletes on random existing ids, 40% inserts of new ids -> touches
  every file of the table;
- recent: the same mix on the newest 500k ids (plus new ids) -> with the table stored as small
  files, the key-range predicate and `streamed_exec=False` let delta-rs skip the other files.

    .venv/bin/python benchmarks/merge_bench.py [--rows 1000000] [--changes 100000]
        [--file-mb 32] [--repeat 3] [--no-range] [--json] [--workdir /tmp/cdcengine-merge-bench]

`--no-range` drops the explicit key-range term from the merge predicate (to measure what it adds
over delta-rs's own early pruning).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink, quote_ident
from cdcengine.sink.delta import writes as delta_writes

REF = TableRef("public", "bench")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("customer", pa.int32()),
        ("amount", pa.decimal128(12, 2)),
        ("status", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("note", pa.string()),
        ("flag", pa.bool_()),
        ("payload", pa.string()),
        ("_cdc_op", pa.string()),
        ("_cdc_lsn", pa.int64()),
        ("_cdc_seq", pa.int64()),
        ("_cdc_committed_at", pa.timestamp("us", tz="UTC")),
        ("_cdc_unchanged", pa.list_(pa.string())),
    ]
)


def rows(ids: pa.Array, generation: int, op: str | pa.Array, lsn: int) -> pa.Table:
    """Typed rows for `ids`; values derived from id and generation (no per-row Python)."""
    n = len(ids)
    ids = ids.cast(pa.int64())
    g = pa.scalar(generation, pa.int64())
    customer = pc.cast(pc.add(pc.multiply(ids, 7), g), pa.int64())
    customer = pc.cast(
        pc.subtract(customer, pc.multiply(pc.divide(customer, 100_000), 100_000)), pa.int32()
    )
    amount = pc.cast(pc.divide(pc.cast(pc.add(ids, g), pa.float64()), 7.0), pa.decimal128(12, 2))
    status = pc.binary_join_element_wise("status-", pc.cast(customer, pa.string()), "")
    created = pc.cast(pc.add(pc.multiply(ids, 1_000_000), 1_700_000_000_000_000), pa.int64())
    note = pc.binary_join_element_wise(
        "note ", pc.cast(ids, pa.string()), " generation ", pc.cast(g, pa.string()), ""
    )
    payload = pc.binary_join_element_wise(
        '{"k": ', pc.cast(ids, pa.string()), ', "pad": "' + "x" * 64 + '"}', ""
    )
    ops = pa.array([op] * n, pa.string()) if isinstance(op, str) else op
    return pa.table(
        {
            "id": ids,
            "customer": customer,
            "amount": amount,
            "status": status,
            "created_at": created.cast(pa.timestamp("us", tz="UTC")),
            "note": note,
            "flag": pc.equal(pc.bit_wise_and(ids, 1), 0),
            "payload": payload,
            "_cdc_op": ops,
            "_cdc_lsn": pa.nulls(n, pa.int64()).fill_null(lsn),
            "_cdc_seq": pc.indices_nonzero(pa.nulls(n, pa.bool_()).fill_null(True)).cast(
                pa.int64()
            ),
            "_cdc_committed_at": pa.nulls(n, pa.int64())
            .fill_null(0)
            .cast(SCHEMA.field("_cdc_committed_at").type),
            "_cdc_unchanged": pa.nulls(n, pa.list_(pa.string())),
        },
        schema=SCHEMA,
    )


def change_batch(n_rows: int, n_changes: int, *, recent: bool, seed: int, lsn: int) -> pa.Table:
    """50% U / 10% D on existing ids, 40% I of new ids, 5% of changed keys touched twice."""
    rnd = random.Random(seed)
    n_upd, n_ins = n_changes // 2, n_changes * 4 // 10
    n_del = n_changes - n_upd - n_ins
    low = max(0, n_rows - 500_000) if recent else 0
    existing = rnd.sample(range(low, n_rows), n_upd + n_del)
    upd, dele = existing[:n_upd], existing[n_upd:]
    ins = list(range(n_rows, n_rows + n_ins))
    parts = [
        rows(pa.array(upd, pa.int64()), 1, "U", lsn),
        rows(pa.array(ins, pa.int64()), 2, "I", lsn),
        rows(pa.array(dele, pa.int64()), 3, "D", lsn),
    ]
    again = rnd.sample(upd + ins, n_changes // 20)  # a later update of the same key, TOAST kept
    second = rows(pa.array(again, pa.int64()), 4, "U", lsn)
    second = second.set_column(
        second.schema.get_field_index("_cdc_unchanged"),
        "_cdc_unchanged",
        pa.array([["payload"]] * len(again), pa.list_(pa.string())),
    )
    second = second.set_column(
        second.schema.get_field_index("payload"), "payload", pa.nulls(len(again), pa.string())
    )
    batch = pa.concat_tables([*parts, second])
    # 20% of the first updates leave payload unchanged too (resolved from the stored row)
    unchanged = pa.array(
        [["payload"] if i < n_upd and rnd.random() < 0.2 else None for i in range(batch.num_rows)],
        pa.list_(pa.string()),
    )
    first = pc.is_valid(unchanged)
    batch = batch.set_column(
        batch.schema.get_field_index("_cdc_unchanged"),
        "_cdc_unchanged",
        pc.if_else(first, unchanged, batch.column("_cdc_unchanged")),
    )
    batch = batch.set_column(
        batch.schema.get_field_index("payload"),
        "payload",
        pc.if_else(first, pa.scalar(None, pa.string()), batch.column("payload")),
    )
    seq = pc.indices_nonzero(pa.nulls(batch.num_rows, pa.bool_()).fill_null(True))
    return batch.set_column(
        batch.schema.get_field_index("_cdc_seq"), "_cdc_seq", seq.cast(pa.int64())
    )


def build_base(workdir: Path, n_rows: int, file_mb: int) -> Path:
    dest = workdir / f"base_{n_rows}_{file_mb}mb"
    if (dest / "public" / "bench" / "_delta_log").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    sink = DeltaSink(str(dest), source="bench", target_file_size=file_mb * 1024 * 1024)
    started = time.perf_counter()
    step = 1_000_000
    for i, start in enumerate(range(0, n_rows, step)):
        ids = pc.add(
            pc.indices_nonzero(pa.nulls(min(step, n_rows - start), pa.bool_()).fill_null(True)),
            pa.scalar(start, pa.uint64()),
        )
        batch = rows(ids, 0, "I", 1 + i)
        sink.write_consolidated(REF, batch, key=["id"], version=1 + i)
    files = len(DeltaTable(sink.path(REF, "consolidated")).file_uris())
    print(
        f"base table {n_rows:,} rows, {files} files (target {file_mb} MB): "
        f"{time.perf_counter() - started:.1f} s to build",
        flush=True,
    )
    return dest


def _predicate_without_range(source: pa.Table, keys: list[str]) -> str:
    q = quote_ident
    return " AND ".join(f"t.{q(k)} = s.{q(k)}" for k in keys)


def run(
    base: Path, workdir: Path, batch: pa.Table, version: int
) -> tuple[float, dict[str, object]]:
    work = workdir / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    sink = DeltaSink(str(work), source="bench")
    started = time.perf_counter()
    result = sink.write_consolidated(REF, batch, key=["id"], version=version)
    seconds = time.perf_counter() - started
    metrics = DeltaTable(sink.path(REF, "consolidated")).history(1)[0]["operationMetrics"]
    assert not result.skipped
    return seconds, {
        "rows_written": result.rows_written,
        "inserted": result.inserted,
        "updated": result.updated,
        "files_scanned": metrics.get("num_target_files_scanned"),
        "files_skipped": metrics.get("num_target_files_skipped_during_scan"),
        "files_removed": metrics.get("num_target_files_removed"),
        "rows_copied": metrics.get("num_target_rows_copied"),
        "scan_ms": metrics.get("scan_time_ms"),
        "rewrite_ms": metrics.get("rewrite_time_ms"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--file-mb", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-range", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", default="/tmp/cdcengine-merge-bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.no_range:
        delta_writes._merge_predicate = _predicate_without_range  # type: ignore[assignment]

    base = build_base(workdir, args.rows, args.file_mb)
    report = []
    for name, recent in (("random", False), ("recent", True)):
        batch = change_batch(args.rows, args.changes, recent=recent, seed=11, lsn=1_000)
        times = []
        detail: dict[str, object] = {}
        for _ in range(args.repeat):
            seconds, detail = run(base, workdir, batch, 1_000)
            times.append(seconds)
        median = statistics.median(times)
        entry = {
            "scenario": name,
            "table_rows": args.rows,
            "changes": batch.num_rows,
            "file_mb": args.file_mb,
            "range_predicate": not args.no_range,
            "runs_s": [round(t, 3) for t in times],
            "median_s": round(median, 3),
            **detail,
        }
        report.append(entry)
        print(
            f"{args.rows:>11,} rows  {name:6s}  {batch.num_rows:,} changes -> "
            f"{detail['rows_written']:,} folded  median {median:.2f} s  runs {entry['runs_s']}  "
            f"files scanned/skipped/removed {detail['files_scanned']}/{detail['files_skipped']}/"
            f"{detail['files_removed']}  rows copied {detail['rows_copied']:,}",
            flush=True,
        )
    shutil.rmtree(workdir / "work", ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

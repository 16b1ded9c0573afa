"""The Delta side of the bench, read through `DeltaReader` from the harness process: how far a
table is (its largest `_cdc_lsn` per the log's file statistics; its row count), the checksum of
its rows (DuckDB over the reader's dataset; the same fields as the source's), change counts per
operation of a change log, and when each Delta commit made which position durable."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import duckdb

from cdcengine.bench.source import CHECKSUM_FIELDS
from cdcengine.lsn import parse_lsn
from cdcengine.sink.columns import COMMITTED_AT, DELETED, LSN, OP
from cdcengine.sink.delta.read import DeltaReader, DeltaSnapshot

_CHECKSUM = """SELECT count(*), coalesce(sum(id), 0), coalesce(sum(a), 0), coalesce(sum(d), 0),
  coalesce(sum(length(b)), 0), count(*) FILTER (WHERE f), coalesce(sum(epoch_us(c)), 0),
  coalesce(sum(length(e)), 0) FROM t WHERE {where}"""


class Lake:
    """One Delta table of the bench (consolidated or change log), opened fresh on each call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader = DeltaReader()

    def snapshot(self) -> DeltaSnapshot | None:
        try:
            return self._reader.open_path(self.path)
        except Exception:  # noqa: BLE001 - mid-create or not there yet
            return None

    def log_mark(self) -> int | None:
        """A cheap sign that the table got a commit: how many entries its local `_delta_log`
        folder holds (-1 while there is none). None for an object store, which has no cheap
        listing: callers then always look at the table itself."""
        if "://" in self.path and not self.path.startswith("file://"):
            return None
        try:
            with os.scandir(Path(self.path.removeprefix("file://")) / "_delta_log") as entries:
                return sum(1 for _ in entries)
        except FileNotFoundError:
            return -1

    def max_lsn(self) -> int | None:
        snap = self.snapshot()
        if snap is None:
            return None
        with contextlib.suppress(Exception):
            return snap.column_max(LSN)
        return None

    def records(self) -> int:
        """Rows in the table per the log (soft-deleted rows included)."""
        snap = self.snapshot()
        if snap is None:
            return 0
        stats = snap.file_stats()
        return int(sum(v or 0 for v in stats.column("num_records").to_pylist()))

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        snap = self.snapshot()
        if snap is None:
            raise LookupError(f"no Delta table at {self.path}")
        db = duckdb.connect()
        try:
            db.register("t", snap.dataset())
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def checksum(self, *, consolidated: bool, op: str | None = None) -> dict[str, str]:
        """Checksum of the live rows (consolidated) or of the rows of change `op` (a log)."""
        where = f"NOT {DELETED}" if consolidated else (f"{OP} = '{op}'" if op else "true")
        row = self._query(_CHECKSUM.format(where=where))[0]
        return {k: str(v) for k, v in zip(CHECKSUM_FIELDS, row, strict=True)}

    def op_counts(self) -> dict[str, int]:
        rows = self._query(f"SELECT {OP}, count(*) FROM t GROUP BY 1")  # noqa: S608
        return {str(op): int(n) for op, n in rows}  # type: ignore[call-overload]

    def transactions(self) -> list[tuple[int, float]]:
        """`(lsn, committed_at epoch seconds)` of each source transaction in a change log."""
        rows = self._query(f"SELECT {LSN}, epoch_us(min({COMMITTED_AT})) FROM t "  # noqa: S608
                           f"WHERE {OP} <> 'R' GROUP BY 1")
        return [(int(lsn), int(us) / 1e6) for lsn, us in rows]  # type: ignore[call-overload]

    def commit_positions(self) -> list[tuple[float, int]]:
        """`(commit epoch seconds, lsn made durable)` of every Delta commit carrying the
        engine's `cdcengine.lsn`."""
        snap = self.snapshot()
        if snap is None:
            return []
        out: list[tuple[float, int]] = []
        for info in snap.commits():
            lsn = info.get("cdcengine.lsn")
            stamp = info.get("timestamp")
            if isinstance(lsn, str) and isinstance(stamp, int | float):
                out.append((float(stamp) / 1000.0, parse_lsn(lsn)))
        return out


def same(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Two checksums are equal field by field, numbers compared as numbers."""
    if set(a) != set(b):
        return False
    for key in a:
        try:
            if Decimal(a[key]) != Decimal(b[key]):
                return False
        except ArithmeticError:
            if a[key] != b[key]:
                return False
    return True


def differences(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, list[str | None]]:
    """`{field: [source, delta]}` of the fields that differ."""
    out: dict[str, list[str | None]] = {}
    for key in sorted(set(a) | set(b)):
        if not same({key: a.get(key, "?")}, {key: b.get(key, "?")}):
            out[key] = [a.get(key), b.get(key)]
    return out


__all__ = ["Lake", "differences", "same"]

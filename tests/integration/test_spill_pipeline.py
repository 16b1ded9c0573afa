"""A transaction several times `max_batch_mb`, end to end (issue 16, item 2): PostgreSQL →
pipeline → Delta, each such transaction ONE Delta commit per table carrying its end LSN as the
txn version, exact; the spill files are gone once the batch is durable."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc
from cdc_util import query, source_for
from deltalake import DeltaTable
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.sink.base import TableKind
from cdcengine.sink.delta import DeltaSink

REF = TableRef("public", "s")
PAD = "p" * 80


def one_commit_holds(src: SourceConfig, kind: TableKind, lsn: int, rows: int) -> None:
    """The first Delta version whose txn version reaches `lsn` holds all `rows` of it, the
    version before none: the transaction is exactly one commit."""
    sink = DeltaSink(src.destination, source=src.name)
    path, app = sink.path(REF, kind), sink.app_id(REF, kind)
    latest = DeltaTable(path).version()
    for v in range(latest + 1):
        dt = DeltaTable(path, version=v)
        if (dt.transaction_version(app) or 0) >= lsn:
            now = dt.to_pyarrow_table(columns=["_cdc_lsn"])
            before = DeltaTable(path, version=v - 1).to_pyarrow_table(columns=["_cdc_lsn"])
            assert pc.sum(pc.equal(now["_cdc_lsn"], lsn)).as_py() == rows
            assert pc.sum(pc.equal(before["_cdc_lsn"], lsn)).as_py() in (None, 0)
            return
    raise AssertionError(f"no commit of {kind} reaches {lsn}")


def spill_files_open() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "cdcengine-spill-" in target:
            found.append(target)
    return found


def lsn_of(src: SourceConfig, kind: TableKind, key: int) -> int:
    rows = DeltaSink(src.destination, source=src.name).read_table(REF, kind)
    found = rows.filter(pc.equal(rows["id"], key))["_cdc_lsn"].to_pylist()
    return int(max(found))


def test_transactions_past_max_batch_mb_land_exactly_in_one_commit(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE s (id bigint PRIMARY KEY, v text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["s"], table_mode="both", flush_interval_ms=100,
                     max_batch_mb=1)
    api.enable_cdc(src, state=state)
    n = 60_000  # ~6 MB of text, ~5 MB of Arrow: several times the budget
    with Running(src, state):
        wait_for(lambda: DeltaSink(src.destination, source=src.name)
                 .applied_version(REF, "consolidated") is not None)
        db.execute("INSERT INTO s SELECT g, 'v' || g || %s FROM generate_series(1, %s) g",
                   [PAD, n])
        wait_for(lambda: len(live_rows(src, "s")) == n, timeout=120)
        # a bulk update and delete in one transaction: the materialised path
        db.execute("BEGIN; UPDATE s SET v = 'u' || id WHERE id % 2 = 0;"
                   "DELETE FROM s WHERE id % 5 = 0; COMMIT")
        wait_for(lambda: len(live_rows(src, "s")) == n - n // 5, timeout=120)
        wait_for(lambda: not spill_files_open())  # released once durable
    inserted = lsn_of(src, TableKind.CONSOLIDATED, 1)
    for kind in TableKind:
        one_commit_holds(src, kind, inserted, n)
    changed = lsn_of(src, TableKind.CONSOLIDATED, 2)
    one_commit_holds(src, TableKind.APPEND, changed, n // 2 + n // 5)  # U rows, then D rows
    one_commit_holds(src, TableKind.CONSOLIDATED, changed, n // 2 + n // 5 - n // 10)
    want = dict(query(db.dsn, "SELECT id, v FROM s"))
    got = {k: r["v"] for k, r in live_rows(src, "s").items()}
    assert got == want

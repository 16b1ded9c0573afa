"""A transaction several times `max_batch_mb` (issue 16, item 2): the batcher hands it to the
sink as a `SpilledTable`, the sink writes it piece by piece in ONE Delta commit carrying the
txn version (bulk inserts, change-log rows), and materialises only what needs folding (said in
the log). Real Delta tables, no mocks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from structlog.testing import capture_logs

from cdcengine.config import TableMode
from cdcengine.events import Begin, Commit, Delete, Insert, Relation, RelationColumn, Update
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import Batcher, CaptureSpec, ChangeBatch
from cdcengine.sink.base import SpilledTable, TableKind, TableSpec
from cdcengine.sink.delta import DeltaSink
from cdcengine.sink.delta.streamed import key_check
from cdcengine.sink.spilled import SpillWriter

REF = TableRef("public", "orders")
BUDGET = 1 << 20  # max_batch_mb = 1
RELATION = Relation(relid=1, schema="public", name="orders", replica_identity="default",
                    columns=(RelationColumn(name="id", type_oid=20, typmod=-1, key=True),
                             RelationColumn(name="v", type_oid=25, typmod=-1, key=False)))
PAD = b"p" * 40


def _text(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
    if isinstance(values, pa.Array):
        return values.cast(pa.string()), 0
    return pa.array([None if v is None else v.decode() for v in values], pa.string()), 0


def _ints(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
    return _text(values)[0].cast(pa.int64()), 0


def batcher(spill: Path) -> Batcher:
    return Batcher({REF: CaptureSpec(ref=REF)}, lambda r: [_ints, _text], max_rows=10**8,
                   max_bytes=BUDGET, flush_interval_s=60, spill_dir=spill)


def one_txn(b: Batcher, events: Iterator[Insert | Update | Delete], end: int) -> ChangeBatch:
    b.add(RELATION)
    b.add(Begin(xid=end, final_lsn=end - 8, commit_ts_us=end * 1000))
    for ev in events:
        b.add(ev)
    b.add(Commit(xid=end, commit_lsn=end - 8, end_lsn=end, commit_ts_us=end * 1000))
    batch = b.take()
    assert batch is not None
    return batch


def inserts(ids: Iterator[int] | range) -> Iterator[Insert]:
    return (Insert(relid=1, new=(str(i).encode(), b"v%d" % i + PAD)) for i in ids)


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    path = tmp_path / "spill"
    path.mkdir()
    return path


@pytest.fixture
def sink(tmp_path: Path, spill: Path) -> DeltaSink:
    return DeltaSink(str(tmp_path / "dest"), source="src1", spill_dir=str(spill))


class PeakArrow:
    """The highest `pa.total_allocated_bytes()` seen while the block runs (sampled)."""

    def __enter__(self) -> PeakArrow:
        self.peak, self._stop = pa.total_allocated_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, pa.total_allocated_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def delta_version(sink: DeltaSink, kind: TableKind) -> int:
    return DeltaTable(sink.path(REF, kind)).version()


@pytest.mark.parametrize("mode", [TableMode.APPEND, TableMode.CONSOLIDATED, TableMode.BOTH])
def test_a_bulk_insert_several_budgets_large_is_streamed_into_one_commit(
        sink: DeltaSink, spill: Path, mode: TableMode) -> None:
    spec = TableSpec(key=("id",), mode=mode)
    kinds = [k for k in TableKind if (k is TableKind.APPEND and mode.writes_append)
             or (k is TableKind.CONSOLIDATED and mode.writes_consolidated)]
    first = one_txn(batcher(spill), inserts(range(-10, 0)), 100)  # stored keys below
    sink.write(REF, first.tables[REF], spec=spec, version=100)
    before = {k: delta_version(sink, k) for k in kinds}
    n = 600_000
    batch = one_txn(batcher(spill), inserts(range(n)), 200)
    table = batch.tables[REF]
    assert isinstance(table, SpilledTable) and table.num_rows == n
    assert table.nbytes > 50 * BUDGET
    assert os.listdir(spill) == []  # anonymous files: nothing to leave behind after a crash
    with table.reader() as reader:
        assert sum(1 for _ in reader) >= 30  # read back in pieces, never whole
    base = pa.total_allocated_bytes()
    with capture_logs() as logs, PeakArrow() as peak:
        result = sink.write(REF, table, spec=spec, version=200)
    assert not [e for e in logs if e["event"] == "spill_materialised"]
    # the pieces in flight (delta-rs holds about a row group of them), not the batch: Arrow
    # memory while the whole write ran
    assert peak.peak - base < table.nbytes / 2
    assert result.version == 200
    for commit, kind in zip(result.commits, kinds, strict=True):
        assert not commit.skipped and commit.rows_in == n and commit.inserted == n
        assert commit.transactions == ((200, 200_000),)
        assert delta_version(sink, kind) == before[kind] + 1  # ONE commit
        assert DeltaTable(sink.path(REF, kind)).transaction_version(
            sink.app_id(REF, kind)) == 200
        stored = sink.read_table(REF, kind, columns=["id", "v", "_cdc_lsn"])
        assert stored.num_rows == n + 10
        got = stored.filter(pa.compute.equal(stored["_cdc_lsn"], 200)).sort_by("id")
        assert got["id"].to_pylist() == list(range(n))
        assert got["v"][n - 1].as_py() == f"v{n - 1}{PAD.decode()}"
    if mode.writes_consolidated:  # appended, not merged
        ops = [h["operation"] for h in DeltaTable(sink.path(REF, "consolidated")).history(1)]
        assert ops == ["WRITE"]
    # a replay of the same batch (after a restart) commits nothing
    again = sink.write(REF, table, spec=spec, version=200)
    assert all(c.skipped for c in again.commits)
    batch.release()
    assert table.file.closed


def test_unsorted_new_keys_are_checked_unique_out_of_memory_and_streamed(
        sink: DeltaSink, spill: Path) -> None:
    n = 60_000
    ids = [(i * 7919) % n for i in range(n)]  # every id once, out of order
    batch = one_txn(batcher(spill), inserts(iter(ids)), 200)
    table = batch.tables[REF]
    assert isinstance(table, SpilledTable)
    with capture_logs() as logs:
        sink.write(REF, table, spec=TableSpec(key=("id",)), version=200)
    assert not [e for e in logs if e["event"] == "spill_materialised"]
    stored = sink.read_table(REF, "consolidated", columns=["id"])
    assert sorted(stored["id"].to_pylist()) == list(range(n))


def test_a_large_update_and_delete_transaction_is_materialised_and_lands_exactly(
        sink: DeltaSink, spill: Path) -> None:
    n = 60_000
    spec = TableSpec(key=("id",), mode=TableMode.BOTH)
    loaded = one_txn(batcher(spill), inserts(range(n)), 100)
    sink.write(REF, loaded.tables[REF], spec=spec, version=100)
    before = delta_version(sink, TableKind.CONSOLIDATED)

    def changes() -> Iterator[Insert | Update | Delete]:
        for i in range(n):
            if i % 3 == 0:
                yield Delete(relid=1, old=(str(i).encode(), None), old_is_key=True)
            else:
                yield Update(relid=1, new=(str(i).encode(), b"u%d" % i + PAD), old=None)
        yield from inserts(range(n, n + 5))
        yield Update(relid=1, new=(str(n).encode(), b"twice"), old=None)  # a key twice

    batch = one_txn(batcher(spill), changes(), 200)
    table = batch.tables[REF]
    assert isinstance(table, SpilledTable)
    with capture_logs() as logs:
        result = sink.write(REF, table, spec=spec, version=200)
    reasons = {(e["kind"], e["reason"]) for e in logs if e["event"] == "spill_materialised"}
    assert reasons == {("append", "deletes_need_earlier_rows")}  # materialised once, said so
    assert result.version == 200 and [c.rows_in for c in result.commits] == [n + 6, n + 6]
    assert delta_version(sink, TableKind.CONSOLIDATED) == before + 1
    rows = {r["id"]: (r["v"], r["_cdc_deleted"])
            for r in sink.read_table(REF, "consolidated").to_pylist()}
    assert len(rows) == n + 5
    for i in (0, 1, 2, 3, n - 1):
        deleted = i % 3 == 0
        want = f"v{i}{PAD.decode()}" if deleted else f"u{i}{PAD.decode()}"
        assert rows[i] == (want, deleted)
    assert rows[n] == ("twice", False)
    log_rows = sink.read_table(REF, "append", columns=["_cdc_lsn"])
    assert log_rows.num_rows == 2 * n + 6


def test_a_spilled_transaction_with_an_added_column_is_the_in_memory_batch(spill: Path) -> None:
    wider = Relation(relid=1, schema="public", name="orders", replica_identity="default",
                     columns=(*RELATION.columns,
                              RelationColumn(name="w", type_oid=20, typmod=-1, key=False)))

    def run(budget: int) -> ChangeBatch:
        b = Batcher({REF: CaptureSpec(ref=REF)}, lambda r: [_ints, _text, _ints][:len(r.columns)],
                    max_rows=10**8, max_bytes=budget, flush_interval_s=60, spill_dir=spill)
        events: list[object] = [*inserts(range(30_000)), wider]
        events += [Insert(relid=1, new=(str(i).encode(), b"w" + PAD, b"%d" % i))
                   for i in range(30_000, 60_000)]
        events.append(Delete(relid=1, old=(b"5", None, None), old_is_key=True))
        return one_txn(b, iter(events), 300)  # type: ignore[arg-type]

    spilled, held = run(BUDGET).tables[REF], run(10**12).tables[REF]
    assert isinstance(spilled, SpilledTable) and isinstance(held, pa.Table)
    assert spilled.ops == {"I": 60_000, "D": 1}
    assert spilled.to_table().equals(held)


@pytest.mark.parametrize("gathered", [True, False], ids=["while_spilling", "own_pass"])
def test_key_check_over_a_spill(spill: Path, gathered: bool) -> None:
    def spilled(ids: list[int | None]) -> SpilledTable:
        table = pa.table({"id": pa.array(ids, pa.int64())})
        writer = SpillWriter(table.schema, spill, key="id" if gathered else None)
        for start in range(0, len(ids), 1000):
            writer.write(table.slice(start, 1000))
        return writer.finish()

    n = 5000
    ascending = key_check(spilled(list(range(n))), "id")
    assert (ascending.unique, ascending.low, ascending.high) == (True, 0, n - 1)
    shuffled = key_check(spilled([(i * 7919) % n for i in range(n)]), "id", temp_dir=str(spill))
    assert (shuffled.unique, shuffled.low, shuffled.high) == (True, 0, n - 1)
    assert not key_check(spilled([*range(n), 17]), "id").unique
    assert not key_check(spilled([1, None, 2]), "id").unique

"""Bounded memory of a large transaction (issue 16, item 2): the batcher converts it in pieces,
the sink makes no whole copies of it, appends bulk inserts of new keys instead of merging them,
and writes Parquet in bounded row groups; every result stays exact and in one Delta commit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from cdcengine.events import Begin, Commit, Insert, Relation, RelationColumn
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import CONVERT_BYTES, Batcher, CaptureSpec
from cdcengine.sink.base import SpilledTable, TableSpec
from cdcengine.sink.delta import DeltaSink
from cdcengine.sink.delta.spool import ROW_GROUP_ROWS
from cdcengine.sink.fold import rows_after

REF = TableRef("public", "orders")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SCHEMA = pa.schema([
    ("id", pa.int64()), ("v", pa.string()),
    ("_cdc_op", pa.string()), ("_cdc_lsn", pa.int64()), ("_cdc_seq", pa.int64()),
    ("_cdc_committed_at", pa.timestamp("us", tz="UTC")),
    ("_cdc_unchanged", pa.list_(pa.string())),
])


def changes(rows: Sequence[Mapping[str, object]], lsn: int) -> pa.Table:
    at = T0 + timedelta(seconds=lsn)
    return pa.Table.from_pylist(
        [{"_cdc_lsn": lsn, "_cdc_seq": i, "_cdc_committed_at": at, **row}
         for i, row in enumerate(rows)], schema=SCHEMA)


def inserts(ids: Sequence[int], lsn: int, v: str = "x") -> pa.Table:
    return changes([{"id": i, "v": f"{v}{i}", "_cdc_op": "I"} for i in ids], lsn)


@pytest.fixture
def sink(tmp_path: Path) -> DeltaSink:
    return DeltaSink(str(tmp_path / "dest"), source="src1")


def operations(sink: DeltaSink) -> list[str]:
    """The Delta operations of the consolidated table, oldest first."""
    history = DeltaTable(sink.path(REF, "consolidated")).history()
    return [str(h["operation"]) for h in reversed(history)]


def live(sink: DeltaSink) -> dict[int, tuple[str, bool, int]]:
    rows = sink.read_table(REF, "consolidated").to_pylist()
    return {r["id"]: (r["v"], r["_cdc_deleted"], r["_cdc_lsn"]) for r in rows}


# --- the sink: inserts of keys the table cannot hold are appended ------------------------------


def test_new_keys_outside_every_files_range_are_appended_not_merged(sink: DeltaSink) -> None:
    sink.write_consolidated(REF, inserts(range(0, 10), 100), key=["id"], version=100)
    sink.write_consolidated(REF, inserts(range(100, 110), 200), key=["id"], version=200)
    # between the two files' ranges, and a delete of a key nobody holds: still no stored key
    gap = changes([{"id": 50, "v": "g", "_cdc_op": "I"}, {"id": 60, "v": None, "_cdc_op": "D"}],
                  300)
    result = sink.write_consolidated(REF, gap, key=["id"], version=300)
    assert result.inserted == 1
    assert operations(sink)[-3:] == ["WRITE", "WRITE", "WRITE"]
    rows = live(sink)
    assert len(rows) == 21 and 60 not in rows
    assert rows[50] == ("g", False, 300) and rows[105] == ("x105", False, 200)
    assert sink.applied_version(REF, "consolidated") == 300


def test_a_batch_touching_a_stored_key_is_still_merged(sink: DeltaSink) -> None:
    sink.write_consolidated(REF, inserts(range(0, 10), 100), key=["id"], version=100)
    both = changes([{"id": 10, "v": "new", "_cdc_op": "I"}, {"id": 3, "v": "upd", "_cdc_op": "U"},
                    {"id": 5, "v": None, "_cdc_op": "D"}], 200)
    sink.write_consolidated(REF, both, key=["id"], version=200)
    assert operations(sink)[-1] == "MERGE"
    rows = live(sink)
    assert rows[10] == ("new", False, 200) and rows[3] == ("upd", False, 200)
    assert rows[5] == ("x5", True, 200)  # soft-deleted, keeps its values
    # a replay of an older insert of a stored key never regresses it, nor duplicates it
    sink.write_consolidated(REF, inserts([3], 150, v="old"), key=["id"], version=250)
    assert live(sink)[3] == ("upd", False, 200) and len(live(sink)) == 11


def test_a_revived_soft_deleted_key_is_merged_not_duplicated(sink: DeltaSink) -> None:
    sink.write_consolidated(REF, inserts([1, 2], 100), key=["id"], version=100)
    sink.write_consolidated(REF, changes([{"id": 2, "v": None, "_cdc_op": "D"}], 200),
                            key=["id"], version=200)
    sink.write_consolidated(REF, inserts([2], 300, v="again"), key=["id"], version=300)
    table = sink.read_table(REF, "consolidated")
    assert table.num_rows == 2  # the stored (deleted) row's key is in the file's range
    assert live(sink)[2] == ("again2", False, 300)


def test_a_large_insert_is_written_in_bounded_row_groups_in_one_commit(sink: DeltaSink) -> None:
    sink.write_consolidated(REF, inserts([-1], 100), key=["id"], version=100)
    before = DeltaTable(sink.path(REF, "consolidated")).version()
    n = ROW_GROUP_ROWS * 2 + 5
    sink.write_consolidated(REF, inserts(range(n), 200), key=["id"], version=200)
    dt = DeltaTable(sink.path(REF, "consolidated"))
    assert dt.version() == before + 1  # one commit, holding the txn action
    assert dt.transaction_version(sink.app_id(REF, "consolidated")) == 200
    sizes = [pq.ParquetFile(f).metadata.row_group(i).num_rows
             for f in dt.file_uris() for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
    assert sum(sizes) == n + 1 and max(sizes) <= ROW_GROUP_ROWS


def test_rows_after_copies_nothing_when_the_batch_is_wholly_above() -> None:
    batch = pa.concat_tables([inserts([1, 2], 100), inserts([3], 200)])
    assert rows_after(batch, 50) is batch
    assert rows_after(batch, 100)["id"].to_pylist() == [3]
    assert rows_after(batch, 200).num_rows == 0


# --- the batcher: a transaction past CONVERT_BYTES is converted in pieces -----------------------


def _text(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
    if isinstance(values, pa.Array):
        return values.cast(pa.string()), 0
    return pa.array([None if v is None else v.decode() for v in values], pa.string()), 0


def test_a_transaction_past_the_conversion_piece_is_converted_in_pieces_exactly() -> None:
    relation = Relation(relid=1, schema="public", name="orders", replica_identity="default",
                        columns=(RelationColumn(name="id", type_oid=25, typmod=-1, key=True),
                                 RelationColumn(name="v", type_oid=25, typmod=-1, key=False)))
    batcher = Batcher({REF: CaptureSpec(ref=REF)}, lambda r: [_text] * len(r.columns),
                      max_rows=10**7, max_bytes=10**10, flush_interval_s=60)
    value = b"v" * 1000
    n = CONVERT_BYTES // len(value) * 5 // 2  # about 2.5 pieces of text
    batcher.add(relation)
    batcher.add(Begin(xid=1, final_lsn=92, commit_ts_us=0))
    for i in range(n):
        batcher.add(Insert(relid=1, new=(str(i).encode(), value)))
    batcher.add(Commit(xid=1, commit_lsn=92, end_lsn=100, commit_ts_us=0))
    assert batcher.spilled_bytes == 0  # far below the budget: nothing spilled
    batch = batcher.take()
    assert batch is not None and batch.transactions == 1
    table = batch.tables[REF]
    assert table.num_rows == n
    assert table["id"].num_chunks >= 3  # converted piece by piece, kept as chunks
    assert table["id"].to_pylist() == [str(i) for i in range(n)]
    assert table["_cdc_seq"].to_pylist() == list(range(n))
    assert set(table["_cdc_lsn"].to_pylist()) == {100}
    assert set(table["v"].to_pylist()) == {value.decode()}


def _ints(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
    text, _ = _text(values)
    return text.cast(pa.int64()), 0


def test_a_transaction_over_max_batch_mb_is_spilled_and_lands_exactly_in_one_commit(
        tmp_path: Path, sink: DeltaSink) -> None:
    relation = Relation(relid=1, schema="public", name="orders", replica_identity="default",
                        columns=(RelationColumn(name="id", type_oid=20, typmod=-1, key=True),
                                 RelationColumn(name="v", type_oid=25, typmod=-1, key=False)))
    spill = tmp_path / "spill"
    spill.mkdir()
    batcher = Batcher({REF: CaptureSpec(ref=REF)}, lambda r: [_ints, _text],
                      max_rows=10**7, max_bytes=200_000, flush_interval_s=60, spill_dir=spill)
    sink.write_consolidated(REF, inserts([-1], 50), key=["id"], version=50)
    n = 20_000
    batcher.add(relation)
    batcher.add(Begin(xid=1, final_lsn=92, commit_ts_us=0))
    for i in range(n):
        batcher.add(Insert(relid=1, new=(str(i).encode(), b"v%d" % i)))
    batcher.add(Commit(xid=1, commit_lsn=92, end_lsn=100, commit_ts_us=0))
    assert batcher.spilled_bytes > 200_000  # most of it went to spill files
    assert list(spill.iterdir()) == []  # unlinked at once: nothing left after a crash
    batch = batcher.take()
    assert batch is not None and batch.tables[REF].num_rows == n
    before = DeltaTable(sink.path(REF, "consolidated")).version()
    spilled = batch.tables[REF]
    assert isinstance(spilled, SpilledTable)  # handed over as a spill file, not in memory
    result = sink.write(REF, spilled, spec=TableSpec(key=("id",)), version=100).commits[0]
    dt = DeltaTable(sink.path(REF, "consolidated"))
    assert dt.version() == before + 1 and result.inserted == n
    assert dt.transaction_version(sink.app_id(REF, "consolidated")) == 100
    rows = live(sink)
    assert len(rows) == n + 1
    assert all(rows[i] == (f"v{i}", False, 100) for i in range(n))

"""Batcher: transaction boundaries, limits, layout, key changes, TOAST marks, stopped tables."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pytest

from cdcengine.events import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Relation,
    RelationColumn,
    Truncate,
    Update,
)
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import Batcher, CaptureSpec
from cdcengine.sink.base import SpilledTable

ORDERS = TableRef("public", "orders")


def text(values: Sequence[bytes | None]) -> tuple[pa.Array, int]:
    out = [None if v is None else v.decode() for v in values]
    return pa.array(out, pa.string()), sum(v == "bad" for v in out)


def rel(relid: int = 1, name: str = "orders", cols: Sequence[str] = ("id", "note")) -> Relation:
    return Relation(relid=relid, schema="public", name=name, replica_identity="default",
                    columns=tuple(RelationColumn(name=c, type_oid=25, typmod=-1, key=c == "id")
                                  for c in cols))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(max_rows: int = 1000, max_bytes: int = 10**9, interval: float = 60.0,
         specs: dict[TableRef, CaptureSpec] | None = None, clock: Clock | None = None) -> Batcher:
    return Batcher(specs or {ORDERS: CaptureSpec(ref=ORDERS)}, lambda r: [text] * len(r.columns),
                   max_rows=max_rows, max_bytes=max_bytes, flush_interval_s=interval,
                   clock=clock or Clock())


def txn(b: Batcher, xid: int, end: int, *changes: object, ts: int = 1_700_000_000_000_000) -> None:
    b.add(Begin(xid=xid, final_lsn=end - 8, commit_ts_us=ts))
    for c in changes:
        b.add(c)  # type: ignore[arg-type]
    b.add(Commit(xid=xid, commit_lsn=end - 8, end_lsn=end, commit_ts_us=ts))


def test_layout_and_per_transaction_sequence() -> None:
    b = make()
    b.add(rel())
    txn(b, 10, 100, Insert(relid=1, new=(b"1", b"a")), Insert(relid=1, new=(b"2", b"b")))
    txn(b, 11, 200, Update(relid=1, new=(b"1", b"c")), Delete(relid=1, old=(b"2", None)))
    batch = b.take()
    assert batch is not None
    assert batch.version == 200 and batch.transactions == 2
    t = batch.tables[ORDERS]
    assert t.column_names == ["id", "note", "_cdc_op", "_cdc_lsn", "_cdc_seq",
                              "_cdc_committed_at", "_cdc_unchanged"]
    assert t["_cdc_op"].to_pylist() == ["I", "I", "U", "D"]
    assert t["_cdc_lsn"].to_pylist() == [100, 100, 200, 200]
    assert t["_cdc_seq"].to_pylist() == [0, 1, 0, 1]
    assert t.schema.field("_cdc_committed_at").type == pa.timestamp("us", tz="UTC")
    assert t["_cdc_unchanged"].null_count == 4
    assert batch.keys[ORDERS] == ("id",)
    assert b.take() is None


def test_never_ready_inside_a_transaction_and_take_refuses() -> None:
    b = make(max_rows=1)
    b.add(rel())
    b.add(Begin(xid=1, final_lsn=1, commit_ts_us=0))
    b.add(Insert(relid=1, new=(b"1", b"a")))
    b.add(Insert(relid=1, new=(b"2", b"a")))
    assert not b.ready()
    with pytest.raises(RuntimeError):
        b.take()
    b.add(Commit(xid=1, commit_lsn=1, end_lsn=9, commit_ts_us=0))
    assert b.ready()
    batch = b.take()
    assert batch is not None and batch.rows == 2  # the big transaction was not split


def test_limits_rows_bytes_and_interval() -> None:
    clock = Clock()
    b = make(max_rows=3, clock=clock, interval=1.0)
    b.add(rel())
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"a")))
    assert not b.ready()
    clock.now = 1.5
    assert b.ready()
    b.take()
    txn(b, 2, 20, *[Insert(relid=1, new=(str(i).encode(), b"x")) for i in range(3)])
    assert b.ready()
    b.take()
    small = make(max_bytes=200)
    small.add(rel())
    txn(small, 3, 30, Insert(relid=1, new=(b"1", b"y" * 300)))
    assert small.ready()


def test_key_change_becomes_delete_and_insert() -> None:
    b = make()
    b.add(rel())
    txn(b, 1, 10, Update(relid=1, new=(b"2", b"a"), old=(b"1", None), old_is_key=True))
    t = b.take().tables[ORDERS]  # type: ignore[union-attr]
    assert t["_cdc_op"].to_pylist() == ["D", "I"]
    assert t["id"].to_pylist() == ["1", "2"]
    assert t["_cdc_seq"].to_pylist() == [0, 1]


def test_unchanged_toast_is_marked_never_null_valued_silently() -> None:
    b = make()
    b.add(rel())
    txn(b, 1, 10, Update(relid=1, new=(b"1", UNCHANGED)), Insert(relid=1, new=(b"2", b"n")))
    t = b.take().tables[ORDERS]  # type: ignore[union-attr]
    assert t["_cdc_unchanged"].to_pylist() == [["note"], None]
    assert t["note"].to_pylist() == [None, "n"]


def test_unconfigured_tables_ignored_and_columns_selected() -> None:
    spec = CaptureSpec(ref=ORDERS, columns=("note",))
    b = make(specs={ORDERS: spec})
    b.add(rel(cols=("id", "note", "secret")))
    b.add(rel(relid=2, name="other"))
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"a", b"s")), Insert(relid=2, new=(b"9", b"z")))
    batch = b.take()
    assert batch is not None and set(batch.tables) == {ORDERS}
    assert batch.tables[ORDERS].column_names[:2] == ["id", "note"]  # key always kept


def test_masked_values_are_counted() -> None:
    b = make()
    b.add(rel())
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"bad")), Insert(relid=1, new=(b"2", b"bad")))
    assert b.take().masked == {(ORDERS, "note"): 2}  # type: ignore[union-attr]


def test_truncate_is_a_t_row_in_transaction_order() -> None:
    b = make()
    b.add(rel())
    b.add(rel(2, "items"))
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"a")))
    txn(b, 2, 20, Insert(relid=1, new=(b"2", b"b")), Truncate(relids=(1, 2)),
        Insert(relid=1, new=(b"3", b"c")))
    txn(b, 3, 30, Insert(relid=1, new=(b"4", b"d")))
    batch = b.take()
    assert batch is not None
    t = batch.tables[ORDERS]
    assert t["_cdc_op"].to_pylist() == ["I", "I", "T", "I", "I"]
    assert t["id"].to_pylist() == ["1", "2", None, "3", "4"]
    assert t["note"].to_pylist()[2] is None
    assert t["_cdc_lsn"].to_pylist() == [10, 20, 20, 20, 30]
    assert t["_cdc_seq"].to_pylist() == [0, 0, 1, 2, 0]
    assert TableRef("public", "items") not in batch.tables  # not configured: ignored
    assert batch.stopped == ()


def test_schema_change_inside_a_transaction_keeps_both_shapes() -> None:
    b = make()
    b.add(rel())
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"a")))
    txn(b, 2, 20, Insert(relid=1, new=(b"2", b"b")), rel(cols=("id", "note", "added")),
        Insert(relid=1, new=(b"3", b"c", b"x")))
    batch = b.take()
    assert batch is not None
    t = batch.tables[ORDERS]
    assert t["id"].to_pylist() == ["1", "2", "3"]
    assert t["added"].to_pylist() == [None, None, "x"]
    assert [c.lsn for c in batch.schema_changes] == [12]  # the transaction's commit record


# one transaction larger than the memory budget -------------------------------------------------

ITEMS = TableRef("public", "items")


def _huge_stream(b: Batcher) -> list[object]:
    """Two small transactions around one big one touching two tables, with unchanged TOAST
    values, key changes, masked values, a TRUNCATE of `items` and later a change of its key
    inside the big one."""
    b.add(rel())
    b.add(rel(2, "items"))
    txn(b, 1, 100, Insert(relid=1, new=(b"0", b"first")))
    big: list[object] = []
    for i in range(1, 400):
        big.append(Insert(relid=1, new=(str(i).encode(), b"v" * (i % 50))))
        big.append(Insert(relid=2, new=(str(i).encode(), b"it")))
        if i % 7 == 0:
            big.append(Update(relid=1, new=(str(i).encode(), UNCHANGED)))
        if i % 11 == 0:
            big.append(Update(relid=1, old=(str(i).encode(), None),
                              new=(str(i + 10_000).encode(), b"moved")))
        if i % 13 == 0:
            big.append(Insert(relid=1, new=(str(i + 20_000).encode(), b"bad")))
        if i == 300:
            big.append(Truncate(relids=(2,)))
        if i == 350:  # items changes its key: it stops, its rows of this transaction go
            big.append(Relation(relid=2, schema="public", name="items",
                                replica_identity="default",
                                columns=(RelationColumn(name="id", type_oid=25, typmod=-1,
                                                        key=False),
                                         RelationColumn(name="note", type_oid=25, typmod=-1,
                                                        key=True))))
    txn(b, 2, 200, *big)
    txn(b, 3, 300, Delete(relid=1, old=(b"0", None)))
    return big


@pytest.mark.parametrize("budget", [2_000, 40_000])
def test_a_transaction_over_budget_is_compacted_and_spilled_not_split(tmp_path, budget) -> None:
    small = Batcher({ORDERS: CaptureSpec(ref=ORDERS), ITEMS: CaptureSpec(ref=ITEMS)},
                    lambda r: [text] * len(r.columns), max_rows=10**6, max_bytes=budget,
                    flush_interval_s=60, clock=Clock(), spill_dir=tmp_path)
    reference = Batcher({ORDERS: CaptureSpec(ref=ORDERS), ITEMS: CaptureSpec(ref=ITEMS)},
                        lambda r: [text] * len(r.columns), max_rows=10**6, max_bytes=10**9,
                        flush_interval_s=60, clock=Clock())
    _huge_stream(reference)
    _huge_stream(small)
    assert small.ready()  # full: taken right after the big transaction's commit
    spilled = small.spilled_bytes
    got, expected = small.take(), reference.take()
    assert got is not None and expected is not None
    assert (got.version, got.transactions) == (expected.version, expected.transactions) == (300, 3)
    assert got.tables.keys() == expected.tables.keys()
    for ref in expected.tables:
        table = got.tables[ref]
        if isinstance(table, SpilledTable):  # past the budget: handed over as a spill file
            assert budget == 2_000
            table = table.to_table()
        assert table.equals(expected.tables[ref]), ref
    assert got.masked == expected.masked == {(ORDERS, "note"): 30}
    assert [s.ref for s in got.stopped] == [ITEMS]
    assert ITEMS not in got.tables  # dropped across converted and spilled parts
    assert list(tmp_path.iterdir()) == []  # spill files are anonymous: unlinked at once
    if budget == 2_000:
        assert spilled > 0
    assert small.pending_rows == 0 and small.take() is None


# ALTER TABLE between changes -------------------------------------------------------------------


def test_added_dropped_and_retyped_columns_are_carried() -> None:
    b = make()
    b.add(rel(cols=("id", "note", "old")))
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"a", b"o")))
    b.add(rel(cols=("id", "note", "old")))  # same shape again (a relcache reset): no change
    wider = Relation(relid=1, schema="public", name="orders", replica_identity="default",
                     columns=(RelationColumn(name="id", type_oid=25, typmod=-1, key=True),
                              RelationColumn(name="note", type_oid=1043, typmod=104, key=False),
                              RelationColumn(name="extra", type_oid=25, typmod=-1, key=False)))
    b.add(Begin(xid=2, final_lsn=12, commit_ts_us=0))
    b.add(wider)
    b.add(Insert(relid=1, new=(b"2", b"b", b"e")))
    b.add(Commit(xid=2, commit_lsn=12, end_lsn=20, commit_ts_us=0))
    batch = b.take()
    assert batch is not None
    t = batch.tables[ORDERS]
    assert t.column_names[:4] == ["id", "note", "old", "extra"]
    assert t["old"].to_pylist() == ["o", None]
    assert t["extra"].to_pylist() == [None, "e"]
    (change,) = batch.schema_changes
    assert (change.ref, change.lsn) == (ORDERS, 12)
    assert (change.added, change.dropped, change.retyped) == (("extra",), ("old",), ("note",))
    assert batch.stopped == ()


def test_a_changed_key_stops_the_table() -> None:
    b = make()
    b.add(rel())
    txn(b, 1, 10, Insert(relid=1, new=(b"1", b"a")))
    rekeyed = Relation(relid=1, schema="public", name="orders", replica_identity="default",
                       columns=(RelationColumn(name="id", type_oid=25, typmod=-1, key=False),
                                RelationColumn(name="note", type_oid=25, typmod=-1, key=True)))
    b.add(Begin(xid=2, final_lsn=12, commit_ts_us=0))
    b.add(rekeyed)
    b.add(Insert(relid=1, new=(b"2", b"b")))
    b.add(Commit(xid=2, commit_lsn=12, end_lsn=20, commit_ts_us=0))
    batch = b.take()
    assert batch is not None
    assert batch.tables[ORDERS]["id"].to_pylist() == ["1"]
    assert [s.reason for s in batch.stopped] == ["primary_key_changed"]


def test_a_key_change_keeps_the_unchanged_toast_mark_on_its_insert() -> None:
    b = make()
    b.add(rel(cols=("id", "note", "big")))
    txn(b, 1, 10, Update(relid=1, old=(b"1", None, None), new=(b"2", b"n", UNCHANGED)))
    batch = b.take()
    assert batch is not None
    t = batch.tables[ORDERS]
    assert t["_cdc_op"].to_pylist() == ["D", "I"]
    assert t["_cdc_unchanged"].to_pylist() == [None, ["big"]]
    assert t["big"].to_pylist() == [None, None]  # a placeholder, never the marker object


def test_replica_identity_full_fills_unchanged_toast_from_the_whole_old_row() -> None:
    """Under FULL the old row ('O') is complete, TOASTed values included: an update of another
    column is a plain 'U' carrying the old TOASTed value, nothing left to resolve."""
    b = make()
    b.add(rel(cols=("id", "note", "big")))
    txn(b, 1, 10, Update(relid=1, old=(b"1", b"old", b"x" * 9000),
                         new=(b"1", b"new", UNCHANGED)))
    batch = b.take()
    assert batch is not None
    t = batch.tables[ORDERS]
    assert t["_cdc_op"].to_pylist() == ["U"]
    assert t["big"].to_pylist() == ["x" * 9000]
    assert t["note"].to_pylist() == ["new"]
    assert "_cdc_unchanged" not in t.column_names or t["_cdc_unchanged"].to_pylist() == [None]

"""The pure comparison of `cdcengine verify`, on hand-built Arrow tables (no server)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from decimal import Decimal

import pyarrow as pa
import pytest

from cdcengine.control.verify import (
    DIFFERENT,
    EQUAL,
    Comparer,
    TableVerify,
    VerifyResult,
    compare_tables,
    format_key,
)

UTC = dt.UTC
C = 1000  # the source snapshot's position


def source(ids: list[int], notes: list[str | None], totals: list[str] | None = None) -> pa.Table:
    totals = totals or ["1.50"] * len(ids)
    return pa.table({
        "id": pa.array(ids, pa.int32()),
        "note": pa.array(notes, pa.string()),
        "total": pa.array([Decimal(t) for t in totals], pa.decimal128(12, 2)),
    })


def consolidated(ids: list[int], notes: list[str | None], *, lsn: list[int] | None = None,
                 deleted: list[bool] | None = None, totals: list[str] | None = None,
                 string_type: pa.DataType | None = None) -> pa.Table:
    n = len(ids)
    totals = totals or ["1.50"] * n
    return pa.table({
        "id": pa.array(ids, pa.int32()),
        "note": pa.array(notes, string_type or pa.string()),
        "total": pa.array([Decimal(t) for t in totals], pa.decimal128(12, 2)),
        "_cdc_lsn": pa.array(lsn or [C - 10] * n, pa.int64()),
        "_cdc_committed_at": pa.array([dt.datetime(2024, 1, 1, tzinfo=UTC)] * n,
                                      pa.timestamp("us", tz="UTC")),
        "_cdc_deleted": pa.array(deleted or [False] * n, pa.bool_()),
        "_cdc_deleted_at": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
    })


def compare(src: pa.Table, delta: pa.Table, **kw: object):
    return compare_tables(src, delta, key=["id"], columns=src.column_names, upto=C, **kw)


def test_equal_tables_have_no_difference() -> None:
    src = source([1, 2, 3], ["a", None, ""])
    res = compare(src, consolidated([3, 1, 2], ["", "a", None]))
    assert res.differences == 0
    assert (res.source_rows, res.delta_rows, res.rows_compared, res.in_flux) == (3, 3, 3, 0)


def test_physical_types_do_not_matter_only_values() -> None:
    src = source([1, 2], ["a", "b"])
    delta = consolidated([1, 2], ["a", "b"], string_type=pa.large_string())
    delta = delta.set_column(0, "id", delta["id"].cast(pa.int64()))  # a widened key
    assert compare(src, delta).differences == 0


def test_missing_extra_and_different_rows_are_reported_with_keys_and_columns() -> None:
    src = source([1, 2, 3, 4], ["a", "b", "c", "d"], ["1.00", "2.00", "3.00", "4.00"])
    delta = consolidated([1, 3, 4, 9], ["a", "C", "d", "x"],
                         totals=["1.00", "3.00", "4.01", "9.00"])
    res = compare(src, delta)
    assert (res.missing_in_delta, res.extra_in_delta, res.different) == (1, 1, 2)
    assert res.missing_examples == ({"id": 2},)
    assert res.extra_examples == ({"id": 9},)
    assert [(d.key, d.columns) for d in res.different_examples] == [
        ({"id": 3}, ("note",)), ({"id": 4}, ("total",))]
    assert res.differences == 4


def test_null_and_empty_string_differ() -> None:
    res = compare(source([1], [None]), consolidated([1], [""]))
    assert res.different == 1


def test_soft_deleted_rows_count_as_absent() -> None:
    src = source([1, 2], ["a", "b"])
    delta = consolidated([1, 2, 3], ["a", "b", "c"], deleted=[False, True, True])
    res = compare(src, delta)
    assert (res.missing_in_delta, res.extra_in_delta, res.different) == (1, 0, 0)
    assert res.missing_examples == ({"id": 2},)
    assert res.delta_rows == 1


def test_rows_changed_after_the_snapshot_are_in_flux_not_differences() -> None:
    # 2 changed after C, 3 deleted after C, 4 inserted after C: none is a difference
    src = source([1, 2, 3], ["a", "b", "c"])
    delta = consolidated([1, 2, 3, 4], ["a", "B", "c", "d"], lsn=[C, C + 5, C + 6, C + 7],
                         deleted=[False, False, True, False])
    res = compare(src, delta)
    assert res.differences == 0
    assert res.in_flux == 3
    assert res.rows_compared == 1
    assert res.source_rows == 3


def test_examples_are_capped_and_sorted_by_key() -> None:
    src = source(list(range(100)), ["v"] * 100)
    res = compare(src, consolidated([], []), examples=5)
    assert res.missing_in_delta == 100
    assert [k["id"] for k in res.missing_examples] == [0, 1, 2, 3, 4]


def test_chunks_and_composite_keys() -> None:
    chunks = [pa.table({"a": pa.array([1, 1], pa.int64()), "b": ["x", "y"], "v": [1.5, None]}),
              pa.table({"a": pa.array([2], pa.int64()), "b": ["x"], "v": [float("nan")]})]
    delta = pa.table({"a": pa.array([1, 1, 2], pa.int64()), "b": ["x", "y", "x"],
                      "v": [1.5, 0.0, float("nan")],
                      "_cdc_lsn": pa.array([1, 1, 1], pa.int64()),
                      "_cdc_deleted": [False, False, False]})
    res = compare_tables(chunks, delta, key=["a", "b"], columns=["a", "b", "v"], upto=C)
    assert res.different == 1  # NaN equals NaN; None differs from 0.0
    assert res.different_examples[0].key == {"a": 1, "b": "y"}
    assert res.different_examples[0].columns == ("v",)
    assert format_key(res.different_examples[0].key) == "(a=1, b='y')"


def test_only_the_compared_columns_count() -> None:
    src = source([1], ["a"]).select(["id", "note"])
    delta = consolidated([1], ["a"], totals=["7.00"])  # total is not captured: ignored
    assert compare(src, delta).differences == 0


def test_a_column_missing_in_delta_is_a_difference() -> None:
    src = source([1, 2], ["a", "b"]).append_column("extra", pa.array([1, 2], pa.int16()))
    res = compare(src, consolidated([1, 2], ["a", "b"]))
    assert res.columns_missing_in_delta == ("extra",)
    assert res.different == 0 and res.differences == 1


def test_values_of_many_types_roundtrip_equal() -> None:
    row = {
        "id": pa.array([b"\x00\x01"], pa.binary()),
        "ts": pa.array([dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC)], pa.timestamp("us", "UTC")),
        "ntz": pa.array([dt.datetime(2024, 5, 1, 12, 30)], pa.timestamp("us")),
        "d": pa.array([dt.date(2024, 5, 1)], pa.date32()),
        "l": pa.array([[1, None, 3]], pa.list_(pa.int32())),
        "f": pa.array([-0.0], pa.float32()),
    }
    src = pa.table(row)
    delta = pa.table(row | {
        "l": pa.array([[1, None, 3]], pa.list_(pa.field("element", pa.int32()))),
        "_cdc_lsn": pa.array([1], pa.int64()), "_cdc_deleted": [False]})
    res = compare_tables(src, delta, key=["id"], columns=src.column_names, upto=C)
    assert res.differences == 0
    delta2 = delta.set_column(delta.column_names.index("f"), "f", pa.array([0.0], pa.float32()))
    res = compare_tables(src, delta2, key=["id"], columns=src.column_names, upto=C)
    assert res.different == 1 and res.different_examples[0].key == {"id": "\\x0001"}


def _log(rows: list[tuple[int, int, str, int | None, str | None]]) -> pa.Table:
    lsn, seq, op, ids, notes = zip(*rows, strict=True)
    return pa.table({"id": pa.array(ids, pa.int32()), "note": pa.array(notes, pa.string()),
                     "_cdc_lsn": pa.array(lsn, pa.int64()), "_cdc_seq": pa.array(seq, pa.int64()),
                     "_cdc_op": pa.array(op, pa.string()),
                     "_cdc_unchanged": pa.array([None] * len(rows), pa.list_(pa.string()))})


def test_append_log_is_rebuilt_as_of_the_snapshot() -> None:
    log = _log([
        (10, 0, "R", 1, "a"), (10, 1, "R", 2, "b"), (10, 2, "R", 3, "c"),
        (20, 0, "U", 1, "a2"), (30, 0, "D", 2, "b"),
        (40, 0, "T", None, None), (40, 1, "I", 5, "e"), (50, 0, "I", 6, "f"),
        (C + 1, 0, "U", 5, "changed after C"), (C + 2, 0, "I", 7, "after C"),
    ])
    src = pa.table({"id": pa.array([5, 6], pa.int32()), "note": ["e", "f"]})
    res = compare_tables(src, log, key=["id"], columns=["id", "note"], upto=C, kind="append")
    assert res.differences == 0, res
    src2 = pa.table({"id": pa.array([1, 5], pa.int32()), "note": ["a2", "E"]})
    res = compare_tables(src2, log, key=["id"], columns=["id", "note"], upto=C, kind="append")
    assert res.missing_examples == ({"id": 1},)  # truncated at 40
    assert res.extra_examples == ({"id": 6},)
    assert [d.key for d in res.different_examples] == [{"id": 5}]


def test_results_are_json_safe() -> None:
    src = pa.table({"k": pa.array([Decimal("1.5")], pa.decimal128(5, 1)),
                    "t": pa.array([dt.date(2024, 1, 2)], pa.date32())})
    res = compare_tables(src, pa.table({"k": pa.array([], pa.decimal128(5, 1)),
                                        "t": pa.array([], pa.date32()),
                                        "_cdc_lsn": pa.array([], pa.int64()),
                                        "_cdc_deleted": pa.array([], pa.bool_())}),
                         key=["k", "t"], columns=["k", "t"], upto=C)
    assert res.missing_examples == ({"k": "1.5", "t": "2024-01-02"},)
    tv = TableVerify(table="public.x", mode="consolidated", status=DIFFERENT,
                     kind="consolidated", message="m", comparison=res, key=("k", "t"))
    out = VerifyResult(source="s", tables=(tv,))
    assert not out.ok and out.differences == 1
    json.dumps(out.to_dict())
    json.dumps(asdict(out))
    assert VerifyResult(source="s", tables=(TableVerify(
        table="public.x", mode="consolidated", status=EQUAL, kind="consolidated",
        message="m"),)).ok


def test_comparer_needs_a_key_and_the_key_in_delta() -> None:
    with pytest.raises(ValueError, match="key"):
        Comparer([], ["a"])
    src = source([1], ["a"])
    with pytest.raises(ValueError, match="key"):
        compare_tables(src, pa.table({"x": [1]}), key=["id"], columns=["id"], upto=C)

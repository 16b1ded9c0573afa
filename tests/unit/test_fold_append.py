"""Append rows filled from prior (stored consolidated) values: sink.fold and DeltaSink."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from test_delta_sink import REF, SCHEMA, changes
from test_fold import changes as fold_changes

from cdcengine.config import TableMode
from cdcengine.sink.base import TableSpec
from cdcengine.sink.delta import DeltaSink
from cdcengine.sink.fold import append_lookup_keys, append_rows


def test_lookup_keys_are_the_unresolvable_ones_with_their_first_lsn() -> None:
    batch = fold_changes([
        {"_cdc_op": "D", "id": 1},  # bare delete
        {"_cdc_op": "U", "id": 2, "v": "x", "_cdc_unchanged": ["big"]},  # unresolved TOAST
        {"_cdc_op": "I", "id": 3, "v": "n", "big": "N"},
        {"_cdc_op": "D", "id": 3},  # carried from the insert
        {"_cdc_op": "T"},
        {"_cdc_op": "U", "id": 4, "v": "y"},
        {"_cdc_op": "U", "id": 4, "v": "z", "_cdc_unchanged": ["big"]},  # 4 knew big? no
        {"_cdc_op": "D", "id": 5},
        {"_cdc_op": "I", "id": 5, "v": "q"},
        {"_cdc_op": "I", "id": 6, "v": "r", "big": "R"},
        {"_cdc_op": "U", "id": 6, "v": "s", "_cdc_unchanged": ["big"]},  # resolved in batch
    ])
    got = append_lookup_keys(batch, ["id"]).to_pylist()
    # id 4: its first U knew `big` (an I/U knows every column it does not list)
    assert got == [{"id": 1, "_cdc_lsn": 1000}, {"id": 2, "_cdc_lsn": 1001},
                   {"id": 5, "_cdc_lsn": 1007}]
    assert append_lookup_keys(fold_changes([{"_cdc_op": "T"}]), ["id"]).num_rows == 0
    assert append_lookup_keys(fold_changes([]), ["id"]).num_rows == 0


def test_append_rows_with_prior_fills_what_the_batch_cannot() -> None:
    batch = fold_changes([
        {"_cdc_op": "D", "id": 1},
        {"_cdc_op": "U", "id": 2, "v": "x", "_cdc_unchanged": ["big", "doc"]},
        {"_cdc_op": "I", "id": 3, "v": "n", "big": "N", "doc": "d"},
        {"_cdc_op": "D", "id": 3},
        {"_cdc_op": "U", "id": 2, "v": "y", "_cdc_unchanged": ["big"]},
        {"_cdc_op": "D", "id": 9},  # not in prior: stays key-only
    ])
    prior = pa.table({"id": [1, 2, 3], "v": ["a", "b", "old"], "big": ["B1", "B2", "B3"]})
    out = append_rows(batch, ["id"], prior=prior)
    assert out.schema == batch.schema and out.num_rows == batch.num_rows
    rows = [(r["_cdc_op"], r["id"], r["v"], r["big"], r["doc"], r["_cdc_unchanged"])
            for r in out.to_pylist()]
    assert rows == [
        ("D", 1, "a", "B1", None, None),
        ("U", 2, "x", "B2", None, ["doc"]),  # prior lacks doc: still listed
        ("I", 3, "n", "N", "d", None),
        ("D", 3, "n", "N", "d", None),  # the batch's own knowledge wins over prior
        ("U", 2, "y", "B2", None, None),
        ("D", 9, None, None, None, None),
    ]
    assert out.column("_cdc_seq").to_pylist() == list(range(6))


def test_append_rows_prior_adds_unchanged_column_and_handles_composite_keys() -> None:
    schema = pa.schema([("a", pa.string()), ("b", pa.int32()), ("v", pa.int64()),
                        ("_cdc_op", pa.string()), ("_cdc_lsn", pa.int64()),
                        ("_cdc_seq", pa.int64())])
    batch = pa.Table.from_pylist([
        {"a": "x", "b": 1, "_cdc_op": "D", "_cdc_lsn": 5, "_cdc_seq": 0},
        {"a": "x", "b": 2, "_cdc_op": "D", "_cdc_lsn": 5, "_cdc_seq": 1},
    ], schema=schema)
    prior = pa.table({"a": ["x"], "b": pa.array([2], pa.int64()), "v": [7]})
    out = append_rows(batch, ["a", "b"], prior=prior)
    assert out.column("v").to_pylist() == [None, 7]
    assert out.column_names == [*schema.names, "_cdc_unchanged"]
    with pytest.raises(ValueError, match="key"):
        append_rows(batch, ["a", "b"], prior=pa.table({"a": ["x"]}))


def _log(sink: DeltaSink) -> list[tuple[object, ...]]:
    t = sink.read_table(REF, "append").sort_by([("_cdc_lsn", "ascending"),
                                                ("_cdc_seq", "ascending")])
    return [(r["_cdc_lsn"], r["_cdc_op"], r["id"], r["v"], r["big"], r["_cdc_unchanged"])
            for r in t.to_pylist()]


def test_sink_fills_append_rows_from_the_consolidated_table(tmp_path: Path) -> None:
    sink = DeltaSink(str(tmp_path / "d"), source="src1")
    spec = TableSpec(key=("id",), mode=TableMode.BOTH)
    sink.write(REF, changes([{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"},
                             {"_cdc_op": "I", "id": 2, "v": "b", "big": "C"},
                             {"_cdc_op": "I", "id": 3, "v": "c", "big": "D"}], 100),
               spec=spec, version=100)
    sink.write(REF, changes([{"_cdc_op": "D", "id": 1},
                             {"_cdc_op": "U", "id": 2, "v": "x", "_cdc_unchanged": ["big"]},
                             {"_cdc_op": "D", "id": 7}], 200), spec=spec, version=200)
    # a later batch: the consolidated row of 2 now holds x/C, of 1 is soft-deleted
    sink.write(REF, changes([{"_cdc_op": "U", "id": 2, "v": "y", "_cdc_unchanged": ["big"]},
                             {"_cdc_op": "I", "id": 1, "v": "again", "big": "E"},
                             {"_cdc_op": "D", "id": 1}], 300), spec=spec, version=300)
    assert _log(sink)[3:] == [
        (200, "D", 1, "a", "B", None),
        (200, "U", 2, "x", "C", None),
        (200, "D", 7, None, None, None),
        (300, "U", 2, "y", "C", None),
        (300, "I", 1, "again", "E", None),
        (300, "D", 1, "again", "E", None),
    ]
    # append-only (no fill) keeps the old behaviour
    plain = DeltaSink(str(tmp_path / "p"), source="src1")
    plain.write_append(REF, changes([{"_cdc_op": "I", "id": 1, "v": "a"}], 100), version=100,
                       key=["id"])
    plain.write_append(REF, changes([{"_cdc_op": "D", "id": 1}], 200), version=200, key=["id"],
                       fill_from_consolidated=True)  # no consolidated table: nothing to fill
    assert _log(plain)[1] == (200, "D", 1, None, None, None)


def test_sink_never_fills_from_a_consolidated_table_that_lags_or_leads(tmp_path: Path) -> None:
    sink = DeltaSink(str(tmp_path / "d"), source="src1")
    first = changes([{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"}], 100)
    sink.write_consolidated(REF, first, key=["id"], version=100)
    sink.write_append(REF, first, version=100, key=["id"])
    # crash between kinds: the append table got 200, the consolidated table did not
    sink.write_append(REF, changes([{"_cdc_op": "U", "id": 1, "v": "b", "big": "B2"}], 200),
                      version=200, key=["id"])
    sink.write_append(REF, changes([{"_cdc_op": "D", "id": 1}], 300), version=300, key=["id"],
                      fill_from_consolidated=True)
    assert _log(sink)[-1] == (300, "D", 1, None, None, None)  # stale values never written
    # a consolidated row newer than the batch's change is not "before" it either
    other = DeltaSink(str(tmp_path / "e"), source="src1")
    other.write_consolidated(REF, changes([{"_cdc_op": "I", "id": 1, "v": "new"}], 500),
                             key=["id"], version=500)
    other.write_append(REF, changes([{"_cdc_op": "D", "id": 1}], 400), version=400,
                       key=["id"], fill_from_consolidated=True)
    assert _log(other) == [(400, "D", 1, None, None, None)]


def test_schema_of_filled_rows_follows_the_append_table(tmp_path: Path) -> None:
    sink = DeltaSink(str(tmp_path / "d"), source="src1")
    spec = TableSpec(key=("id",), mode=TableMode.BOTH)
    sink.write(REF, changes([{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"}], 100), spec=spec,
               version=100)
    wider = pa.schema([*SCHEMA, pa.field("extra", pa.string())])
    # the batch has a column the consolidated table does not hold yet: it stays unknown
    sink.write(REF, changes([{"_cdc_op": "U", "id": 1, "v": "b",
                              "_cdc_unchanged": ["big", "extra"]}], 200, wider),
               spec=spec, version=200)
    last = sink.read_table(REF, "append").sort_by("_cdc_lsn").to_pylist()[-1]
    assert (last["v"], last["big"], last["extra"], last["_cdc_unchanged"]) == (
        "b", "B", None, ["extra"])


def test_key_change_insert_takes_unchanged_toast_from_the_old_key() -> None:
    batch = fold_changes([
        {"_cdc_op": "U", "id": 1, "v": "a", "big": "B"},
        {"_cdc_op": "D", "id": 1, "_cdc_lsn": 2000, "_cdc_seq": 0},  # UPDATE ... SET id = 5
        {"_cdc_op": "I", "id": 5, "v": "a", "_cdc_unchanged": ["big"], "_cdc_lsn": 2000,
         "_cdc_seq": 1},
        {"_cdc_op": "U", "id": 5, "v": "b", "_cdc_unchanged": ["big"]},  # through the insert
        {"_cdc_op": "D", "id": 2, "_cdc_lsn": 3000, "_cdc_seq": 0},  # old key known only
        {"_cdc_op": "I", "id": 6, "v": "c", "_cdc_unchanged": ["big"], "_cdc_lsn": 3000,
         "_cdc_seq": 1},  # ... from the stored values
        {"_cdc_op": "D", "id": 3, "_cdc_lsn": 4000, "_cdc_seq": 0},
        {"_cdc_op": "I", "id": 7, "v": "d", "_cdc_unchanged": ["big"], "_cdc_lsn": 4000,
         "_cdc_seq": 1},  # nowhere known: stays listed
    ])
    assert append_lookup_keys(batch, ["id"]).column("id").to_pylist() == [2, 3]
    prior = pa.table({"id": [2], "v": ["old"], "big": ["S"]})
    out = append_rows(batch, ["id"], prior=prior)
    got = [(r["_cdc_op"], r["id"], r["v"], r["big"], r["_cdc_unchanged"]) for r in out.to_pylist()]
    assert got == [
        ("U", 1, "a", "B", None),
        ("D", 1, "a", "B", None),
        ("I", 5, "a", "B", None),
        ("U", 5, "b", "B", None),
        ("D", 2, "old", "S", None),
        ("I", 6, "c", "S", None),
        ("D", 3, None, None, None),
        ("I", 7, "d", None, ["big"]),
    ]
    assert append_rows(batch, ["id"]).column("big").to_pylist()[:4] == ["B"] * 4

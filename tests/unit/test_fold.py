"""sink.fold: per-key folding and TOAST/delete carry-over, pure Arrow (no Delta, no server)."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from cdcengine.sink.fold import append_rows, fold_for_merge, unresolved_rows

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("v", pa.string()),
        ("big", pa.string()),
        ("doc", pa.string()),
        ("_cdc_op", pa.string()),
        ("_cdc_lsn", pa.int64()),
        ("_cdc_seq", pa.int64()),
        ("_cdc_committed_at", pa.timestamp("us", tz="UTC")),
        ("_cdc_unchanged", pa.list_(pa.string())),
    ]
)


def changes(rows: Sequence[Mapping[str, object]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows in WAL order; `_cdc_lsn`/`_cdc_seq`/`_cdc_committed_at` filled from the position."""
    filled = []
    for i, row in enumerate(rows):
        r: dict[str, object] = {
            "_cdc_lsn": 1000 + i,
            "_cdc_seq": i,
            "_cdc_committed_at": T0 + timedelta(seconds=i),
        }
        r.update(row)
        filled.append(r)
    return pa.Table.from_pylist(filled, schema=schema)


def by_id(table: pa.Table) -> dict[object, dict[str, object]]:
    return {r["id"]: r for r in table.to_pylist()}


def test_unique_keys_pass_through_unchanged() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B", "doc": "d"},
            {"_cdc_op": "U", "id": 2, "v": "b", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "D", "id": 3},
        ]
    )
    out = fold_for_merge(batch, ["id"])
    assert out.drop_columns(["_cdc_has_values"]).equals(batch)
    assert out.column("_cdc_has_values").to_pylist() == [True, True, False]


def test_last_change_wins_and_carries_its_position() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B", "doc": "d"},
            {"_cdc_op": "U", "id": 1, "v": "b", "big": "B2", "doc": "d2"},
            {"_cdc_op": "U", "id": 1, "v": "c", "big": "B3", "doc": None},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert row["_cdc_op"] == "U"
    assert (row["v"], row["big"], row["doc"]) == ("c", "B3", None)  # a real NULL stays NULL
    assert (row["_cdc_lsn"], row["_cdc_seq"]) == (1002, 2)
    assert row["_cdc_committed_at"] == T0 + timedelta(seconds=2)
    assert row["_cdc_unchanged"] is None


def test_unchanged_toast_takes_value_from_earlier_insert() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "BIG", "doc": "DOC"},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big", "doc"]},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert (row["v"], row["big"], row["doc"]) == ("b", "BIG", "DOC")
    assert row["_cdc_unchanged"] is None
    assert row["_cdc_op"] == "U"


def test_unchanged_toast_from_earlier_update_and_through_chains() -> None:
    batch = changes(
        [
            {"_cdc_op": "U", "id": 1, "v": "a", "big": "B1", "_cdc_unchanged": ["doc"]},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big", "doc"]},
            {"_cdc_op": "U", "id": 1, "v": "c", "_cdc_unchanged": ["big", "doc"]},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert (row["v"], row["big"], row["doc"]) == ("c", "B1", None)
    assert row["_cdc_unchanged"] == ["doc"]  # never known in the batch: the merge keeps target's


def test_unchanged_alone_stays_listed() -> None:
    batch = changes(
        [
            {"_cdc_op": "U", "id": 1, "v": "a", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big"]},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert row["v"] == "b"
    assert row["big"] is None
    assert row["_cdc_unchanged"] == ["big"]


def test_insert_then_delete_ends_as_delete_with_last_values() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B", "doc": "D"},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "D", "id": 1},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert row["_cdc_op"] == "D"
    assert (row["v"], row["big"], row["doc"]) == ("b", "B", None)
    assert row["_cdc_lsn"] == 1002
    assert row["_cdc_has_values"] is True
    assert row["_cdc_unchanged"] is None  # every value known: the merge writes them all


def test_update_then_delete_lists_what_the_batch_did_not_know() -> None:
    batch = changes(
        [
            {"_cdc_op": "U", "id": 1, "v": "x", "doc": None, "_cdc_unchanged": ["big"]},
            {"_cdc_op": "D", "id": 1},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert (row["_cdc_op"], row["v"], row["big"], row["doc"]) == ("D", "x", None, None)
    assert row["_cdc_has_values"] is True
    assert row["_cdc_unchanged"] == ["big"]  # keep the stored big; doc really is NULL now


def test_delete_without_history_keeps_only_key() -> None:
    batch = changes([{"_cdc_op": "D", "id": 7}, {"_cdc_op": "D", "id": 7}])
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert row["_cdc_op"] == "D"
    assert row["v"] is None
    assert row["_cdc_lsn"] == 1001
    assert row["_cdc_has_values"] is False  # says nothing about the row's values
    assert row["_cdc_unchanged"] is None


def test_batch_without_unchanged_column() -> None:
    schema = pa.schema([f for f in SCHEMA if f.name != "_cdc_unchanged"])
    batch = changes(
        [{"_cdc_op": "I", "id": 1, "v": "a"}, {"_cdc_op": "U", "id": 1, "v": "b"}], schema
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert (row["v"], row["_cdc_unchanged"], row["_cdc_has_values"]) == ("b", None, True)
    assert append_rows(batch, ["id"]).schema == schema


def test_delete_with_full_identity_values_keeps_its_own() -> None:
    batch = changes(
        [
            {"_cdc_op": "U", "id": 1, "v": "x", "big": "B"},
            {"_cdc_op": "D", "id": 1, "v": "old-full", "big": None},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert row["v"] == "old-full"  # the delete's own (REPLICA IDENTITY FULL) value
    assert row["big"] == "B"  # unknown in the delete: carried
    assert (row["_cdc_has_values"], row["_cdc_unchanged"]) == (True, None)


def test_delete_then_insert_revives() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B", "doc": "D"},
            {"_cdc_op": "D", "id": 1},
            {"_cdc_op": "I", "id": 1, "v": "again", "big": None, "doc": "D2"},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert row["_cdc_op"] == "I"
    assert (row["v"], row["big"], row["doc"]) == ("again", None, "D2")
    assert row["_cdc_lsn"] == 1002


def test_revive_then_unchanged_update_does_not_reach_past_the_insert() -> None:
    batch = changes(
        [
            {"_cdc_op": "U", "id": 1, "v": "a", "big": "OLD"},
            {"_cdc_op": "D", "id": 1},
            {"_cdc_op": "I", "id": 1, "v": "b", "big": "NEW"},
            {"_cdc_op": "U", "id": 1, "v": "c", "_cdc_unchanged": ["big"]},
        ]
    )
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert (row["_cdc_op"], row["v"], row["big"]) == ("U", "c", "NEW")


def test_key_change_is_delete_plus_insert() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B"},
            {"_cdc_op": "D", "id": 1},
            {"_cdc_op": "I", "id": 2, "v": "a", "big": "B"},
        ]
    )
    rows = by_id(fold_for_merge(batch, ["id"]))
    assert rows[1]["_cdc_op"] == "D"
    assert rows[1]["v"] == "a"
    assert rows[2]["_cdc_op"] == "I"


def test_output_in_wal_order_of_last_changes() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 3, "v": "a"},
            {"_cdc_op": "I", "id": 1, "v": "b"},
            {"_cdc_op": "U", "id": 3, "v": "c"},
            {"_cdc_op": "I", "id": 2, "v": "d"},
        ]
    )
    out = fold_for_merge(batch, ["id"])
    assert out.column("id").to_pylist() == [1, 3, 2]
    assert out.column("_cdc_lsn").to_pylist() == [1001, 1002, 1003]
    assert out.schema == batch.schema.append(pa.field("_cdc_has_values", pa.bool_(), False))


def test_composite_and_string_keys() -> None:
    schema = pa.schema(
        [("tenant", pa.string()), ("n", pa.int32()), ("v", pa.string()), *list(SCHEMA)[4:]]
    )
    batch = changes(
        [
            {"_cdc_op": "I", "tenant": "a", "n": 1, "v": "x"},
            {"_cdc_op": "I", "tenant": "b", "n": 1, "v": "y"},
            {"_cdc_op": "U", "tenant": "a", "n": 1, "v": "x2"},
            {"_cdc_op": "I", "tenant": "a", "n": 2, "v": "z"},
        ],
        schema,
    )
    out = fold_for_merge(batch, ["tenant", "n"])
    assert sorted((r["tenant"], r["n"], r["v"]) for r in out.to_pylist()) == [
        ("a", 1, "x2"),
        ("a", 2, "z"),
        ("b", 1, "y"),
    ]


def test_null_key_parts_group_together() -> None:
    schema = pa.schema(
        [("a", pa.int64()), ("b", pa.int64()), ("v", pa.string()), *list(SCHEMA)[4:]]
    )
    batch = changes(
        [
            {"_cdc_op": "I", "a": 1, "b": None, "v": "x"},
            {"_cdc_op": "U", "a": 1, "b": None, "v": "y"},
            {"_cdc_op": "I", "a": 1, "b": 2, "v": "z"},
        ],
        schema,
    )
    out = fold_for_merge(batch, ["a", "b"])
    assert sorted(out.column("v").to_pylist()) == ["y", "z"]


def test_chunked_input() -> None:
    a = changes([{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"}])
    b = changes(
        [
            {
                "_cdc_op": "U",
                "id": 1,
                "v": "b",
                "_cdc_unchanged": ["big"],
                "_cdc_lsn": 1001,
                "_cdc_seq": 1,
            }
        ]
    )
    batch = pa.concat_tables([a, b])
    assert batch.column("id").num_chunks == 2
    [row] = fold_for_merge(batch, ["id"]).to_pylist()
    assert (row["v"], row["big"], row["_cdc_unchanged"]) == ("b", "B", None)


def test_empty_batch() -> None:
    empty = SCHEMA.empty_table()
    assert fold_for_merge(empty, ["id"]).num_rows == 0
    assert fold_for_merge(empty, ["id"]).column_names[-1] == "_cdc_has_values"
    assert append_rows(empty, ["id"]).num_rows == 0


def test_invalid_input_is_rejected() -> None:
    batch = changes([{"_cdc_op": "T"}, {"_cdc_op": "I", "id": 1}])
    with pytest.raises(ValueError, match="cannot be merged"):
        fold_for_merge(batch, ["id"])
    with pytest.raises(ValueError, match="key columns"):
        fold_for_merge(batch, [])
    with pytest.raises(ValueError, match="lacks column"):
        fold_for_merge(batch, ["nope"])


def test_append_rows_fills_toast_and_deletes_in_place() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B", "doc": "D"},
            {"_cdc_op": "U", "id": 2, "v": "x", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big", "doc"]},
            {"_cdc_op": "D", "id": 1},
            {"_cdc_op": "D", "id": 2},
        ]
    )
    out = append_rows(batch, ["id"])
    assert out.num_rows == batch.num_rows
    assert out.schema == batch.schema
    assert out.column("_cdc_seq").to_pylist() == [0, 1, 2, 3, 4]
    rows = out.to_pylist()
    assert (rows[2]["v"], rows[2]["big"], rows[2]["doc"], rows[2]["_cdc_unchanged"]) == (
        "b",
        "B",
        "D",
        None,
    )
    assert (rows[3]["_cdc_op"], rows[3]["v"], rows[3]["big"], rows[3]["doc"]) == (
        "D",
        "b",
        "B",
        "D",
    )
    # key 2: never known -> stays listed; its delete carries what the batch knew
    assert rows[1]["_cdc_unchanged"] == ["big"]
    assert (rows[4]["v"], rows[4]["big"]) == ("x", None)
    assert unresolved_rows(out) == 1


def test_append_rows_without_key_fills_nothing_and_normalises_empty_lists() -> None:
    batch = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B", "_cdc_unchanged": []},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big"]},
        ]
    )
    out = append_rows(batch)
    assert out.column("_cdc_unchanged").to_pylist() == [None, ["big"]]
    assert out.column("big").to_pylist() == ["B", None]


def test_fold_200k_rows_performance_sanity() -> None:
    """Prints timings; only correctness is asserted (machines differ)."""
    n, keys = 200_000, 50_000
    rnd = random.Random(7)
    ids = [rnd.randrange(keys) for _ in range(n)]
    ops = [rnd.choice("IUUUD") for _ in range(n)]
    unchanged = [["big"] if op == "U" and rnd.random() < 0.5 else None for op in ops]
    batch = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "v": pa.array([str(i) for i in range(n)]),
            "big": pa.array([None if u else "x" * 32 for u in unchanged]),
            "doc": pa.array(["d"] * n),
            "_cdc_op": pa.array(ops),
            "_cdc_lsn": pa.array(range(n), pa.int64()),
            "_cdc_seq": pa.array(range(n), pa.int64()),
            "_cdc_committed_at": pa.array([T0] * n, pa.timestamp("us", tz="UTC")),
            "_cdc_unchanged": pa.array(unchanged, pa.list_(pa.string())),
        },
        schema=SCHEMA,
    )
    fold_for_merge(batch.slice(0, 1000), ["id"])  # warm up Arrow kernels
    started = time.perf_counter()
    folded = fold_for_merge(batch, ["id"])
    fold_s = time.perf_counter() - started
    started = time.perf_counter()
    appended = append_rows(batch, ["id"])
    append_s = time.perf_counter() - started
    unique = batch.set_column(0, "id", pa.array(range(n), pa.int64()))
    started = time.perf_counter()
    fold_for_merge(unique, ["id"])
    unique_s = time.perf_counter() - started
    print(
        f"\nfold_for_merge 200k rows/{keys} keys: {fold_s * 1000:.0f} ms -> {folded.num_rows} rows;"
        f" append_rows: {append_s * 1000:.0f} ms; unique-key fast path: {unique_s * 1000:.0f} ms"
    )
    assert folded.num_rows == len(set(ids))
    assert appended.num_rows == n
    last_lsn = {}
    for lsn, key in enumerate(ids):
        last_lsn[key] = lsn
    assert (
        dict(
            zip(folded.column("id").to_pylist(), folded.column("_cdc_lsn").to_pylist(), strict=True)
        )
        == last_lsn
    )

"""DeltaSink against real Delta tables in tmp_path, read back with deltalake and duckdb."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError

from cdcengine.config import TableMode
from cdcengine.names import TableRef
from cdcengine.sink import (
    AddedColumns,
    CommitResult,
    Sink,
    SinkSchemaError,
    SinkWriteError,
    TableKind,
    TableSpec,
)
from cdcengine.sink.delta import DeltaMaintenance, DeltaSink, _table_specific, widens

REF = TableRef("public", "orders")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ENGINE = [
    pa.field("_cdc_op", pa.string()),
    pa.field("_cdc_lsn", pa.int64()),
    pa.field("_cdc_seq", pa.int64()),
    pa.field("_cdc_committed_at", pa.timestamp("us", tz="UTC")),
    pa.field("_cdc_unchanged", pa.list_(pa.string())),
]
SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.string()), ("big", pa.string()), *ENGINE])


def changes(rows: Sequence[Mapping[str, object]], lsn: int, schema: pa.Schema = SCHEMA) -> pa.Table:
    """One transaction's changes at end LSN `lsn` (commit time T0 + lsn seconds)."""
    at = T0 + timedelta(seconds=lsn)
    return pa.Table.from_pylist(
        [
            {"_cdc_lsn": lsn, "_cdc_seq": i, "_cdc_committed_at": at, **row}
            for i, row in enumerate(rows)
        ],
        schema=schema,
    )


@pytest.fixture
def sink(tmp_path: Path) -> DeltaSink:
    return DeltaSink(str(tmp_path / "dest"), source="src1")


def duck(query: str, dset: object) -> list[tuple[object, ...]]:
    """Run `query` in duckdb with `dset` (a pyarrow dataset of a Delta snapshot) as `dset`.

    duckdb 2.0 cannot load its delta extension offline; reading through
    `DeltaTable.to_pyarrow_dataset()` keeps the Delta log as the source of truth.
    """
    con = duckdb.connect()
    con.register("dset", dset)
    relation = con.sql(query)
    assert relation is not None
    return relation.fetchall()


def consolidated(sink: DeltaSink, ref: TableRef = REF) -> dict[object, dict[str, object]]:
    return {r["id"]: r for r in sink.read_table(ref, "consolidated").to_pylist()}


def delta_version(sink: DeltaSink, kind: str = "consolidated", ref: TableRef = REF) -> int:
    return DeltaTable(sink.path(ref, kind)).version()


def write(
    sink: DeltaSink, rows: Sequence[Mapping[str, object]], lsn: int, *, hard_deletes: bool = False
) -> CommitResult:
    return sink.write_consolidated(
        REF, changes(rows, lsn), key=["id"], version=lsn, hard_deletes=hard_deletes
    )


# --- creation, progress -------------------------------------------------------------------


def test_first_write_creates_table_with_layout_stats_and_txn(sink: DeltaSink) -> None:
    result = write(
        sink,
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B"},
            {"_cdc_op": "I", "id": 2, "v": "b", "big": "C"},
        ],
        100,
    )
    path = sink.path(REF, "consolidated")
    assert path.endswith("/dest/public/orders")
    dt = DeltaTable(path)
    config = dt.metadata().configuration
    assert config["cdcengine.layout"] == "1"
    assert config["delta.dataSkippingStatsColumns"] == "`id`,`_cdc_lsn`"
    assert pa.schema(dt.schema().to_arrow()).names == [
        "id",
        "v",
        "big",
        "_cdc_lsn",
        "_cdc_committed_at",
        "_cdc_deleted",
        "_cdc_deleted_at",
    ]
    assert dt.transaction_version("cdcengine/src1/public.orders/consolidated") == 100
    assert sink.applied_version(REF, TableKind.CONSOLIDATED) == 100
    assert sink.applied_version(REF, "append") is None
    assert result.version == 100 and not result.skipped and result.inserted == 2
    json.dumps(result.to_dict())
    stats = pa.table(dt.get_add_actions(flatten=True)).column_names
    assert "min.id" in stats and "min._cdc_lsn" in stats and "min.v" not in stats
    dset = dt.to_pyarrow_dataset()
    assert duck("select id, v, big, _cdc_lsn, _cdc_deleted from dset order by id", dset) == [
        (1, "a", "B", 100, False),
        (2, "b", "C", 100, False),
    ]


def test_delta_sink_satisfies_the_sink_protocol(sink: DeltaSink) -> None:
    as_sink: Sink = sink  # the static check is mypy's
    assert as_sink.applied_version(REF, TableKind.APPEND) is None
    assert "storage" not in repr(sink)


def test_applied_version_none_without_table(sink: DeltaSink) -> None:
    assert sink.applied_version(REF, "consolidated") is None
    assert sink.resume_version(REF, TableMode.BOTH) is None
    assert sink.row_count(REF, "consolidated") is None
    assert not sink.exists(REF, "append")
    with pytest.raises(LookupError):
        sink.read_table(REF, "consolidated")


def test_replay_of_same_or_lower_version_is_skipped(sink: DeltaSink) -> None:
    rows = [{"_cdc_op": "I", "id": 1, "v": "a"}]
    write(sink, rows, 100)
    before = delta_version(sink)
    again = write(sink, rows, 100)
    lower = write(sink, [{"_cdc_op": "U", "id": 1, "v": "zzz"}], 50)
    assert again.skipped and again.version == 100
    assert lower.skipped and lower.version == 100
    assert delta_version(sink) == before
    assert consolidated(sink)[1]["v"] == "a"
    # a fresh sink (a restart) sees the same
    assert DeltaSink(sink.destination, source="src1").applied_version(REF, "consolidated") == 100
    # another source name is another app id
    assert DeltaSink(sink.destination, source="other").applied_version(REF, "consolidated") is None


def test_empty_batch_commits_txn_only(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    before = delta_version(sink)
    result = write(sink, [], 200)
    assert delta_version(sink) == before + 1
    assert result.delta_version == before + 1
    assert sink.applied_version(REF, "consolidated") == 200
    assert sink.row_count(REF, "consolidated") == 1


def test_first_write_may_be_empty(sink: DeltaSink) -> None:
    write(sink, [], 100)
    assert sink.applied_version(REF, "consolidated") == 100
    assert sink.row_count(REF, "consolidated") == 0


def test_merge_that_changes_nothing_still_records_progress(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    before = delta_version(sink)
    write(sink, [{"_cdc_op": "D", "id": 42}], 200)  # delete of an unknown key: a no-op merge
    assert delta_version(sink) == before + 1
    assert sink.applied_version(REF, "consolidated") == 200
    assert set(consolidated(sink)) == {1}


def test_batch_lsn_above_version_is_rejected(sink: DeltaSink) -> None:
    with pytest.raises(ValueError, match="above its version"):
        sink.write_consolidated(
            REF, changes([{"_cdc_op": "I", "id": 1}], 300), key=["id"], version=200
        )


# --- merge semantics ----------------------------------------------------------------------


def test_update_and_soft_delete_keep_last_values(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": i, "v": f"v{i}", "big": f"B{i}"} for i in (1, 2, 3)], 100)
    result = write(
        sink, [{"_cdc_op": "U", "id": 1, "v": "new", "big": "NB"}, {"_cdc_op": "D", "id": 2}], 200
    )
    rows = consolidated(sink)
    assert (rows[1]["v"], rows[1]["big"], rows[1]["_cdc_lsn"]) == ("new", "NB", 200)
    assert rows[2]["_cdc_deleted"] is True
    assert rows[2]["_cdc_deleted_at"] == T0 + timedelta(seconds=200)
    assert (rows[2]["v"], rows[2]["big"], rows[2]["_cdc_lsn"]) == ("v2", "B2", 200)
    assert rows[2]["_cdc_committed_at"] == T0 + timedelta(seconds=200)
    assert (rows[3]["_cdc_lsn"], rows[3]["_cdc_deleted"]) == (100, False)
    assert result.updated == 2
    dset = DeltaTable(sink.path(REF, "consolidated")).to_pyarrow_dataset()
    assert duck("select count(*) from dset where not _cdc_deleted", dset) == [(2,)]
    assert sink.row_count(REF, "consolidated", live_only=True) == 2
    assert sink.row_count(REF, "consolidated") == 3


def test_update_then_delete_in_one_batch_keeps_the_last_values(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": i, "v": "a", "big": "STORED"} for i in (1, 2)], 100)
    write(
        sink,
        [
            {"_cdc_op": "U", "id": 1, "v": "x", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 2, "v": "y", "big": None},
            {"_cdc_op": "D", "id": 1},
            {"_cdc_op": "D", "id": 2},
        ],
        200,
    )
    rows = consolidated(sink)
    assert (rows[1]["v"], rows[1]["big"], rows[1]["_cdc_deleted"]) == ("x", "STORED", True)
    assert (rows[2]["v"], rows[2]["big"], rows[2]["_cdc_deleted"]) == ("y", None, True)
    assert rows[1]["_cdc_deleted_at"] == T0 + timedelta(seconds=200)


def test_hard_delete_removes_row(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": i, "v": "x"} for i in (1, 2)], 100, hard_deletes=True)
    result = write(sink, [{"_cdc_op": "D", "id": 2}], 200, hard_deletes=True)
    assert set(consolidated(sink)) == {1}
    assert result.deleted == 1
    dset = DeltaTable(sink.path(REF, "consolidated")).to_pyarrow_dataset()
    assert duck("select count(*), bool_or(_cdc_deleted) from dset", dset) == [(1, False)]


def test_revive_after_delete_in_a_later_batch(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"}], 100)
    write(sink, [{"_cdc_op": "D", "id": 1}], 200)
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "back", "big": None}], 300)
    [row] = consolidated(sink).values()
    assert (row["v"], row["big"], row["_cdc_deleted"], row["_cdc_deleted_at"]) == (
        "back",
        None,
        False,
        None,
    )
    assert row["_cdc_lsn"] == 300


def test_delete_and_reinsert_in_one_batch_revives(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    write(sink, [{"_cdc_op": "D", "id": 1}, {"_cdc_op": "I", "id": 1, "v": "b"}], 200)
    [row] = consolidated(sink).values()
    assert (row["v"], row["_cdc_deleted"]) == ("b", False)


def test_key_change_as_delete_plus_insert(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"}], 100)
    write(sink, [{"_cdc_op": "D", "id": 1}, {"_cdc_op": "I", "id": 5, "v": "a", "big": "B"}], 200)
    rows = consolidated(sink)
    assert rows[1]["_cdc_deleted"] is True and rows[1]["v"] == "a"
    assert rows[5]["_cdc_deleted"] is False and rows[5]["big"] == "B"


def test_unchanged_toast_keeps_stored_value(sink: DeltaSink) -> None:
    write(
        sink,
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "STORED"},
            {"_cdc_op": "I", "id": 2, "v": "b", "big": "KEEP"},
        ],
        100,
    )
    write(
        sink,
        [
            {"_cdc_op": "U", "id": 1, "v": "a2", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 2, "v": "b2", "big": "CHANGED"},
        ],
        200,
    )
    rows = consolidated(sink)
    assert (rows[1]["v"], rows[1]["big"]) == ("a2", "STORED")
    assert (rows[2]["v"], rows[2]["big"]) == ("b2", "CHANGED")


def test_unchanged_toast_inserted_and_updated_in_same_batch(sink: DeltaSink) -> None:
    # on the creating write ...
    write(
        sink,
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "FIRST"},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big"]},
        ],
        100,
    )
    assert consolidated(sink)[1]["big"] == "FIRST"
    # ... and through the merge
    result = write(
        sink,
        [
            {"_cdc_op": "I", "id": 2, "v": "a", "big": "SECOND"},
            {"_cdc_op": "U", "id": 2, "v": "b", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 1, "v": "c", "_cdc_unchanged": ["big"]},
        ],
        200,
    )
    rows = consolidated(sink)
    assert (rows[1]["v"], rows[1]["big"]) == ("c", "FIRST")
    assert (rows[2]["v"], rows[2]["big"]) == ("b", "SECOND")
    assert result.unresolved_unchanged == 0


def test_unresolvable_unchanged_toast_is_counted(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a", "big": "B"}], 100)
    result = write(
        sink,
        [
            {"_cdc_op": "U", "id": 9, "v": "x", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 1, "v": "y", "_cdc_unchanged": ["big"]},
        ],
        200,
    )
    assert result.unresolved_unchanged == 1
    rows = consolidated(sink)
    assert (rows[9]["v"], rows[9]["big"]) == ("x", None)
    assert rows[1]["big"] == "B"


def test_duplicate_keys_in_batch_never_duplicate_rows(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    batch = [
        {"_cdc_op": "I", "id": 2, "v": "x"},  # new key, three changes: not-matched branch
        {"_cdc_op": "U", "id": 2, "v": "y"},
        {"_cdc_op": "U", "id": 2, "v": "z"},
        {"_cdc_op": "U", "id": 1, "v": "b"},  # existing key, two changes: matched branch
        {"_cdc_op": "U", "id": 1, "v": "c"},
    ]
    write(sink, batch, 200)
    table = sink.read_table(REF, "consolidated")
    assert table.num_rows == 2
    assert sorted(
        zip(table.column("id").to_pylist(), table.column("v").to_pylist(), strict=True)
    ) == [(1, "c"), (2, "z")]
    dset = DeltaTable(sink.path(REF, "consolidated")).to_pyarrow_dataset()
    assert duck("select count(*), count(distinct id) from dset", dset) == [(2, 2)]


def test_composite_and_quoted_key_columns(sink: DeltaSink) -> None:
    ref = TableRef("Sales", "line_Items")
    schema = pa.schema(
        [("Order ID", pa.string()), ("line", pa.int32()), ("it's", pa.string()), *ENGINE]
    )
    spec = ["Order ID", "line"]
    sink.write_consolidated(
        ref,
        changes(
            [
                {"_cdc_op": "I", "Order ID": "o'1", "line": 1, "it's": "a"},
                {"_cdc_op": "I", "Order ID": "o'1", "line": 2, "it's": "b"},
            ],
            100,
            schema,
        ),
        key=spec,
        version=100,
    )
    sink.write_consolidated(
        ref,
        changes(
            [
                {"_cdc_op": "U", "Order ID": "o'1", "line": 2, "_cdc_unchanged": ["it's"]},
                {"_cdc_op": "D", "Order ID": "o'1", "line": 1},
                {"_cdc_op": "I", "Order ID": "o\\2", "line": 1, "it's": "c"},
            ],
            200,
            schema,
        ),
        key=spec,
        version=200,
    )
    assert sink.path(ref, "consolidated").endswith("/Sales/line_Items")
    rows = {(r["Order ID"], r["line"]): r for r in sink.read_table(ref, "consolidated").to_pylist()}
    assert rows[("o'1", 2)]["it's"] == "b"
    assert rows[("o'1", 1)]["_cdc_deleted"] is True
    assert rows[("o\\2", 1)]["it's"] == "c"
    assert sink.applied_version(ref, "consolidated") == 200
    config = DeltaTable(sink.path(ref, "consolidated")).metadata().configuration
    assert config["delta.dataSkippingStatsColumns"] == "`Order ID`,`line`,`_cdc_lsn`"


def test_table_names_needing_escapes_round_trip(sink: DeltaSink) -> None:
    """Segments are escaped with `~XX` (delta-rs percent-decodes paths it reads back)."""
    ref = TableRef("my.schema", "line items")
    assert sink.path(ref, "consolidated").endswith("/my~2Eschema/line~20items")
    sink.write_consolidated(
        ref, changes([{"_cdc_op": "I", "id": 1}], 100), key=["id"], version=100
    )
    assert sink.applied_version(ref, "consolidated") == 100
    assert sink.row_count(ref, "consolidated") == 1


def test_destination_with_percent_is_refused_before_writing(tmp_path: Path) -> None:
    """delta-rs 1.6.6 writes `.../a%20b/_delta_log/0.json` and then reads `.../a b/...`:
    refuse such a path with a clear, non-retryable error before writing anything."""
    bad = DeltaSink(str(tmp_path / "lake%20x"), source="shop")
    with pytest.raises(SinkWriteError, match="'%'") as info:
        bad.write_consolidated(
            REF, changes([{"_cdc_op": "I", "id": 1}], 100), key=["id"], version=100
        )
    assert info.value.retryable is False
    assert not Path(bad.path(REF, "consolidated")).exists()


def test_string_key_range_predicate(sink: DeltaSink) -> None:
    schema = pa.schema([("code", pa.string()), ("v", pa.int64()), *ENGINE])
    ref = TableRef("public", "codes")
    rows = [{"_cdc_op": "I", "code": c, "v": 1} for c in ("a'", "b", "c\\")]
    sink.write_consolidated(ref, changes(rows, 100, schema), key=["code"], version=100)
    upd = [{"_cdc_op": "U", "code": c, "v": 2} for c in ("a'", "c\\")]
    sink.write_consolidated(ref, changes(upd, 200, schema), key=["code"], version=200)
    got = {r["code"]: r["v"] for r in sink.read_table(ref, "consolidated").to_pylist()}
    assert got == {"a'": 2, "b": 1, "c\\": 2}


def test_merge_prunes_files_outside_the_key_range(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": i, "v": "x"} for i in range(0, 100)], 100)
    for n, lsn in ((1, 200), (2, 300), (3, 400)):  # three more files, disjoint id ranges
        write(sink, [{"_cdc_op": "I", "id": n * 1000 + i, "v": "x"} for i in range(100)], lsn)
    write(
        sink, [{"_cdc_op": "U", "id": 2005, "v": "y"}, {"_cdc_op": "U", "id": 2007, "v": "y"}], 500
    )
    metrics = DeltaTable(sink.path(REF, "consolidated")).history(1)[0]["operationMetrics"]
    assert metrics["num_target_files_removed"] == 1
    assert metrics["num_target_files_skipped_during_scan"] >= 3
    assert sink.row_count(REF, "consolidated") == 400


# --- append table -------------------------------------------------------------------------


def test_append_table_rows_order_and_uniqueness(sink: DeltaSink) -> None:
    b1 = changes(
        [
            {"_cdc_op": "I", "id": 1, "v": "a", "big": "B"},
            {"_cdc_op": "U", "id": 1, "v": "b", "_cdc_unchanged": ["big"]},
            {"_cdc_op": "U", "id": 2, "v": "x", "_cdc_unchanged": ["big"]},
        ],
        100,
    )
    b2 = changes([{"_cdc_op": "D", "id": 1}], 200)
    sink.write_append(REF, b1, version=100, key=["id"])
    sink.write_append(REF, b2, version=200, key=["id"])
    replay = sink.write_append(REF, b2, version=200, key=["id"])
    assert replay.skipped
    path = sink.path(REF, "append")
    assert path.endswith("/public/orders_cdc")
    dt = DeltaTable(path)
    assert dt.transaction_version("cdcengine/src1/public.orders/append") == 200
    assert pa.schema(dt.schema().to_arrow()).names == [
        "id",
        "v",
        "big",
        "_cdc_lsn",
        "_cdc_seq",
        "_cdc_op",
        "_cdc_committed_at",
        "_cdc_unchanged",
    ]
    dset = dt.to_pyarrow_dataset()
    rows = duck(
        "select _cdc_lsn, _cdc_seq, _cdc_op, id, v, big, _cdc_unchanged from dset "
        "order by _cdc_lsn, _cdc_seq",
        dset,
    )
    assert rows == [
        (100, 0, "I", 1, "a", "B", None),
        (100, 1, "U", 1, "b", "B", None),  # filled from the insert in the same batch
        (100, 2, "U", 2, "x", None, ["big"]),  # unresolvable: stays listed
        (200, 0, "D", 1, None, None, None),  # another batch: nothing known to carry
    ]
    assert duck("select count(*) = count(distinct (_cdc_lsn, _cdc_seq)) from dset", dset) == [
        (True,)
    ]


def test_write_both_modes_and_resume_version(sink: DeltaSink) -> None:
    spec = TableSpec(key=("id",), mode=TableMode.BOTH)
    result = sink.write(
        REF, changes([{"_cdc_op": "I", "id": 1, "v": "a"}], 100), spec=spec, version=100
    )
    assert result.version == 100
    assert [c.kind for c in result.commits] == [TableKind.APPEND, TableKind.CONSOLIDATED]
    json.dumps(result.to_dict())
    # the append table got ahead (e.g. a crash between the two commits)
    sink.write_append(REF, changes([{"_cdc_op": "U", "id": 1, "v": "b"}], 200), version=200)
    assert sink.resume_version(REF, TableMode.BOTH) == 100
    assert sink.resume_version(REF, TableMode.APPEND) == 200
    again = sink.write(
        REF, changes([{"_cdc_op": "U", "id": 1, "v": "b"}], 200), spec=spec, version=200
    )
    assert [c.skipped for c in again.commits] == [True, False]
    assert again.version == 200
    assert sink.read_table(REF, "append").num_rows == 2
    assert consolidated(sink)[1]["v"] == "b"


def test_write_leaves_out_what_each_kind_applied(sink: DeltaSink) -> None:
    """A replayed batch straddling the applied versions (a crash between the kinds): each kind
    gets only the rows it lacks; a kind with none left is skipped without a commit, and the
    durable position is still the batch's version."""
    spec = TableSpec(key=("id",), mode=TableMode.BOTH)
    first = changes([{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    second = changes([{"_cdc_op": "U", "id": 1, "v": "b"}], 200)
    sink.write(REF, first, spec=spec, version=100)
    sink.write_append(REF, second, version=200, key=["id"])
    replay = pa.concat_tables([first, second, changes([{"_cdc_op": "I", "id": 2, "v": "c"}], 300)])
    result = sink.write(REF, replay, spec=spec, version=300)
    assert result.version == 300
    app, cons = result.commits
    assert (app.skipped, app.rows_in, cons.skipped, cons.rows_in) == (False, 1, False, 2)
    assert app.bytes_in > 0
    assert cons.newest_commit_us == int((T0 + timedelta(seconds=300)).timestamp() * 1_000_000)
    # the transactions each kind made durable: only those above its applied version
    at = lambda s: int((T0 + timedelta(seconds=s)).timestamp() * 1_000_000)  # noqa: E731
    assert sorted(cons.transactions) == [(200, at(200)), (300, at(300))]
    assert app.transactions == ((300, at(300)),)
    assert sink.row_count(REF, "append") == 3
    assert {k: r["v"] for k, r in consolidated(sink).items()} == {1: "b", 2: "c"}
    versions = (delta_version(sink), delta_version(sink, "append"))
    again = sink.write(REF, replay, spec=spec, version=300)
    assert all(c.skipped and c.rows_in == 0 for c in again.commits) and again.version == 300
    # the table's last change lies below a later batch's version: durable at that version
    later = sink.write(REF, replay, spec=spec, version=400)
    assert all(c.skipped for c in later.commits) and later.version == 400
    assert (delta_version(sink), delta_version(sink, "append")) == versions
    assert sink.resume_version(REF, TableMode.BOTH) == 300


def test_write_fills_an_added_columns_constant_default(sink: DeltaSink) -> None:
    spec = TableSpec(key=("id",), mode=TableMode.CONSOLIDATED)
    sink.write(REF, changes([{"_cdc_op": "I", "id": 1, "v": "a"}, {"_cdc_op": "I", "id": 3}], 100),
               spec=spec, version=100)
    wide = pa.schema([*SCHEMA.remove(SCHEMA.get_field_index("big")), ("n", pa.int64())])
    batch = pa.concat_tables([changes([{"_cdc_op": "U", "id": 1, "v": "b"}], 150, wide),
                              changes([{"_cdc_op": "I", "id": 2, "v": "c"}], 200, wide)])
    added = AddedColumns(values={"n": pa.scalar(7, pa.int64())}, upto=150)
    sink.write(REF, batch, spec=spec, version=200, added=added)
    rows = consolidated(sink)
    # stored rows and the batch's rows up to the change hold the default; later ones do not
    assert {k: r["n"] for k, r in rows.items()} == {1: 7, 2: None, 3: 7}
    assert sink.applied_version(REF, "consolidated") == 200


# --- schema -------------------------------------------------------------------------------


def test_new_column_added_midway(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    sink.write_append(REF, changes([{"_cdc_op": "I", "id": 1, "v": "a"}], 100), version=100)
    wider = pa.schema(
        [*list(SCHEMA)[:3], ("seen_at", pa.timestamp("us")), ("n", pa.decimal128(10, 3)), *ENGINE]
    )
    rows = [
        {
            "_cdc_op": "U",
            "id": 1,
            "v": "b",
            "seen_at": datetime(2024, 1, 2, 3, 4, 5),
            "n": Decimal("1.500"),
        },
        {"_cdc_op": "I", "id": 2, "v": "c", "seen_at": None, "n": Decimal("2.000")},
    ]
    result = sink.write_consolidated(REF, changes(rows, 200, wider), key=["id"], version=200)
    assert result.columns_added == ("seen_at", "n")
    app = sink.write_append(REF, changes(rows, 200, wider), version=200, key=["id"])
    assert app.columns_added == ("seen_at", "n")
    for kind in ("consolidated", "append"):
        dt = DeltaTable(sink.path(REF, kind))  # still readable: timestampNtz feature enabled
        assert "timestampNtz" in (dt.protocol().reader_features or [])
        assert dt.transaction_version(sink.app_id(REF, kind)) == 200
    got = consolidated(sink)
    assert got[1]["seen_at"] == datetime(2024, 1, 2, 3, 4, 5)
    assert got[2]["n"] == Decimal("2.000")
    # a later batch without the columns (dropped at the source): null for the rows it changes,
    # untouched rows keep their last values (SPEC §6)
    write(sink, [{"_cdc_op": "U", "id": 1, "v": "d"}], 300)
    assert consolidated(sink)[1]["n"] is None
    assert consolidated(sink)[2]["n"] == Decimal("2.000")
    sink.write_append(REF, changes([{"_cdc_op": "U", "id": 1, "v": "d"}], 300), version=300)
    assert sink.read_table(REF, "append").column("n").to_pylist() == [
        None,
        Decimal("1.500"),
        Decimal("2.000"),
        None,
    ]


def test_type_change_raises_schema_error(sink: DeltaSink) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    changed = pa.schema([("id", pa.int64()), ("v", pa.int64()), *ENGINE])
    with pytest.raises(SinkSchemaError) as info:
        sink.write_consolidated(
            REF, changes([{"_cdc_op": "U", "id": 1, "v": 5}], 200, changed), key=["id"], version=200
        )
    assert (info.value.column, info.value.stored, info.value.incoming) == ("v", "string", "int64")
    assert info.value.retryable is False
    assert sink.applied_version(REF, "consolidated") == 100


def test_values_that_do_not_fit_raise_schema_error(sink: DeltaSink) -> None:
    schema = pa.schema([("id", pa.int64()), ("at", pa.timestamp("us")), *ENGINE])
    write_ = sink.write_consolidated
    write_(
        REF, changes([{"_cdc_op": "I", "id": 1, "at": None}], 100, schema), key=["id"], version=100
    )
    nanos = pa.schema([("id", pa.int64()), ("at", pa.timestamp("ns")), *ENGINE])
    batch = changes([{"_cdc_op": "U", "id": 1}], 200, nanos)
    batch = batch.set_column(1, "at", pa.array([1], pa.timestamp("ns")))  # not whole microseconds
    with pytest.raises(SinkSchemaError, match="does not fit"):
        write_(REF, batch, key=["id"], version=200)
    assert sink.applied_version(REF, "consolidated") == 100


def test_case_clash_and_foreign_table_raise(sink: DeltaSink, tmp_path: Path) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    clash = pa.schema([("id", pa.int64()), ("V", pa.string()), *ENGINE])
    with pytest.raises(SinkSchemaError, match="ignore case"):
        sink.write_consolidated(
            REF, changes([{"_cdc_op": "U", "id": 1, "V": "x"}], 200, clash), key=["id"], version=200
        )
    other = TableRef("public", "foreign")
    write_deltalake(sink.path(other, "consolidated"), pa.table({"id": [1]}))
    with pytest.raises(SinkSchemaError, match="not a cdcengine"):
        sink.write_consolidated(
            other, changes([{"_cdc_op": "I", "id": 1}], 100), key=["id"], version=100
        )


def test_types_round_trip(sink: DeltaSink) -> None:
    schema = pa.schema(
        [
            ("id", pa.int32()),
            ("small", pa.int16()),
            ("flag", pa.bool_()),
            ("f4", pa.float32()),
            ("amount", pa.decimal128(12, 2)),
            ("wide", pa.decimal128(38, 10)),
            ("ts", pa.timestamp("us")),
            ("tstz", pa.timestamp("us", tz="UTC")),
            ("day", pa.date32()),
            ("raw", pa.binary()),
            ("tags", pa.list_(pa.string())),
            ("nums", pa.list_(pa.int64())),
            *ENGINE,
        ]
    )
    row = {
        "_cdc_op": "R",
        "id": 1,
        "small": -3,
        "flag": True,
        "f4": 1.5,
        "amount": Decimal("12345.67"),
        "wide": Decimal("1234567890.0123456789"),
        "ts": datetime(1999, 12, 31, 23, 59, 59, 999999),
        "tstz": T0,
        "day": date(2000, 2, 29),
        "raw": b"\x00\xff",
        "tags": ["a", None, "c"],
        "nums": [],
    }
    sink.write_consolidated(REF, changes([row], 100, schema), key=["id"], version=100)
    sink.write_append(REF, changes([row], 100, schema), version=100, key=["id"])
    update = {**row, "_cdc_op": "U", "amount": Decimal("-0.01"), "tags": None, "nums": [1, 2]}
    sink.write_consolidated(REF, changes([update], 200, schema), key=["id"], version=200)
    [got] = sink.read_table(REF, "consolidated").to_pylist()
    for name in ("small", "flag", "f4", "wide", "ts", "tstz", "day", "raw"):
        assert got[name] == row[name], name
    assert (got["amount"], got["tags"], got["nums"]) == (Decimal("-0.01"), None, [1, 2])
    stored = pa.schema(DeltaTable(sink.path(REF, "consolidated")).schema().to_arrow())
    assert stored.field("ts").type == pa.timestamp("us")
    assert stored.field("amount").type == pa.decimal128(12, 2)
    dset = DeltaTable(sink.path(REF, "append")).to_pyarrow_dataset()
    assert duck("select amount, ts, day, tags, nums, _cdc_op from dset", dset) == [
        (Decimal("12345.67"), row["ts"], row["day"], ["a", None, "c"], [], "R")
    ]


# --- crash, upkeep -------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_crash_after_commit_before_return_is_applied_on_restart(
    sink: DeltaSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(sink, [{"_cdc_op": "I", "id": 1, "v": "a"}], 100)
    sink.write_append(REF, changes([{"_cdc_op": "I", "id": 1, "v": "a"}], 100), version=100)

    def crash(*_: object) -> None:
        raise Crash("process died after the Delta commit")

    monkeypatch.setattr(sink, "_after_commit", crash)
    batch = changes([{"_cdc_op": "U", "id": 1, "v": "b"}, {"_cdc_op": "I", "id": 2, "v": "c"}], 200)
    with pytest.raises(Crash):
        sink.write_consolidated(REF, batch, key=["id"], version=200)
    with pytest.raises(Crash):
        sink.write_append(REF, batch, version=200, key=["id"])

    restarted = DeltaSink(sink.destination, source="src1")
    assert restarted.resume_version(REF, TableMode.BOTH) == 200
    versions = (delta_version(restarted), delta_version(restarted, "append"))
    result = restarted.write(
        REF, batch, spec=TableSpec(key=("id",), mode=TableMode.BOTH), version=200
    )
    assert all(c.skipped for c in result.commits) and result.version == 200
    assert (delta_version(restarted), delta_version(restarted, "append")) == versions
    assert restarted.row_count(REF, "append") == 3
    assert {k: r["v"] for k, r in consolidated(restarted).items()} == {1: "b", 2: "c"}


def test_maintain_compacts_checkpoints_vacuums_without_changing_data(tmp_path: Path) -> None:
    policy = DeltaMaintenance(vacuum_retention_hours=0, enforce_retention_duration=False)
    sink = DeltaSink(str(tmp_path / "dest"), source="src1", maintenance=policy)
    for lsn in range(1, 8):
        write(sink, [{"_cdc_op": "I", "id": lsn * 10 + i, "v": "x"} for i in range(5)], lsn)
    before = sorted(r["id"] for r in sink.read_table(REF, "consolidated").to_pylist())
    files_before = len(DeltaTable(sink.path(REF, "consolidated")).file_uris())
    result = sink.maintain(REF, "consolidated")
    assert files_before == 7
    assert (result.files_removed, result.files_added) == (7, 1)
    assert result.checkpointed
    assert result.vacuumed_files == 7
    json.dumps(result.to_dict())
    assert len(DeltaTable(sink.path(REF, "consolidated")).file_uris()) == 1
    assert sorted(r["id"] for r in sink.read_table(REF, "consolidated").to_pylist()) == before
    assert sink.applied_version(REF, "consolidated") == 7
    assert list((Path(sink.path(REF, "consolidated")) / "_delta_log").glob("*.checkpoint.parquet"))
    again = sink.maintain(REF, "consolidated")  # nothing left to compact or checkpoint
    assert (again.files_removed, again.checkpointed) == (0, False)
    # delta-rs 1.6.6 vacuum lists the already-deleted tombstoned files again until the
    # tombstones expire, so `vacuumed_files` is what it attempted, not what it found
    write(sink, [{"_cdc_op": "U", "id": 10, "v": "after"}], 8)  # still writable
    assert consolidated(sink)[10]["v"] == "after"
    assert sink.maintain(REF, "append").files_removed == 0  # missing table: no-op
    sink.close()
    sink.close()


def test_snapshot_load_commits_the_version_last_and_redoes_a_partial_load(
    sink: DeltaSink,
) -> None:
    ref = TableRef("public", "snap")
    spec = TableSpec(key=("id",), mode=TableMode.BOTH)
    chunk = lambda lo, hi: pa.table({"id": pa.array(range(lo, hi), pa.int64())})  # noqa: E731

    def interrupted() -> object:
        yield chunk(0, 10)
        raise RuntimeError("copy failed midway")

    with pytest.raises(RuntimeError):
        sink.write_snapshot(ref, interrupted(), spec=spec, version=500, committed_at_us=0)
    assert sink.applied_version(ref, "consolidated") is None  # partial: not taken as loaded
    res = sink.write_snapshot(ref, iter([chunk(0, 10), chunk(10, 25)]), spec=spec,
                              version=500, committed_at_us=1_700_000_000_000_000)
    assert res.version == 500
    assert sink.applied_version(ref, "consolidated") == 500
    assert sink.applied_version(ref, "append") == 500
    table = sink.read_table(ref, "consolidated")
    assert sorted(table["id"].to_pylist()) == list(range(25))  # the partial rows were replaced
    assert set(table["_cdc_lsn"].to_pylist()) == {500}
    log = sink.read_table(ref, "append")
    assert set(log["_cdc_op"].to_pylist()) == {"R"}
    assert sorted(log["_cdc_seq"].to_pylist()) == list(range(25))
    # then the stream applies later changes on top
    sink.write(ref, changes([{"_cdc_op": "U", "id": 3}], 600), spec=spec, version=600)
    assert sink.applied_version(ref, "consolidated") == 600
    again = sink.write_snapshot(ref, iter([chunk(0, 1)]), spec=spec, version=700,
                                committed_at_us=0)
    assert again.version == 600  # already loaded: left alone


def test_a_replayed_older_change_never_regresses_a_newer_row(sink: DeltaSink) -> None:
    write(sink, [{"id": 1, "v": "a", "_cdc_op": "I"}, {"id": 2, "v": "b", "_cdc_op": "I"}], 100)
    write(sink, [{"id": 1, "v": "new", "_cdc_op": "U"}], 200)
    # a later batch that also carries older changes (a replay straddling what is applied)
    old = changes([{"id": 1, "v": "old", "_cdc_op": "U"}, {"id": 2, "_cdc_op": "D"}], 150)
    fresh = changes([{"id": 3, "v": "c", "_cdc_op": "I"}], 300)
    sink.write_consolidated(REF, pa.concat_tables([old, fresh]), key=["id"], version=300)
    rows = consolidated(sink)
    assert (rows[1]["v"], rows[1]["_cdc_lsn"]) == ("new", 200)  # kept: 150 < 200
    assert rows[2]["_cdc_deleted"] is True and rows[2]["_cdc_lsn"] == 150  # newer than 100
    assert rows[3]["v"] == "c"
    assert sink.applied_version(REF, "consolidated") == 300


# --- TRUNCATE -------------------------------------------------------------------------------


def _seed(sink: DeltaSink, *, hard: bool = False) -> None:
    write(sink, [{"id": i, "v": f"v{i}", "_cdc_op": "I"} for i in (1, 2, 3)], 100,
          hard_deletes=hard)


def test_truncate_soft_deletes_every_older_row_in_one_commit(sink: DeltaSink) -> None:
    _seed(sink)
    before = delta_version(sink)
    write(sink, [{"id": 5, "v": "gone", "_cdc_op": "I"}, {"_cdc_op": "T"},
                 {"id": 6, "v": "new", "_cdc_op": "I"}, {"id": 1, "v": "back", "_cdc_op": "I"}],
          200)
    assert delta_version(sink) == before + 1
    rows = consolidated(sink)
    assert 5 not in rows  # inserted before the TRUNCATE, in the same transaction
    assert {k for k, r in rows.items() if not r["_cdc_deleted"]} == {1, 6}
    assert rows[1]["v"] == "back" and rows[1]["_cdc_deleted_at"] is None
    for k in (2, 3):
        assert rows[k]["_cdc_deleted"] is True
        assert rows[k]["_cdc_lsn"] == 200
        assert rows[k]["_cdc_deleted_at"] == T0 + timedelta(seconds=200)
        assert rows[k]["v"] == f"v{k}"  # soft delete keeps the last values
    assert sink.applied_version(REF, "consolidated") == 200


def test_truncate_alone_and_replayed(sink: DeltaSink) -> None:
    _seed(sink)
    write(sink, [{"_cdc_op": "T"}], 300)
    assert all(r["_cdc_deleted"] for r in consolidated(sink).values())
    assert sink.applied_version(REF, "consolidated") == 300
    # a later batch replaying the TRUNCATE before new rows: rows after it are untouched
    write(sink, [{"id": 7, "v": "x", "_cdc_op": "I"}], 350)
    replay = pa.concat_tables([changes([{"_cdc_op": "T"}], 300),
                               changes([{"id": 8, "v": "y", "_cdc_op": "I"}], 400)])
    sink.write_consolidated(REF, replay, key=["id"], version=400)
    live = {k for k, r in consolidated(sink).items() if not r["_cdc_deleted"]}
    assert live == {7, 8}


def test_truncate_with_hard_deletes_removes_rows(sink: DeltaSink) -> None:
    _seed(sink, hard=True)
    write(sink, [{"_cdc_op": "T"}, {"id": 9, "v": "n", "_cdc_op": "I"}], 200, hard_deletes=True)
    assert set(consolidated(sink)) == {9}
    write(sink, [{"_cdc_op": "T"}], 300, hard_deletes=True)
    assert consolidated(sink) == {}
    assert sink.applied_version(REF, "consolidated") == 300


def test_truncate_in_the_change_log_is_one_t_row(sink: DeltaSink) -> None:
    sink.write_append(REF, changes([{"id": 1, "v": "a", "_cdc_op": "I"}], 100), version=100,
                      key=["id"])
    sink.write_append(REF, changes([{"_cdc_op": "T"}, {"id": 2, "v": "b", "_cdc_op": "I"}], 200),
                      version=200, key=["id"])
    log = sink.read_table(REF, "append").sort_by([("_cdc_lsn", "ascending"),
                                                  ("_cdc_seq", "ascending")]).to_pylist()
    assert [(r["_cdc_op"], r["id"], r["v"]) for r in log] == [("I", 1, "a"), ("T", None, None),
                                                            ("I", 2, "b")]


@pytest.mark.parametrize(("stored", "incoming", "ok"), [
    (pa.int32(), pa.int64(), True), (pa.int16(), pa.int32(), True), (pa.int64(), pa.int32(), False),
    (pa.float32(), pa.float64(), True), (pa.int32(), pa.float64(), True),
    (pa.int64(), pa.float64(), False), (pa.int32(), pa.decimal128(12, 2), True),
    (pa.int32(), pa.decimal128(10, 2), False), (pa.decimal128(6, 2), pa.decimal128(12, 3), True),
    (pa.decimal128(6, 2), pa.decimal128(6, 3), False), (pa.decimal128(6, 2), pa.string(), True),
    (pa.int32(), pa.string(), True), (pa.string(), pa.int32(), False),
    (pa.timestamp("us"), pa.timestamp("us", tz="UTC"), False), (pa.float64(), pa.string(), False),
])
def test_which_type_changes_are_widenings(stored: pa.DataType, incoming: pa.DataType,
                                          ok: bool) -> None:
    assert widens(stored, incoming) is ok


def test_rows_with_several_null_key_columns_merge(sink: DeltaSink) -> None:
    """A key of several nullable columns (REPLICA IDENTITY FULL with a declared key): rows with
    two null key columns merge and match again (the null-safe terms once parsed as one boolean
    expression, a planning error that failed the MERGE on every retry)."""
    key = ["id", "v", "big"]
    sink.write_consolidated(REF, changes([{"id": 1, "v": "a", "big": "b", "_cdc_op": "I"}], 10),
                            key=key, version=10, hard_deletes=False)
    sink.write_consolidated(REF, changes([{"id": 2, "v": None, "big": None, "_cdc_op": "I"},
                                          {"id": 3, "v": None, "big": None, "_cdc_op": "I"}], 20),
                            key=key, version=20, hard_deletes=False)
    sink.write_consolidated(REF, changes([{"id": 2, "v": None, "big": None, "_cdc_op": "D"}], 30),
                            key=key, version=30, hard_deletes=False)
    rows = sorted(sink.read_table(REF, "consolidated").to_pylist(), key=lambda r: r["id"])
    assert [(r["id"], r["v"], r["big"], r["_cdc_deleted"]) for r in rows] == [
        (1, "a", "b", False), (2, None, None, True), (3, None, None, False)]


@pytest.mark.parametrize(("exc", "own"), [
    (OSError(28, "No space left on device"), False),
    (PermissionError(13, "Permission denied"), False),
    (DeltaError("Generic DeltaTable error: Object at location /x/_delta_log/5.json not found"),
     False),
    (DeltaError("Failed to read delta log object: Generic LocalFileSystem error: Unable to "
                "open file /x: Read-only file system (os error 30)"), False),
    (DeltaError("Generic S3 error: Error performing put request: SlowDown"), False),
    (CommitFailedError("Transaction failed: version 7 already exists"), False),
    (DeltaError("Generic DeltaTable error: External error: Invalid data found: 1 rows failed "
                "validation check."), True),
    (DeltaError("Generic DeltaTable error: type_coercion\ncaused by\nError during planning: "
                "Cannot infer common argument type"), True),
])
def test_a_failure_of_the_destination_never_counts_as_the_tables_own(
        exc: BaseException, own: bool) -> None:
    """Only a table's own failure may stop that table (after retries); storage, network and
    commit conflicts are the destination's: the source retries them and no table stops."""
    assert _table_specific(exc) is own


def test_a_table_folder_holding_other_files_is_never_turned_into_a_delta_table(
        tmp_path: Path) -> None:
    sink = DeltaSink(str(tmp_path / "dest"), source="src1")
    folder = Path(sink.path(REF, "consolidated"))
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SinkSchemaError, match="not a Delta table"):
        sink.write_consolidated(REF, changes([{"_cdc_op": "I", "id": 1}], 10), key=["id"],
                                version=10)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


# --- snapshot chunks: materialised before deltalake sees them (issue 12, defect 3) -----------


def _chunk_sink(tmp_path: Path, **kw: object) -> tuple[DeltaSink, TableRef]:
    sink = DeltaSink(str(tmp_path / "dest"), source="src1", spill_dir=str(tmp_path / "spill"),
                     **kw)  # type: ignore[arg-type]
    (tmp_path / "spill").mkdir()
    ref = TableRef("public", "chunked")
    empty = pa.table({"id": pa.array([], pa.int64()), "v": pa.array([], pa.string())})
    for kind in ("consolidated", "append"):
        sink.begin_snapshot(ref, kind, empty=empty, key=["id"], plan="{}", attempt=100)
    return sink, ref


def _pieces(n: int, size: int, seen: list[str] | None = None,
            spill: Path | None = None) -> object:
    for i in range(n):
        if seen is not None and spill is not None:  # what the spool holds while it reads
            seen.extend(p.name for p in spill.iterdir())
        yield pa.table({"id": pa.array(range(i * size, (i + 1) * size), pa.int64()),
                        "v": pa.array([f"row {j}" for j in range(size)], pa.string())})


@pytest.mark.parametrize("spill_bytes", [64 * 1024 * 1024, 20_000])
def test_a_snapshot_chunk_is_one_commit_per_table_in_memory_or_spilled(
    tmp_path: Path, spill_bytes: int
) -> None:
    sink, ref = _chunk_sink(tmp_path, spill_bytes=spill_bytes)
    seen: list[str] = []
    rows = sink.write_snapshot_chunk(ref, ["consolidated", "append"],
                                     _pieces(6, 1_000, seen, tmp_path / "spill"),
                                     chunk="a-0", seq_base=5, version=120,
                                     committed_at_us=1_700_000_000_000_000)
    assert rows == 6_000
    # small budget: both Delta tables' rows went to spool files while the pieces were read
    assert bool(seen) is (spill_bytes < 1_000_000)
    assert list((tmp_path / "spill").iterdir()) == []  # and they are gone
    for kind in ("consolidated", "append"):
        assert sink.snapshot_chunk_versions(ref, kind, ["a-0"]) == {"a-0": 120}
        table = sink.read_table(ref, kind)
        assert sorted(table["id"].to_pylist()) == list(range(6_000))
    log = sink.read_table(ref, "append")
    assert sorted(log["_cdc_seq"].to_pylist()) == list(range(5, 6_005))
    hist = DeltaTable(sink.path(ref, "append")).history()
    assert sum(1 for h in hist if h.get("cdcengine.snapshot") == "a-0") == 1  # one commit


def test_a_snapshot_chunk_whose_copy_fails_commits_nothing(tmp_path: Path) -> None:
    sink, ref = _chunk_sink(tmp_path, spill_bytes=20_000)
    before = DeltaTable(sink.path(ref, "consolidated")).version()

    def failing() -> object:
        yield from _pieces(3, 1_000)  # type: ignore[misc]
        raise RuntimeError("COPY failed midway")

    with pytest.raises(RuntimeError, match="midway"):
        sink.write_snapshot_chunk(ref, ["consolidated", "append"], failing(), chunk="a-1",
                                  seq_base=0, version=120, committed_at_us=0)
    assert DeltaTable(sink.path(ref, "consolidated")).version() == before
    assert sink.snapshot_chunk_versions(ref, "append", ["a-1"]) == {}
    assert list((tmp_path / "spill").iterdir()) == []


def test_deltalake_is_never_handed_a_python_backed_reader(tmp_path: Path) -> None:
    """A reader whose batches come from Python code makes tokio workers take the GIL: the sink
    refuses it instead of writing (and every write and merge in the sink goes through that)."""
    from cdcengine.sink import delta

    dt = DeltaTable.create(str(tmp_path / "t"), pa.schema([("id", pa.int64())]))
    batches = (b for b in pa.table({"id": [1, 2]}).to_batches())
    reader = pa.RecordBatchReader.from_batches(pa.schema([("id", pa.int64())]), batches)
    with pytest.raises(TypeError, match="Python-backed"):
        delta._write_delta(dt, reader, mode="append")
    assert dt.version() == 0
    delta._write_delta(dt, pa.table({"id": pa.array([1], pa.int64())}), mode="append")
    assert DeltaTable(str(tmp_path / "t")).version() == 1
    # every write goes through that guard, and every merge source is checked by it, in every
    # module of the package (the only place that imports deltalake)
    trees = [ast.parse(f.read_text()) for f in sorted(Path(delta.__file__).parent.glob("*.py"))]
    calls = [n for t in trees for n in ast.walk(t) if isinstance(n, ast.Call)]
    writes = [n for n in calls if isinstance(n.func, ast.Name) and n.func.id == "write_deltalake"]
    guard = next(n for t in trees for n in ast.walk(t)
                 if isinstance(n, ast.FunctionDef) and n.name == "_write_delta")
    assert len(writes) == 1
    assert writes[0] in list(ast.walk(guard))
    merges = [n for n in calls if isinstance(n.func, ast.Attribute) and n.func.attr == "merge"]
    assert len(merges) >= 3
    for m in merges:
        first = m.args[0]
        assert isinstance(first, ast.Call) and getattr(first.func, "id", "") == "_materialised"

"""control.history: SCD2 versions and point-in-time state from hand-built append tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from cdcengine.control import history
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ENGINE = [
    pa.field("_cdc_lsn", pa.int64()),
    pa.field("_cdc_seq", pa.int64()),
    pa.field("_cdc_op", pa.string()),
    pa.field("_cdc_committed_at", pa.timestamp("us", tz="UTC")),
    pa.field("_cdc_unchanged", pa.list_(pa.string())),
]
SCHEMA = pa.schema([("id", pa.int64()), ("v", pa.string()), ("big", pa.string()), *ENGINE])


def log(changes: Sequence[tuple[int, str, Mapping[str, object]]],
        schema: pa.Schema = SCHEMA) -> pa.Table:
    """(lsn, op, values) in source order; `_cdc_seq` counts within an LSN."""
    rows: list[dict[str, object]] = []
    seq: dict[int, int] = {}
    for lsn, op, values in changes:
        s = seq[lsn] = seq.get(lsn, -1) + 1
        rows.append({"_cdc_lsn": lsn, "_cdc_seq": s, "_cdc_op": op,
                     "_cdc_committed_at": T0 + timedelta(seconds=lsn), **values})
    return pa.Table.from_pylist(rows, schema=schema)


def at(lsn: int) -> datetime:
    return T0 + timedelta(seconds=lsn)


def state(append: object, lsn: int, key: Sequence[str] = ("id",),
          cols: Sequence[str] = ("id", "v", "big")) -> list[tuple[object, ...]]:
    out = history.as_of(append, list(key), lsn)
    return [tuple(r[c] for c in cols) for r in out.to_pylist()]


def versions(append: object, key: Sequence[str] = ("id",)) -> list[dict[str, object]]:
    return history.scd2(append, list(key)).to_pylist()


SIMPLE = log([
    (100, "R", {"id": 1, "v": "a", "big": "B1"}),
    (100, "R", {"id": 2, "v": "b", "big": "B2"}),
    (200, "I", {"id": 3, "v": "c"}),
    (200, "U", {"id": 1, "v": "a2", "big": "B1"}),
    (300, "U", {"id": 1, "v": "a3", "_cdc_unchanged": ["big"]}),  # unresolved TOAST
    (300, "D", {"id": 2}),  # key only
    (400, "U", {"id": 3, "v": "c2"}),
    (400, "U", {"id": 3, "v": "c3"}),  # two changes in one transaction
])


def test_scd2_versions_of_i_u_d() -> None:
    got = [(r["id"], r["v"], r["big"], r["valid_from_lsn"], r["valid_to_lsn"], r["is_deleted"])
           for r in versions(SIMPLE)]
    assert got == [
        (1, "a", "B1", 100, 200, False),
        (1, "a2", "B1", 200, 300, False),
        (1, "a3", "B1", 300, None, False),  # unresolved unchanged TOAST: previous value
        (2, "b", "B2", 100, 300, False),
        (2, "b", "B2", 300, None, True),  # tombstone carries the last values
        (3, "c", None, 200, 400, False),
        (3, "c2", None, 400, 400, False),  # never visible at any LSN
        (3, "c3", None, 400, None, False),
    ]
    first = versions(SIMPLE)[0]
    assert first["valid_from"] == at(100) and first["valid_to"] == at(200)
    assert first["valid_from_seq"] == 0
    assert list(history.scd2(SIMPLE, ["id"]).schema.names) == [
        "id", "v", "big", "valid_from_lsn", "valid_from_seq", "valid_from", "valid_to_lsn",
        "valid_to", "is_deleted"]


@pytest.mark.parametrize(("lsn", "expected"), [
    (99, []),
    (100, [(1, "a", "B1"), (2, "b", "B2")]),
    (150, [(1, "a", "B1"), (2, "b", "B2")]),
    (200, [(1, "a2", "B1"), (2, "b", "B2"), (3, "c", None)]),
    (300, [(1, "a3", "B1"), (3, "c", None)]),
    (399, [(1, "a3", "B1"), (3, "c", None)]),
    (400, [(1, "a3", "B1"), (3, "c3", None)]),
    (10**12, [(1, "a3", "B1"), (3, "c3", None)]),
])
def test_as_of_at_several_lsns(lsn: int, expected: list[tuple[object, ...]]) -> None:
    assert state(SIMPLE, lsn) == expected


def test_as_of_carries_the_producing_change() -> None:
    rows = history.as_of(SIMPLE, ["id"], 400).to_pylist()
    assert [(r["id"], r["_cdc_lsn"], r["_cdc_committed_at"]) for r in rows] == [
        (1, 300, at(300)), (3, 400, at(400))]
    assert history.as_of(SIMPLE, ["id"], 400).schema.field("_cdc_committed_at").type == \
        pa.timestamp("us", tz="UTC")


def test_truncate_closes_every_open_key_and_keys_come_back() -> None:
    append = log([
        (100, "I", {"id": 1, "v": "a"}),
        (100, "I", {"id": 2, "v": "b"}),
        (200, "D", {"id": 2, "v": "b"}),
        (300, "U", {"id": 1, "v": "a2"}),
        (300, "T", {}),  # same transaction: the update is gone with it
        (300, "I", {"id": 3, "v": "c"}),  # ... and this survives
        (400, "I", {"id": 1, "v": "again"}),
        (500, "T", {}),
        (600, "I", {"id": 2, "v": "b2"}),
    ])
    got = [(r["id"], r["v"], r["valid_from_lsn"], r["valid_to_lsn"], r["is_deleted"])
           for r in versions(append)]
    assert got == [
        (1, "a", 100, 300, False),
        (1, "a2", 300, 300, False),  # closed by the T right after it
        (1, "again", 400, 500, False),
        (2, "b", 100, 200, False),
        (2, "b", 200, 300, True),  # a tombstone is closed by the T too
        (2, "b2", 600, None, False),
        (3, "c", 300, 500, False),
    ]
    assert state(append, 200, cols=("id", "v")) == [(1, "a")]
    assert state(append, 300, cols=("id", "v")) == [(3, "c")]
    assert state(append, 400, cols=("id", "v")) == [(1, "again"), (3, "c")]
    assert state(append, 500, cols=("id", "v")) == []
    assert state(append, 600, cols=("id", "v")) == [(2, "b2")]


def test_key_reinserted_after_delete() -> None:
    append = log([
        (100, "I", {"id": 1, "v": "a", "big": "x"}),
        (200, "D", {"id": 1}),
        (300, "I", {"id": 1, "v": "b", "big": None}),  # a genuine NULL is not carried
        (300, "D", {"id": 1}),
        (300, "I", {"id": 1, "v": "c", "big": "y"}),
    ])
    assert state(append, 150) == [(1, "a", "x")]
    assert state(append, 250) == []
    assert state(append, 300) == [(1, "c", "y")]
    got = [(r["v"], r["big"], r["valid_from_lsn"], r["valid_to_lsn"], r["is_deleted"])
           for r in versions(append)]
    assert got == [("a", "x", 100, 200, False), ("a", "x", 200, 300, True),
                   ("b", None, 300, 300, False), ("b", None, 300, 300, True),
                   ("c", "y", 300, None, False)]


def test_composite_key() -> None:
    schema = pa.schema([("tenant", pa.string()), ("n", pa.int32()), ("amount", pa.float64()),
                        *ENGINE])
    append = log([
        (10, "I", {"tenant": "a", "n": 1, "amount": 1.0}),
        (10, "I", {"tenant": "b", "n": 1, "amount": 2.0}),
        (20, "U", {"tenant": "a", "n": 1, "amount": 1.5}),
        (20, "I", {"tenant": "a", "n": 2, "amount": 3.0}),
        (30, "D", {"tenant": "b", "n": 1}),
        (40, "I", {"tenant": "b", "n": 1, "amount": 9.0}),
    ], schema)
    key, cols = ("tenant", "n"), ("tenant", "n", "amount")
    assert state(append, 10, key, cols) == [("a", 1, 1.0), ("b", 1, 2.0)]
    assert state(append, 20, key, cols) == [("a", 1, 1.5), ("a", 2, 3.0), ("b", 1, 2.0)]
    assert state(append, 30, key, cols) == [("a", 1, 1.5), ("a", 2, 3.0)]
    assert state(append, 40, key, cols) == [("a", 1, 1.5), ("a", 2, 3.0), ("b", 1, 9.0)]
    tombstone = [r for r in versions(append, key) if r["is_deleted"]]
    assert [(r["tenant"], r["n"], r["amount"], r["valid_to_lsn"]) for r in tombstone] == [
        ("b", 1, 2.0, 40)]


def test_many_random_changes_match_a_python_replay() -> None:
    import random

    rnd = random.Random(3)
    live: dict[int, str] = {}
    changes: list[tuple[int, str, Mapping[str, object]]] = []
    snapshots: dict[int, dict[int, str]] = {}
    for lsn in range(100, 3000, 10):
        for _ in range(rnd.randrange(1, 5)):
            k = rnd.randrange(20)
            roll = rnd.random()
            if roll < 0.02:
                changes.append((lsn, "T", {}))
                live.clear()
            elif k in live and roll < 0.3:
                changes.append((lsn, "D", {"id": k}))
                del live[k]
            elif k in live:
                live[k] = f"v{lsn}-{rnd.random():.3f}"
                changes.append((lsn, "U", {"id": k, "v": live[k]}))
            else:
                live[k] = f"i{lsn}"
                changes.append((lsn, "I", {"id": k, "v": live[k]}))
        snapshots[lsn] = dict(live)
    append = log(changes)
    for lsn in (100, 500, 1230, 2990):
        assert state(append, lsn, cols=("id", "v")) == sorted(snapshots[lsn].items())


def test_inputs_dataset_delta_table_path_and_raw_sql(tmp_path: Path) -> None:
    assert state(pads.dataset(SIMPLE), 200) == state(SIMPLE, 200)
    sink = DeltaSink(str(tmp_path / "lake"), source="s")
    ref = TableRef("public", "t")
    sink.write_append(ref, SIMPLE, version=400, key=["id"])
    path = sink.path(ref, "append")
    assert state(path, 300) == state(SIMPLE, 300)
    assert state(sink.dataset(ref, "append"), 300) == state(SIMPLE, 300)
    # the SQL runs as is in a user's own duckdb session
    con = duckdb.connect()
    con.register("append", SIMPLE)
    mine = con.sql(history.as_of_sql(["id", "v"], ["id"], 300))
    assert mine is not None
    assert [tuple(r.values()) for r in mine.to_arrow_table().to_pylist()] == [
        (1, "a3", 300, at(300)), (3, "c", 200, at(200))]
    generic = con.sql(history.SCD2_SQL)
    assert generic is not None and generic.to_arrow_table().num_rows == 8
    with pytest.raises(ValueError, match="not an append table"):
        history.scd2(pa.table({"id": [1]}), ["id"])
    with pytest.raises(ValueError, match="key"):
        history.scd2_sql(["id"], [])
    with pytest.raises(TypeError):
        history.scd2(object(), ["id"])


def test_log_without_unchanged_column() -> None:
    append = SIMPLE.drop_columns(["_cdc_unchanged"])
    assert state(append, 200) == state(SIMPLE, 200)

"""Chunk planning and resume decisions of `cdcengine.pipeline.snapshots` (pure)."""

from __future__ import annotations

import itertools

from cdcengine.pipeline.snapshots import (
    Meter,
    SnapshotPlan,
    chunk_name,
    partial_chunks,
    ranges_from_points,
    remaining_chunks,
    resumable_plan,
    seq_range,
    split_points,
)
from cdcengine.sink.base import TableKind
from cdcengine.source.adapter import ChunkRange, SnapshotLayout

C, A = TableKind.CONSOLIDATED, TableKind.APPEND
LAYOUT = SnapshotLayout(columns=("id", "v"), key=("id",), chunk_key="id", leaves=("public.t",))


def plan(n: int = 4, attempt: int = 0x100, layout: SnapshotLayout = LAYOUT) -> SnapshotPlan:
    bounds = ranges_from_points([str(i * 10) for i in range(1, n)])
    return SnapshotPlan(attempt=attempt, layout=layout, chunks=tuple(
        ChunkRange(id=i, leaf="public.t", lo=lo, hi=hi, estimated_rows=10)
        for i, (lo, hi) in enumerate(bounds)))


def test_split_points_are_evenly_spaced_and_distinct() -> None:
    values = [str(v) for v in range(100)]
    assert split_points(values, 4) == ["25", "50", "75"]
    assert split_points(values, 1) == []
    assert split_points([], 5) == []
    assert split_points(["a", "a", "a", "b"], 4) == ["b"]  # repeats collapse
    assert split_points(["x"] * 10, 3) == []  # nothing to cut on
    assert len(split_points(values, 500)) == 99  # no finer than the values allow


def test_ranges_cover_the_key_space_in_order() -> None:
    assert ranges_from_points([]) == [(None, None)]
    assert ranges_from_points(["5", "9"]) == [(None, "5"), ("5", "9"), ("9", None)]


def test_plan_round_trips_through_json() -> None:
    p = plan()
    assert SnapshotPlan.from_json(p.to_json()) == p
    assert SnapshotPlan.from_json(None) is None
    assert SnapshotPlan.from_json("{not json") is None
    assert SnapshotPlan.from_json('{"format": 99}') is None
    assert p.name(p.chunks[2]) == chunk_name(0x100, 2) == "100-2"


def test_resume_needs_one_started_plan_with_the_same_layout_and_a_key() -> None:
    p = plan()
    text = p.to_json()
    assert resumable_plan({C: (text, 0x100), A: (text, 0x100)}, LAYOUT)[0] == p
    assert resumable_plan({C: (None, None)}, LAYOUT)[0] is None
    assert resumable_plan({C: (text, 0x99)}, LAYOUT)[0] is None  # emptied for another attempt
    assert resumable_plan({C: (text, 0x100), A: (plan(attempt=7).to_json(), 7)}, LAYOUT)[0] \
        is None
    changed = SnapshotLayout(columns=("id", "v", "w"), key=("id",), chunk_key="id",
                             leaves=("public.t",))
    assert resumable_plan({C: (text, 0x100)}, changed)[0] is None
    keyless = SnapshotLayout(columns=("id",), key=(), chunk_key=None, leaves=("public.t",))
    k = plan(1, layout=keyless)
    assert resumable_plan({C: (k.to_json(), 0x100)}, keyless) == (
        None, "no usable key: the table restarts whole")


def test_remaining_chunks_name_the_tables_that_lack_them() -> None:
    p = plan(4)
    finished = {C: {p.name(p.chunks[0]): 5, p.name(p.chunks[1]): 5},
                A: {p.name(p.chunks[0]): 5}}
    todo = remaining_chunks(p, finished)
    assert [(c.id, kinds) for c, kinds in todo] == [(1, (A,)), (2, (C, A)), (3, (C, A))]
    assert remaining_chunks(p, {C: {p.name(c): 1 for c in p.chunks}}) == []


def test_partial_chunks_are_those_in_some_tables_only_grouped_by_point() -> None:
    p = plan(4)
    n = [p.name(c) for c in p.chunks]
    finished = {C: {n[0]: 5, n[1]: 5, n[3]: 9}, A: {n[0]: 5, n[2]: 5}}
    assert partial_chunks(p, finished) == {
        (A, 5): {n[1]: p.chunks[1]}, (C, 5): {n[2]: p.chunks[2]}, (A, 9): {n[3]: p.chunks[3]}}
    assert partial_chunks(p, {C: {n[0]: 5}}) == {}  # one table: nothing to mirror
    assert partial_chunks(p, {C: {}, A: {}}) == {}


def test_seq_ranges_of_chunks_do_not_overlap() -> None:
    p = plan(3)
    ranges = [seq_range(c) for c in p.chunks]
    assert ranges[0] == (0, 1 << 32)
    assert all(hi == lo2 for (_, hi), (lo2, _) in itertools.pairwise(ranges))


def test_meter_rate_and_eta() -> None:
    now = [100.0]
    m = Meter(rows_total=1000, rows_before=200, clock=lambda: now[0])
    assert m.rate() is None and m.eta_s() is None
    now[0] = 102.0
    m.copied = 400
    assert m.rate() == 200.0
    assert m.rows_done == 600
    assert m.eta_s() == 2.0

"""Packed updates and deletes, and changes replayed from streamed transactions, against the
row-by-row path they replace (`cdcengine_postgres.replication.packed`).

The same pgoutput messages go two ways: decoded one by one (`pgoutput.decode` through the
transaction assembler, as events) and through the change session, which packs runs of them
into `ChangeRun`s that the batcher splits column-wise. Randomized transactions over tables with
the default replica identity and with REPLICA IDENTITY FULL (with and without a primary key)
mix inserts, updates without an old tuple, updates with the old key (a changed key: never
packed), updates with the whole old row (unchanged TOAST values taken from it; a changed key
splits into a delete and an insert), deletes by key and by whole row, truncates and an added
column, some of them inside streamed (protocol v2) transactions. Every batch must be the same,
value for value, also when compacted and spilled inside a transaction.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_packed import _same, _session, _text, _text_value, in_memory
from test_pgoutput import (
    STREAM_STOP,
    begin,
    commit,
    delete,
    insert,
    relation,
    stream_commit,
    stream_start,
    truncate,
    update,
)

from cdcengine.events import UNCHANGED, Event, PackedChanges, Value
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import Batcher, CaptureSpec, ChangeBatch
from cdcengine_postgres.replication.packed import ChangeRun, split_changes
from cdcengine_postgres.replication.pgoutput import PgoutputError
from cdcengine_postgres.replication.transactions import TransactionAssembler

ORDERS, ITEMS = TableRef("public", "orders"), TableRef("public", "items")
FULL, NOKEY = TableRef("public", "full_t"), TableRef("public", "nokey")
_TEXT3 = (("id", 25, -1, True), ("v", 25, -1, False), ("w", 25, -1, False))
_ALL3 = tuple((n, o, t, True) for n, o, t, _ in _TEXT3)  # FULL: pgoutput flags every column


def _relations(added: bool = False) -> list[bytes]:
    orders = _TEXT3 + ((("x", 25, -1, False),) if added else ())
    return [relation(1, "orders", cols=orders), relation(2, "items", cols=_TEXT3),
            relation(3, "full_t", ident=b"f", cols=_ALL3),
            relation(4, "nokey", ident=b"f", cols=_ALL3[:2])]


class _Gen:
    """Random change messages with the state needed to make them plausible."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.key = 0
        self.ncols = {1: 3, 2: 3, 3: 3, 4: 2}

    def row(self, relid: int, key: bytes | None = None) -> list[Value]:
        self.key += 1
        first = key if key is not None else str(self.key).encode()
        return [first] + [_text_value(self.rng) for _ in range(self.ncols[relid] - 1)]

    def change(self, relid: int, xid: int | None) -> bytes:
        rng = self.rng
        pick = rng.random()
        full = relid in (3, 4)
        if pick < 0.3:
            return insert(relid, *self.row(relid), xid=xid)
        if pick < 0.75:
            key = str(rng.randint(1, max(1, self.key))).encode()
            new = self.row(relid, key)
            changed = rng.random() < 0.15
            if changed:
                new[0] = str(self.key + 10_000).encode()
            for j in range(1, len(new)):
                if rng.random() < 0.3:
                    new[j] = UNCHANGED
            if full:
                old = self.row(relid, key)
                if rng.random() < 0.3:  # the old row's own value can be NULL
                    old[rng.randrange(1, len(old))] = None
                if rng.random() < 0.2:  # an unchanged key column value stays unchanged
                    new[0] = key
                return update(relid, new, old, marker=b"O", xid=xid)
            if changed:
                return update(relid, new, [key] + [None] * (len(new) - 1), marker=b"K", xid=xid)
            return update(relid, new, xid=xid)
        if full and rng.random() < 0.5:
            return delete(relid, self.row(relid), marker=b"O", xid=xid)
        key = str(rng.randint(1, max(1, self.key))).encode()
        return delete(relid, [key] + [None] * (self.ncols[relid] - 1), xid=xid)


def _payloads(rng: random.Random, txns: int) -> list[bytes]:
    gen = _Gen(rng)
    out = _relations()
    lsn = 0x1000
    for t in range(txns):
        xid = 100 + t
        streamed = rng.random() < 0.3
        if t == txns // 2:
            gen.ncols[1] = 4
            added = _relations(added=True)[0]
        changes: list[bytes] = []
        for _ in range(rng.randint(0, 60)):
            relid = rng.choice((1, 1, 2, 3, 3, 4))
            if rng.random() < 0.03:
                changes.append(truncate([relid], xid=xid if streamed else None))
            else:
                changes.append(gen.change(relid, xid if streamed else None))
            # runs: often several changes to the same relation in a row
            for _ in range(rng.choice((0, 0, 3, 20))):
                changes.append(gen.change(relid, xid if streamed else None))
        if t == txns // 2:
            changes.insert(0, added if not streamed else relation(
                1, "orders", cols=(*_TEXT3, ("x", 25, -1, False)), xid=xid))
        lsn += 0x100
        if streamed:
            cut = rng.randint(0, len(changes))
            out += [stream_start(xid), *changes[:cut], STREAM_STOP,
                    stream_start(xid, first=False), *changes[cut:], STREAM_STOP,
                    stream_commit(xid, commit_lsn=lsn, end_lsn=lsn + 8)]
        else:
            out += [begin(xid, final_lsn=lsn), *changes,
                    commit(commit_lsn=lsn, end_lsn=lsn + 8)]
    return out


def _batcher(tmp: Path, budget: int) -> Batcher:
    specs = {ORDERS: CaptureSpec(ref=ORDERS), ITEMS: CaptureSpec(ref=ITEMS, columns=("v",)),
             FULL: CaptureSpec(ref=FULL), NOKEY: CaptureSpec(ref=NOKEY)}
    return Batcher(specs, lambda r: [_text] * len(r.columns), max_rows=10**9, max_bytes=budget,
                   flush_interval_s=3600, spill_dir=tmp)


_KEYS = {3: ("id",), 4: ()}  # full_t has a primary key; nokey has none (every column keys)


def _decoded(payloads: Sequence[bytes], tmp: Path) -> list[Event]:
    session = _session([], tmp, random.Random(0))
    session._primary_keys.update(_KEYS)
    with TransactionAssembler(tmp / "asm") as asm:
        return list(session._keyed([ev for p in payloads for ev in asm.feed(p)]))


def _packed(payloads: Sequence[bytes], tmp: Path, rng: random.Random) -> list[Event]:
    session = _session(list(payloads), tmp, rng)
    session._primary_keys.update(_KEYS)
    got: list[Event] = []
    while session._stream._payloads:  # type: ignore[attr-defined]
        got += session.events(0)
    session._assembler.close()
    return got


def _batch(events: Sequence[Event], tmp: Path, budget: int) -> ChangeBatch:
    b = _batcher(tmp, budget)
    for ev in events:
        b.add(ev)
    batch = b.take()
    assert batch is not None
    return batch


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [10**12, 3000, 1])
def test_batches_are_the_same_with_packed_updates_and_deletes(
        seed: int, budget: int, tmp_path: Path) -> None:
    payloads = _payloads(random.Random(seed), txns=8 if budget == 1 else 30)
    decoded = _decoded(payloads, tmp_path)
    packed = _packed(payloads, tmp_path, random.Random(seed + 1))
    runs = [ev for ev in packed if isinstance(ev, PackedChanges)]
    assert {op for run in runs for op in run.ops} >= set(b"IUD")
    assert any(run.has_old for run in runs)
    a, b = _batch(decoded, tmp_path, budget), _batch(packed, tmp_path, budget)
    _same(a, b)
    assert set(a.tables) == {ORDERS, ITEMS, FULL, NOKEY}
    tables = [in_memory(t) for t in b.tables.values()]
    ops = {op for t in tables for op in t["_cdc_op"].to_pylist()}
    assert ops == {"I", "U", "D", "T"}
    assert any(v is not None for t in tables for v in t["_cdc_unchanged"].to_pylist())
    if budget < 10**12:  # spilled: the same batch as held in memory, column for column
        _same(_batch(decoded, tmp_path, 10**12), a)


def _run_rows(runs: Sequence[ChangeRun], ncols: int) -> tuple[list[list[Value]], list[object]]:
    rows = [r for run in runs for r in run.rows()]
    columns = [[None if r[j] is UNCHANGED else r[j] for r in rows] for j in range(ncols)]
    marks = [[j for j, v in enumerate(r) if v is UNCHANGED] or None for r in rows]
    return columns, marks


@pytest.mark.parametrize("seed", range(10))
def test_columns_of_update_and_delete_runs_match_their_rows(seed: int) -> None:
    """Column-wise splitting (several groups) against `rows()`, marks included."""
    rng = random.Random(seed)
    gen = _Gen(rng)
    relid = rng.choice((1, 3))
    payloads = [p for p in (gen.change(relid, None) for _ in range(rng.randint(1, 400)))
                if p[5:6] != b"K" or p[:1] == b"D"]  # what the session packs
    runs = []
    while payloads:
        cut = rng.randint(1, len(payloads))
        chunk, payloads = payloads[:cut], payloads[cut:]
        runs.append(ChangeRun(relid, chunk, bytes(p[0] for p in chunk),
                              has_old=any(p[:1] == b"U" and p[5:6] == b"O" for p in chunk)))
    import cdcengine_postgres.replication.packed as packed_mod

    old, packed_mod.GROUP_BYTES = packed_mod.GROUP_BYTES, rng.choice((64, 4096, 2 << 20))
    try:
        found = ChangeRun.columns(runs, 3)
    finally:
        packed_mod.GROUP_BYTES = old
    assert found is not None
    columns, marks = _run_rows(runs, 3)
    for column in found.columns:
        column.validate(full=True)
    assert [c.to_pylist() for c in found.columns] == columns
    got = found.unchanged.to_pylist() if found.unchanged is not None else [None] * len(marks)
    assert got == marks


def test_a_full_update_that_changes_its_key_is_two_rows() -> None:
    old = [b"1", b"a", b"big"]
    runs = [ChangeRun(3, [update(3, [b"2", b"b", UNCHANGED], old, marker=b"O")], b"U", True)]
    assert runs[0].keeps_keys([0]) is False
    assert runs[0].keeps_keys([1, 2]) is False  # v changed too
    assert runs[0].keeps_keys([2]) is True  # an unchanged marker is no change
    same = ChangeRun(3, [update(3, [b"1", b"b", UNCHANGED], old, marker=b"O")], b"U", True)
    assert same.keeps_keys([0]) is True
    found = ChangeRun.columns([same], 3)
    assert found is not None
    # the unchanged TOASTed value comes from the whole old row, and is not marked
    assert [c.to_pylist() for c in found.columns] == [[b"1"], [b"b"], [b"big"]]
    assert found.unchanged is None
    null_old = ChangeRun(3, [update(3, [b"1", b"b", UNCHANGED], [b"1", b"a", None],
                                    marker=b"O")], b"U", True)
    found = ChangeRun.columns([null_old], 3)
    assert found is not None and found.unchanged is not None
    assert found.unchanged.to_pylist() == [[2]] and found.columns[2].to_pylist() == [None]


@pytest.mark.parametrize("bad", [
    update(1, [b"1", b"x", b"y"])[:-2],  # truncated
    delete(1, [b"1", UNCHANGED, None]),  # an unchanged marker in an old tuple
    insert(1, b"1", UNCHANGED, None),  # … or in an insert
    update(1, [b"1", b"x"]),  # another column count
    update(1, [b"1", b"x", b"y"], [b"1", b"a", b"b"], marker=b"O")[:-12] + b"X" * 12,
])
def test_uncommon_runs_fall_back_to_rows(bad: bytes) -> None:
    good = update(1, [b"1", UNCHANGED, b"v"])
    runs = [ChangeRun(1, [good, bad, good], bytes((good[0], bad[0], good[0])),
                      has_old=bad[5:6] == b"O")]
    assert ChangeRun.columns(runs, 3) is None
    try:
        rows = runs[0].rows()
    except PgoutputError:
        return  # malformed: the row-by-row path raises, as decoding it would
    assert len(rows) == 3


def test_empty_input() -> None:
    found = split_changes(b"", np.empty(0, np.int64), 2)
    assert found is not None and [c.to_pylist() for c in found.columns] == [[], []]
    assert ChangeRun.columns([], 2) is not None


def test_marks_name_the_columns_in_the_batch(tmp_path: Path) -> None:
    payloads = [*_relations(), begin(1, final_lsn=0x100),
                update(1, [b"1", UNCHANGED, UNCHANGED]), update(1, [b"2", b"v", UNCHANGED]),
                update(1, [b"3", b"v", b"w"]), commit(commit_lsn=0x100, end_lsn=0x108)]
    batch = _batch(_packed(payloads, tmp_path, random.Random(0)), tmp_path, 10**12)
    table = batch.tables[ORDERS]
    assert table["_cdc_unchanged"].to_pylist() == [["v", "w"], ["w"], None]
    assert table["v"].to_pylist() == [None, "v", "v"]
    assert table.schema.field("_cdc_unchanged").type == pa.list_(pa.string())

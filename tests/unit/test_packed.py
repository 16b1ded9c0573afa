"""Packed inserts (`cdcengine_postgres.replication.packed`) against the row-by-row path they
replace.

Bulk inserts reach the batcher as `ChangeRun`s of raw pgoutput messages whose columns are found
by vectorised offset arithmetic; every other change still goes through `pgoutput.decode`. These
tests hold the two to the same answer on randomized input: the text columns themselves (NULLs,
empty strings, multi-byte UTF-8, bytes that look like kind bytes, values of 100 kB and more,
several split groups), the fall-back for every shape the vectorised path does not take
(unchanged TOAST, binary values, another column count, truncated or malformed messages), the
typed Arrow columns of every SPEC §6 type through the real converters, whole batches mixing
packed runs with decoded updates, deletes, truncates and schema changes (also when compacted
and spilled), and the change session's packing around streamed blocks.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pytest
from pg_type_builders import (
    BOOL,
    FLOAT4,
    FLOAT8,
    INT2,
    INT4,
    INT8,
    NUMERIC,
    array_of,
    base,
    domain,
    numeric_typmod,
)
from test_pgoutput import (
    begin,
    commit,
    delete,
    insert,
    relation,
    stream_commit,
    stream_start,
    update,
)

from cdcengine.config import SourceConfig
from cdcengine.events import (
    UNCHANGED,
    Begin,
    Commit,
    Event,
    Insert,
    PackedChanges,
    Relation,
    RelationColumn,
    Truncate,
    Update,
    Value,
)
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import Batcher, CaptureSpec, ChangeBatch
from cdcengine.sink.base import BatchTable, SpilledTable
from cdcengine_postgres.replication import changes as changes_mod
from cdcengine_postgres.replication import packed
from cdcengine_postgres.replication.changes import PostgresChanges
from cdcengine_postgres.replication.packed import ChangeRun, split_changes
from cdcengine_postgres.replication.pgoutput import BinaryValue, PgoutputError
from cdcengine_postgres.replication.transactions import TransactionAssembler
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.mapping import PgType

RELID = 16384


def _columns(runs: Sequence[PackedChanges], ncols: int) -> list[pa.Array] | None:
    found = ChangeRun.columns(runs, ncols)
    return None if found is None else found.columns
_UTF8 = ["€", "日本語", "ü", "🙂", "a\u0301", "ß"]


def _text_value(rng: random.Random) -> bytes | None:
    pick = rng.random()
    if pick < 0.15:
        return None
    if pick < 0.25:
        return b""
    if pick < 0.35:  # bytes that look like kind bytes, NULs, a length prefix
        return bytes(rng.choice(b"tnub\x00\xff") for _ in range(rng.randint(1, 9)))
    if pick < 0.5:
        return "".join(rng.choice(_UTF8) for _ in range(rng.randint(1, 20))).encode()
    if pick < 0.52:  # very long
        return ("x" * rng.randint(70_000, 200_000) + "€").encode()
    return str(rng.random()).encode() * rng.randint(1, 5)


def _rows(rng: random.Random, n: int, ncols: int) -> list[tuple[bytes | None, ...]]:
    return [tuple(_text_value(rng) for _ in range(ncols)) for _ in range(n)]


def _runs(rng: random.Random, rows: Sequence[Sequence[Value]], relid: int = RELID,
          ) -> list[ChangeRun]:
    """The rows' Insert messages, cut into runs at random places."""
    payloads = [insert(relid, *row) for row in rows]
    out: list[ChangeRun] = []
    start = 0
    while start < len(payloads):
        end = start + rng.randint(1, 40)
        out.append(ChangeRun.inserts(relid, payloads[start:end]))
        start = end
    return out


def _row_columns(runs: Sequence[ChangeRun], ncols: int) -> list[list[bytes | None]]:
    rows = [row for run in runs for row in run.rows()]
    return [[row[j] for row in rows] for j in range(ncols)]  # type: ignore[misc]


# -- the text columns ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("group_bytes", [64, 4096, 2 << 20])
def test_columns_match_row_decoding(seed: int, group_bytes: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed, "GROUP_BYTES", group_bytes)
    rng = random.Random(seed)
    ncols = rng.randint(1, 9)
    rows = _rows(rng, rng.randint(1, 250), ncols)
    runs = _runs(rng, rows)
    columns = _columns(runs, ncols)
    assert columns is not None and len(columns) == ncols
    for column in columns:
        column.validate(full=True)
        assert column.type == pa.binary()
    assert [c.to_pylist() for c in columns] == _row_columns(runs, ncols)
    assert [c.to_pylist() for c in columns] == [[r[j] for r in rows] for j in range(ncols)]
    assert sum(run.count for run in runs) == len(rows)
    assert sum(run.nbytes for run in runs) == sum(len(insert(RELID, *r)) for r in rows)


def test_all_null_and_all_empty_columns() -> None:
    rows: list[tuple[bytes | None, ...]] = [(None, b"", b"x"), (None, b"", None)] * 50
    columns = _columns([ChangeRun.inserts(RELID, [insert(RELID, *r) for r in rows])], 3)
    assert columns is not None
    assert columns[0].null_count == 100
    assert columns[1].to_pylist() == [b""] * 100 and columns[1].null_count == 0
    assert columns[2].to_pylist() == [b"x", None] * 50


def test_no_runs_and_empty_input() -> None:
    assert [c.to_pylist() for c in _columns([], 2)] == [[], []]  # type: ignore[union-attr]
    import numpy as np

    empty = split_changes(b"", np.empty(0, np.int64), 3)
    assert empty is not None and [c.to_pylist() for c in empty.columns] == [[], [], []]


def _malformed() -> list[tuple[str, bytes]]:
    good = insert(RELID, b"12", b"ab")
    return [
        ("truncated inside a value", good[:-1]),
        ("truncated inside a length", good[:12]),
        ("no columns at all", good[:8]),
        ("header only", good[:6]),
        ("a length past the end", good[:9] + struct.pack(">i", 1000) + good[13:]),
        ("a negative length", good[:9] + struct.pack(">i", -5) + good[13:]),
        ("an unknown kind byte", good[:8] + b"x" + good[9:]),
    ]


@pytest.mark.parametrize("name", [name for name, _ in _malformed()])
def test_malformed_messages_fall_back_and_raise_like_decode(name: str) -> None:
    bad = dict(_malformed())[name]
    good = insert(RELID, b"1", b"a")
    run = ChangeRun.inserts(RELID, [good, bad, good])
    assert _columns([run], 2) is None
    try:
        rows = run.rows()
    except PgoutputError:
        return  # the row-by-row path rejects it: so does the batch, when it converts
    # what decode tolerates (nothing here today) must at least not be read differently
    assert len(rows) == 3


@pytest.mark.parametrize(
    ("row", "ncols"),
    [
        ((b"1", UNCHANGED), 2),  # unchanged TOAST: never in an insert, but not guessed at
        ((b"1", BinaryValue(b"\x00\x01")), 2),  # binary format
        ((b"1", b"a", b"b"), 2),  # another column count than the relation's
        ((b"1",), 2),
    ],
)
def test_uncommon_shapes_fall_back_to_rows(row: tuple[Value, ...], ncols: int) -> None:
    rng = random.Random(1)
    runs = [*_runs(rng, _rows(rng, 30, len(row))), ChangeRun.inserts(RELID, [insert(RELID, *row)])]
    assert _columns(runs, ncols) is None
    assert runs[-1].rows() == [row]


# -- typed columns for every SPEC §6 type ---------------------------------------------------

TEXT = base("text", 25, "S")
_TYPES: list[tuple[PgType, list[bytes | None]]] = [
    (BOOL, [b"t", b"f", b"x"]),
    (INT2, [b"1", b"-32768", b"32767", b"99999", b"a"]),
    (INT4, [b"0", b"-2147483648", b"2147483647", b"2147483648"]),
    (INT8, [b"9223372036854775807", b"-1", b"1e3"]),
    (FLOAT4, [b"1.5", b"NaN", b"-Infinity", b"3.4028235e+38", b"x"]),
    (FLOAT8, [b"1.7976931348623157e+308", b"Infinity", b"-0", b"5e-324"]),
    (NUMERIC.with_typmod(numeric_typmod(12, 2)), [b"1234567890.12", b"-0.50", b"NaN",
                                                   b"Infinity", b"12345678901.00"]),
    (NUMERIC.with_typmod(numeric_typmod(40, 5)), [b"1.00000", b"-12345678901234567890.5"]),
    (NUMERIC, [b"3.14159265358979323846264338327950288", b"NaN", b"-Infinity"]),
    (TEXT, [b"", "日本語 €".encode(), b"tab\there", b"\xff\xfe bad utf-8", b"t" * 3000]),
    (base("varchar", 1043, "S", typmod=14), [b"ten chars!", b""]),
    (base("bpchar", 1042, "S", typmod=7), [b"ab ", b"   "]),
    (base("bytea", 17, "U"), [b"\\x", b"\\xdeadbeef", b"\\x0", b"\\xzz", b"plain"]),
    (base("date", 1082, "D"), [b"2024-02-29", b"0001-01-01", b"infinity", b"2000-01-01 BC",
                               b"10000-01-01"]),
    (base("timestamp", 1114, "D"), [b"2024-01-01 12:34:56.123456", b"-infinity",
                                    b"1999-12-31 23:59:59"]),
    (base("timestamptz", 1184, "D"), [b"2024-01-01 12:34:56.5+00", b"2024-06-01 01:02:03+05:30",
                                      b"1900-01-01 00:00:00+05:53:28", b"infinity",
                                      b"0001-01-01 00:00:00+05:30"]),
    (base("time", 1083, "D"), [b"12:34:56.789"]),
    (base("interval", 1186, "T"), [b"P1Y2M3DT4H5M6.5S"]),
    (base("uuid", 2950), [b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    (base("json", 114), [b'{"b": 1,  "a": [1, 2]}']),
    (base("jsonb", 3802), [b'{"a": [1, 2], "b": "\\u00e9"}']),
    (PgType("mood", 16400, "e", "E", -1), [b"happy", b"sad"]),
    (domain("posid", INT8, oid=20002), [b"7", b"x"]),
    (array_of(INT4, 1007), [b"{1,2,NULL}", b"{}", b"{{1,2},{3,4}}", b"[0:1]={5,6}"]),
    (array_of(TEXT, 1009), [b'{a,"b,c","d\\"e",NULL,"NULL"}', b"{}", b'{"",x}']),
    (array_of(NUMERIC, 1231).with_typmod(numeric_typmod(5, 2)), [b"{1.50,NaN}", b"{123.45}"]),
]


def _typed_relation() -> Relation:
    return Relation(relid=RELID, schema="public", name="all_types", replica_identity="default",
                    columns=tuple(RelationColumn(name=f"c{i}", type_oid=i + 1, typmod=-1,
                                                 key=i == 2)
                                  for i in range(len(_TYPES))))


def _typed_converters(relation: Relation) -> list[changes_mod.ColumnConverter]:
    return [changes_mod._converter(pgtype) for pgtype, _ in _TYPES][: len(relation.columns)]


ALL = TableRef("public", "all_types")


def _typed_batcher(**kw: object) -> Batcher:
    defaults: dict[str, object] = {"max_rows": 10**9, "max_bytes": 10**12,
                                   "flush_interval_s": 3600}
    defaults.update(kw)
    return Batcher({ALL: CaptureSpec(ref=ALL)}, _typed_converters, **defaults)  # type: ignore[arg-type]


def _typed_row(rng: random.Random, key: int) -> tuple[bytes | None, ...]:
    row = [None if rng.random() < 0.1 else rng.choice(pool) for _, pool in _TYPES]
    row[2] = str(key).encode()  # the key column: int4, distinct
    return tuple(row)


def _feed(b: Batcher, relation: Relation, txns: Sequence[Sequence[Event]]) -> ChangeBatch:
    b.add(relation)
    for i, events in enumerate(txns):
        b.add(Begin(xid=100 + i, final_lsn=1000 + 10 * i, commit_ts_us=1_700_000_000_000_000 + i))
        for ev in events:
            b.add(ev)
        b.add(Commit(xid=100 + i, commit_lsn=1000 + 10 * i, end_lsn=1005 + 10 * i,
                     commit_ts_us=1_700_000_000_000_000 + i))
    batch = b.take()
    assert batch is not None
    return batch


def _values(column: pa.ChunkedArray | pa.Array) -> list[object]:
    """Python values, NaN made comparable."""
    return ["NaN" if isinstance(v, float) and math.isnan(v) else v for v in column.to_pylist()]


def in_memory(table: BatchTable) -> pa.Table:
    """A batch table as a `pa.Table` (a spilled one read whole)."""
    return table.to_table() if isinstance(table, SpilledTable) else table


def _same(a: ChangeBatch, b: ChangeBatch) -> None:
    assert a.version == b.version and a.transactions == b.transactions
    assert a.tables.keys() == b.tables.keys()
    for ref, spilled in a.tables.items():
        table, other = in_memory(spilled), in_memory(b.tables[ref])
        assert table.schema == other.schema
        for name in table.column_names:
            assert _values(table[name]) == _values(other[name]), name
    assert a.masked == b.masked
    assert a.schema_changes == b.schema_changes and a.stopped == b.stopped


@pytest.mark.parametrize("seed", range(4))
def test_every_type_converts_the_same_packed_or_decoded(seed: int) -> None:
    rng = random.Random(seed)
    relation = _typed_relation()
    rows = [[_typed_row(rng, 1000 * t + i) for i in range(rng.randint(1, 60))] for t in range(4)]
    decoded = _feed(_typed_batcher(), relation,
                    [[Insert(relid=RELID, new=r) for r in txn] for txn in rows])
    packed_ = _feed(_typed_batcher(), relation, [_runs(rng, txn) for txn in rows])
    _same(decoded, packed_)
    table = packed_.tables[ALL]
    assert table.num_rows == sum(map(len, rows))
    assert packed_.masked  # the pools hold values the targets cannot hold: counted the same
    # and the typed columns are what `to_arrow` makes of the text, value for value
    flat = [r for txn in rows for r in txn]
    for j, (pgtype, _) in enumerate(_TYPES):
        assert _values(table[f"c{j}"]) == _values(to_arrow([r[j] for r in flat], pgtype).array)


# -- whole batches: packed runs among decoded changes -------------------------------------

ORDERS = TableRef("public", "orders")
ITEMS = TableRef("public", "items")


def _rel(relid: int, name: str, cols: Sequence[str]) -> Relation:
    return Relation(relid=relid, schema="public", name=name, replica_identity="default",
                    columns=tuple(RelationColumn(name=c, type_oid=25, typmod=-1, key=c == "id")
                                  for c in cols))


def _text(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
    done = to_arrow(values, TEXT)
    return done.array, done.masked


def _mixed_batcher(tmp: Path | None, budget: int) -> Batcher:
    specs = {ORDERS: CaptureSpec(ref=ORDERS), ITEMS: CaptureSpec(ref=ITEMS, columns=("v",))}
    return Batcher(specs, lambda r: [_text] * len(r.columns), max_rows=10**9, max_bytes=budget,
                   flush_interval_s=3600, spill_dir=tmp)


def _mixed_stream(rng: random.Random, txns: int = 30) -> list[Event]:
    """Transactions over two tables: inserts, updates (key changes, unchanged TOAST),
    deletes, truncates, and an added column half way, as decoded events."""
    out: list[Event] = []
    cols = {1: ["id", "v"], 2: ["id", "v", "w"]}
    out += [_rel(1, "orders", cols[1]), _rel(2, "items", cols[2]), _rel(3, "other", ["id"])]
    key = 0
    for t in range(txns):
        out.append(Begin(xid=t + 1, final_lsn=100 * t + 90, commit_ts_us=10**15 + t))
        if t == txns // 2:
            cols[1] = ["id", "v", "added"]
            out.append(_rel(1, "orders", cols[1]))
        for _ in range(rng.randint(0, 40)):
            relid = rng.choice((1, 1, 1, 2, 3))
            ncols = len(cols.get(relid, ["id"]))
            pick = rng.random()
            key += 1
            values = [str(key).encode()] + [_text_value(rng) for _ in range(ncols - 1)]
            if pick < 0.7:
                out.append(Insert(relid=relid, new=tuple(values)))
            elif pick < 0.8:
                if ncols > 1 and rng.random() < 0.5:
                    values[-1] = UNCHANGED  # type: ignore[call-overload]
                old = (str(key - 1).encode(),) + (None,) * (ncols - 1) \
                    if rng.random() < 0.5 else None
                out.append(Update(relid=relid, new=tuple(values), old=old,
                                  old_is_key=old is not None))
            elif pick < 0.95:
                out.append(Insert(relid=relid, new=tuple(values)) if relid == 3 else
                           _delete_event(relid, values))
            else:
                out.append(Truncate(relids=(relid,)))
        out.append(Commit(xid=t + 1, commit_lsn=100 * t + 90, end_lsn=100 * t + 95,
                          commit_ts_us=10**15 + t))
    return out


def _delete_event(relid: int, values: list[Value]) -> Event:
    from cdcengine.events import Delete

    return Delete(relid=relid, old=(values[0],) + (None,) * (len(values) - 1))


def _pack(rng: random.Random, events: Sequence[Event]) -> Iterator[Event]:
    """The same events with runs of consecutive inserts into one relation packed, cut at
    random places (as the change session cuts them at drain boundaries)."""
    run: list[Insert] = []

    def flush() -> Iterator[Event]:
        while run:
            cut = rng.randint(1, len(run))
            yield ChangeRun.inserts(run[0].relid, [insert(i.relid, *i.new) for i in run[:cut]])
            del run[:cut]

    for ev in events:
        if type(ev) is Insert and (not run or run[0].relid == ev.relid):
            run.append(ev)
            continue
        yield from flush()
        if type(ev) is Insert:
            run.append(ev)
        else:
            yield ev
    yield from flush()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [10**12, 2000, 1])
def test_batches_are_the_same_with_packed_runs(seed: int, budget: int, tmp_path: Path) -> None:
    """Small budgets compact the text tails inside transactions and spill the parts (budget 1:
    after every change)."""
    events = _mixed_stream(random.Random(seed), txns=6 if budget == 1 else 30)
    decoded = _mixed_batcher(tmp_path, budget)
    packed_ = _mixed_batcher(tmp_path, budget)
    for ev in events:
        decoded.add(ev)
    for ev in _pack(random.Random(seed + 100), events):
        packed_.add(ev)
    assert decoded.pending_rows == packed_.pending_rows
    assert (decoded.spilled_bytes > 0) == (packed_.spilled_bytes > 0) == (budget < 10**12)
    a, b = decoded.take(), packed_.take()
    assert a is not None and b is not None
    _same(a, b)
    assert set(a.tables) == {ORDERS, ITEMS}
    assert any(isinstance(ev, PackedChanges) for ev in _pack(random.Random(1), events))


def test_a_table_stopped_inside_a_transaction_drops_its_packed_rows(tmp_path: Path) -> None:
    b = _mixed_batcher(tmp_path, 10**12)
    b.add(_rel(1, "orders", ["id", "v"]))
    b.add(Begin(xid=1, final_lsn=10, commit_ts_us=0))
    b.add(ChangeRun.inserts(1, [insert(1, b"1", b"a"), insert(1, b"2", b"b")]))
    b.add(Commit(xid=1, commit_lsn=10, end_lsn=15, commit_ts_us=0))
    b.add(Begin(xid=2, final_lsn=20, commit_ts_us=0))
    b.add(ChangeRun.inserts(1, [insert(1, b"3", b"c")]))
    b.add(_rel(1, "orders", ["id2", "v"]))  # the key changed: the table stops here
    b.add(ChangeRun.inserts(1, [insert(1, b"4", b"d")]))
    b.add(Commit(xid=2, commit_lsn=20, end_lsn=25, commit_ts_us=0))
    batch = b.take()
    assert batch is not None
    assert batch.tables[ORDERS]["id"].to_pylist() == ["1", "2"]
    assert [s.reason for s in batch.stopped] == ["primary_key_changed"]


def test_a_batch_with_an_uncommon_run_converts_it_row_by_row(tmp_path: Path) -> None:
    rows: list[tuple[Value, ...]] = [(b"1", b"a"), (b"2", BinaryValue(b"b")), (b"3", None)]
    decoded = _mixed_batcher(tmp_path, 10**12)
    packed_ = _mixed_batcher(tmp_path, 10**12)
    upd = Update(relid=1, new=(b"1", UNCHANGED))
    for b, changes in ((decoded, [*(Insert(relid=1, new=r) for r in rows), upd]),
                       (packed_, [ChangeRun.inserts(1, [insert(1, *r) for r in rows]), upd])):
        b.add(_rel(1, "orders", ["id", "v"]))
        b.add(Begin(xid=1, final_lsn=10, commit_ts_us=0))
        for ev in changes:
            b.add(ev)
        b.add(Commit(xid=1, commit_lsn=10, end_lsn=15, commit_ts_us=0))
    a, c = decoded.take(), packed_.take()
    assert a is not None and c is not None
    _same(a, c)
    assert c.tables[ORDERS]["_cdc_unchanged"].to_pylist() == [None, None, None, ["v"]]


def test_a_malformed_packed_insert_fails_the_batch_like_decoding_would(tmp_path: Path) -> None:
    b = _mixed_batcher(tmp_path, 10**12)
    b.add(_rel(1, "orders", ["id", "v"]))
    b.add(Begin(xid=1, final_lsn=10, commit_ts_us=0))
    b.add(ChangeRun.inserts(1, [insert(1, b"1", b"a"), insert(1, b"2", b"b")[:-3]]))
    b.add(Commit(xid=1, commit_lsn=10, end_lsn=15, commit_ts_us=0))
    with pytest.raises(PgoutputError):
        b.take()


def test_buffer_truncate_turns_a_cut_run_into_rows() -> None:
    from cdcengine.pipeline.batcher import _Relation
    from cdcengine.pipeline.buffer import TableBuffer

    rel = _Relation(relation=_rel(1, "orders", ["id", "v"]), spec=CaptureSpec(ref=ORDERS),
                    key=("id",), key_idx=(0,), converters=[_text, _text])
    buf = TableBuffer(rel=rel)
    run = ChangeRun.inserts(1, [insert(1, str(i).encode(), b"v") for i in range(5)])
    buf.items += [(b"a", b"b"), run, (b"z", None)]
    buf.tail, buf.runs = 7, 1
    buf.ops += b"UIIIIID"
    buf.seqs.extend(range(7))
    buf.truncate(4)
    assert buf.items == [(b"a", b"b"), (b"0", b"v"), (b"1", b"v"), (b"2", b"v")]
    assert (buf.tail, buf.runs, bytes(buf.ops), list(buf.seqs)) == (4, 0, b"UIII", [0, 1, 2, 3])


# -- the change session packs only plain inserts outside streamed blocks -------------------


class _Stream:
    def __init__(self, payloads: list[bytes], rng: random.Random) -> None:
        self._payloads = payloads
        self._rng = rng
        self.keepalive_lsn = 0

    def read_payloads(self, timeout_s: float, limit: int) -> list[bytes]:
        n = min(limit, self._rng.randint(1, 7))
        out, self._payloads = self._payloads[:n], self._payloads[n:]
        return out


def _session(payloads: list[bytes], tmp: Path, rng: random.Random) -> PostgresChanges:
    src = SourceConfig(name="s", dsn="postgresql://u@127.0.0.1/d", tables=("public.t",),
                       destination=str(tmp / "lake"))
    session = PostgresChanges(src, spill_dir=tmp)
    session._stream = _Stream(payloads, rng)  # type: ignore[assignment]
    return session


def _unpacked(events: Iterator[Event]) -> list[Event]:
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, PackedChanges):
            out += ev.events()
        else:
            out.append(ev)
    return out


def test_session_packs_plain_inserts_and_leaves_the_rest_to_the_assembler(
        tmp_path: Path) -> None:
    two = (("id", 23, -1, True), ("v", 25, -1, False))
    payloads = [relation(1), relation(2, "u", cols=two)]
    payloads += [begin(7), *[insert(1, str(i).encode(), b"x") for i in range(5)],
                 insert(2, b"9", None), insert(1, b"5", b"y"),
                 update(1, [b"1", b"z"]), insert(1, b"6", b"\xe2\x82\xac"), delete(1, [b"2", None]),
                 insert(1, b"7", b""), commit()]
    # a streamed transaction: its inserts carry an xid and go through the assembler's log
    payloads += [stream_start(50), relation(1, xid=50),
                 *[insert(1, str(i).encode(), b"s", xid=50) for i in range(10, 14)],
                 b"E", begin(8), insert(1, b"20", b"o"), insert(1, b"21", b"o"), commit(),
                 stream_start(50, first=False), insert(1, b"14", b"s", xid=50), b"E",
                 stream_commit(50), begin(9), insert(1, b"30", b"p"), commit()]
    with TransactionAssembler(tmp_path / "a") as asm:
        expected = [ev for p in payloads for ev in asm.feed(p)]
    for seed in range(20):
        session = _session(list(payloads), tmp_path, random.Random(seed))
        got: list[Event] = []
        while session._stream._payloads:  # type: ignore[attr-defined]
            got += session.events(0)
        assert any(isinstance(ev, PackedChanges) for ev in got)
        assert _unpacked(iter(got)) == expected
        session._assembler.close()


def test_session_hands_malformed_inserts_on_for_the_batch_to_reject(tmp_path: Path) -> None:
    bad = insert(1, b"1", b"a")[:-1]
    session = _session([relation(1), begin(1), bad, commit()], tmp_path, random.Random(0))
    events = [ev for _ in range(4) for ev in session.events(0)]
    runs = [ev for ev in events if isinstance(ev, PackedChanges)]
    assert len(runs) == 1
    assert _columns(runs, 2) is None
    with pytest.raises(PgoutputError):
        runs[0].rows()
    # a message whose 'N' is missing is not packed: the assembler rejects it at once
    session = _session([relation(1), begin(1), b"I\x00\x00\x00\x01X\x00\x00"], tmp_path,
                       random.Random(0))
    with pytest.raises(PgoutputError):
        [ev for _ in range(4) for ev in session.events(0)]


def test_long_transactions_keep_exact_ops_and_sequence_numbers(tmp_path: Path) -> None:
    """Past the prebuilt op letters and sequence numbers (64 Ki rows in one transaction)."""
    b = _mixed_batcher(tmp_path, 10**12)
    b.add(_rel(1, "orders", ["id", "v"]))
    b.add(Begin(xid=1, final_lsn=10, commit_ts_us=0))
    n = 0
    ops: list[str] = []
    for size in (1, 9000, 60_000, 1, 5000):
        b.add(ChangeRun.inserts(1, [insert(1, str(n + i).encode(), None) for i in range(size)]))
        n += size
        b.add(Update(relid=1, new=(str(n).encode(), b"u")))
        n += 1
        ops += ["I"] * size + ["U"]
    b.add(Commit(xid=1, commit_lsn=10, end_lsn=15, commit_ts_us=0))
    table = b.take().tables[ORDERS]  # type: ignore[union-attr]
    assert table.num_rows == n
    assert table["_cdc_seq"].to_pylist() == list(range(n))
    assert table["id"].to_pylist() == [str(i) for i in range(n)]
    assert table["_cdc_op"].to_pylist() == ops

"""Batching: committed transactions → per-table Arrow change batches for the sink.

Who calls it: the pipeline feeds every event from the adapter (`add`) in order, asks `ready()`
after each `Commit`, and `take()`s a batch between transactions. Guarantees:
- a batch closes only on a transaction boundary, so one source transaction's changes to one table
  always land in one batch (and so in one Delta commit);
- `ChangeBatch.version` is the end LSN of the last transaction it includes: once the batch is
  durable, everything at or below it is applied;
- the hot path keeps rows as the adapter's tuples of text `bytes` and converts each column once,
  at `take()`, through the adapter's converters (no per-value Python conversion here); runs of
  changes the adapter packed (`PackedChanges`) are kept packed, and their columns come from the
  adapter's class as whole Arrow arrays, so a bulk insert, update or delete costs no Python
  object per row;
- a table's changed shape (ALTER TABLE) is carried: each row keeps the columns it was sent with
  and the batch reports the change (`SchemaChange`); a changed key stops that table with a
  stated reason instead of being mis-applied; other tables go on.

Batch layout per table (the sink's input): the data columns, then `_cdc_op` ('I'/'U'/'D', 'T' for
a TRUNCATE with null data columns; a key-changing update is split into 'D' of the old key and 'I'
of the new), `_cdc_lsn` (commit end
LSN), `_cdc_seq` (ordinal among this table's changes in its transaction), `_cdc_committed_at`
(timestamp[us, UTC]) and `_cdc_unchanged` (list of unchanged-TOAST column names, null if none).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import pyarrow as pa

from cdcengine.errors import StopReason
from cdcengine.events import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Event,
    Insert,
    Message,
    PackedChanges,
    Relation,
    RelationColumn,
    Row,
    Truncate,
    Update,
)
from cdcengine.names import TableRef
from cdcengine.pipeline.buffer import (
    TableBuffer,
    expand_range,
    expand_segments,
    ops_array,
    spill_parts,
    spilled_pieces,
    tail_columns,
)
from cdcengine.sink.base import AddedColumns, BatchTable, SpilledTable
from cdcengine.sink.columns import COMMITTED_AT, LSN, OP, SEQ
from cdcengine.sink.columns import UNCHANGED as UNCHANGED_LIST
from cdcengine.sink.fold import UNCHANGED_TYPE
from cdcengine.sink.spilled import SpillWriter

ColumnConverter = Callable[[Sequence[bytes | None] | pa.Array], tuple[pa.Array, int]]
"""Text values of one column (None = NULL) → (typed Arrow array, number of masked values).
The values are a list of `bytes`, or an Arrow binary array (with nulls) when the rows include
packed changes (`PackedChanges`)."""

ENGINE_SCHEMA = pa.schema([
    (OP, pa.string()),
    (LSN, pa.int64()),
    (SEQ, pa.int64()),
    (COMMITTED_AT, pa.timestamp("us", tz="UTC")),
    (UNCHANGED_LIST, UNCHANGED_TYPE),
])
"""The engine columns of a batch, in order (the names are `sink.fold`'s, defined once)."""
ROW_OVERHEAD_BYTES = 64  # rough per-row bookkeeping cost, for the memory budget
CONVERT_BYTES = 32 * 1024 * 1024
"""Estimated text bytes of a table tail converted to Arrow at once inside a transaction (see
`Batcher._compact`): 1M bench rows converted whole held about 450 MB more than the result."""


class ConverterFactory(Protocol):
    """Per relation, one converter per column (from the adapter, which knows the types)."""

    def __call__(self, relation: Relation) -> Sequence[ColumnConverter]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureSpec:
    """What the batcher keeps of one captured table: its rows keyed by `key`, `columns` only.

    (How a table is written is the sink's `TableSpec`.)"""

    ref: TableRef
    key: tuple[str, ...] | None = None  # declared key; None: the relation's identity columns
    columns: tuple[str, ...] | None = None  # selected columns; None: all


@dataclass(frozen=True, slots=True, kw_only=True)
class StoppedTable:
    ref: TableRef
    reason: str  # a `StopReason` or `Reason.SCHEMA_INCOMPATIBLE`
    message: str
    remedy: str
    lsn: int  # end LSN of the transaction that stopped it


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaChange:
    """A table's shape changed; its rows from the transaction at `lsn` on have the new one."""

    ref: TableRef
    lsn: int  # final LSN of the first transaction carrying the new shape
    added: tuple[str, ...]
    dropped: tuple[str, ...]
    retyped: tuple[str, ...]
    relation: Relation


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeBatch:
    version: int  # end LSN of the last transaction included
    transactions: int
    # a table's rows in memory, or in a spill file when its transaction outgrew the budget
    tables: dict[TableRef, BatchTable]
    keys: dict[TableRef, tuple[str, ...]]
    masked: dict[tuple[TableRef, str], int] = field(default_factory=dict)
    stopped: tuple[StoppedTable, ...] = ()
    schema_changes: tuple[SchemaChange, ...] = ()
    # per table: columns added at the source whose older rows hold a constant default, resolved
    # by the pipeline's thread (`pipeline.defaults`) for the sink
    added: dict[TableRef, AddedColumns] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables.values())

    def release(self) -> None:
        """Delete the batch's spill files (once it is durable, or dropped). Safe twice."""
        for table in self.tables.values():
            if isinstance(table, SpilledTable):
                table.close()


@dataclass(slots=True)
class _Relation:
    relation: Relation
    spec: CaptureSpec
    key: tuple[str, ...]
    key_idx: tuple[int, ...]
    converters: Sequence[ColumnConverter]
    # hot-path caches, so a row costs no TableRef hashing: the table's buffer of the current
    # batch (valid while `buf_batch` is the batcher's batch number), the next `_cdc_seq` of
    # the current transaction (valid while `seq_txn` is its transaction number)
    stopped: bool = False
    buf: TableBuffer | None = None
    buf_batch: int = -1
    seq: int = 0
    seq_txn: int = -1


class Batcher:
    def __init__(
        self,
        specs: Mapping[TableRef, CaptureSpec],
        converters: ConverterFactory,
        *,
        max_rows: int,
        max_bytes: int,
        flush_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        spill_dir: Path | None = None,
    ) -> None:
        self._specs = dict(specs)
        self._spill_dir = spill_dir
        self._converters = converters
        self._max_rows, self._budget = max_rows, max_bytes
        # The text tail's limit (the hot path compares `_bytes` with it): past it, inside a
        # transaction, the tail becomes an Arrow part (`_compact`). Converting in pieces bounds
        # what one conversion holds at once (the text, its columns as binary arrays, the typed
        # arrays: about three times the piece), and the parts stay chunks of one table.
        self._max_bytes = min(max_bytes, CONVERT_BYTES)
        self._interval, self._clock = flush_interval_s, clock
        self._relations: dict[int, _Relation | None] = {}
        self._buffers: dict[TableRef, TableBuffer] = {}
        self._stopped: dict[TableRef, StoppedTable] = {}
        self._new_stops: list[StoppedTable] = []
        self._begin: Begin | None = None
        self._txn_start: dict[TableRef, int] = {}
        self._rows = 0
        self._bytes = 0  # estimated size of the text tails
        self._part_bytes = 0  # converted parts held in memory
        self.spilled_bytes = 0  # written to spill files since the last take
        self._masked: dict[tuple[TableRef, str], int] = {}
        self._schema_changes: list[SchemaChange] = []
        self._txn_no = 0  # Begin events seen
        self._batch_no = 0  # batches taken
        self._first_at: float | None = None
        self._version: int | None = None
        self._txns = 0

    # ---- feeding ----------------------------------------------------------------------------
    def add(self, event: Event) -> None:
        cls = type(event)
        if cls is Insert:
            self._change(event.relid, _OP_I, event.new)  # type: ignore[union-attr]
        elif isinstance(event, PackedChanges):
            self._packed(event)
        elif cls is Update:
            self._update(event)  # type: ignore[arg-type]
        elif cls is Delete:
            self._change(event.relid, _OP_D, event.old)  # type: ignore[union-attr, arg-type]
        elif isinstance(event, Begin):
            self._begin = event
            self._txn_no += 1
            self._txn_start = {ref: b.count for ref, b in self._buffers.items()}
        elif isinstance(event, Commit):
            self._commit(event)
        elif isinstance(event, Relation):
            self._relation(event)
        elif isinstance(event, Truncate):
            # one 'T' row (data columns null) per truncated table, in transaction order: the
            # sink deletes every older row of the table at its LSN, the change log records it
            for relid in event.relids:
                rel = self._relations.get(relid)
                if rel is not None:
                    self._change(relid, _OP_T, (None,) * len(rel.relation.columns))
        elif isinstance(event, Message):
            pass  # logical decoding messages carry no table data

    def _relation(self, relation: Relation) -> None:
        ref = TableRef(relation.schema, relation.name)
        spec = self._specs.get(ref)
        if spec is None:
            self._relations[relation.relid] = None  # published but not configured: ignored
            return
        old = self._relations.get(relation.relid)
        if old is not None and ref not in self._stopped:
            self._reshape(ref, spec, old, relation)
        names = [c.name for c in relation.columns]
        key = spec.key or relation.key_columns
        new = self._relations[relation.relid] = _Relation(
            relation=relation, spec=spec, key=tuple(key),
            key_idx=tuple(names.index(k) for k in key if k in names),
            converters=self._converters(relation), stopped=ref in self._stopped)
        if old is not None:  # same table, new shape: `_cdc_seq` goes on within the transaction
            new.seq, new.seq_txn = old.seq, old.seq_txn

    def _reshape(self, ref: TableRef, spec: CaptureSpec, old: _Relation, new: Relation) -> None:
        """A known table arrives with another shape (after an ALTER TABLE).

        Added, dropped and retyped columns are carried: rows buffered so far are converted
        under the old shape first, so each row keeps the columns it was sent with, and the
        change is reported with the batch (the pipeline backfills defaults, the sink adds
        columns and widens types or stops the table). A changed replica-identity key of a
        table without a declared key stops it: merging by the old key would be wrong.
        """
        before = {c.name: (c.type_oid, c.typmod) for c in old.relation.columns}
        after = {c.name: (c.type_oid, c.typmod) for c in new.columns}
        added = tuple(n for n in after if n not in before)
        dropped = tuple(n for n in before if n not in after)
        retyped = tuple(n for n in after if n in before and before[n] != after[n])
        keyed = new.replica_identity in ("default", "index")
        if spec.key is None and keyed and old.relation.key_columns != new.key_columns:
            self._stop(ref, StopReason.PRIMARY_KEY_CHANGED,
                       f"the key of {ref.qualified} changed from "
                       f"{list(old.relation.key_columns)} to {list(new.key_columns)}; rows "
                       "merged by the old key would be wrong, so the table stopped before "
                       "the first change under the new key.", "resync the table")
            return
        if not (added or dropped or retyped):
            return
        self._seal_tails()  # rows so far keep the shape they were sent with
        lsn = self._begin.final_lsn if self._begin else (self._version or 0)
        self._schema_changes.append(SchemaChange(ref=ref, lsn=lsn, added=added, dropped=dropped,
                                                 retyped=retyped, relation=new))

    def _mark_stopped(self, ref: TableRef) -> None:
        for rel in self._relations.values():
            if rel is not None and rel.spec.ref == ref:
                rel.stopped = True

    def stop_table(self, ref: TableRef) -> None:
        """Buffer nothing more of `ref` (the sink refused it; the pipeline recorded why)."""
        if ref not in self._stopped:
            self._stopped[ref] = StoppedTable(ref=ref, reason="stopped", message="",
                                              remedy="", lsn=self._version or 0)
            self._mark_stopped(ref)
            buf = self._buffers.get(ref)
            if buf is not None and self._begin is None:
                self._rows -= buf.count
                del self._buffers[ref]

    def _stop(self, ref: TableRef, reason: str, message: str, remedy: str) -> None:
        if ref in self._stopped:
            return
        lsn = self._begin.final_lsn if self._begin else (self._version or 0)
        stop = StoppedTable(ref=ref, reason=reason, message=message, remedy=remedy, lsn=lsn)
        self._stopped[ref] = stop
        self._mark_stopped(ref)
        self._new_stops.append(stop)
        buf = self._buffers.get(ref)
        if buf is not None and self._begin is not None:
            # drop the open transaction's rows of the stopped table; committed ones stay
            start = self._txn_start.get(ref, buf.count)
            self._rows -= buf.count - start
            buf.truncate(start)

    def _update(self, ev: Update) -> None:
        rel = self._relations.get(ev.relid)
        old, new = ev.old, ev.new
        if old is not None and not ev.old_is_key and UNCHANGED in new:
            # REPLICA IDENTITY FULL sends the whole old row, TOASTed values included: an
            # unchanged value is right there, no need to look it up in the Delta table. (A
            # TOASTed value is never NULL: a None there means the old row lacks it after all.)
            new = tuple(o if n is UNCHANGED and o is not None and o is not UNCHANGED else n
                        for n, o in zip(new, old, strict=False))
        if rel is None or old is None or not rel.key_idx:
            self._change(ev.relid, _OP_U, new, from_update=True)
            return
        if any(old[i] != new[i] and new[i] is not UNCHANGED for i in rel.key_idx):
            # the key changed: a delete of the old key, then an insert of the new row
            self._change(ev.relid, _OP_D, old)
            self._change(ev.relid, _OP_I, new, from_update=True)
        else:
            self._change(ev.relid, _OP_U, new, from_update=True)

    def _buffer(self, rel: _Relation) -> TableBuffer:
        """The relation's table buffer of the current batch (created on first use)."""
        buf = rel.buf
        if rel.buf_batch != self._batch_no or buf is None:
            ref = rel.spec.ref
            buf = self._buffers.get(ref)
            if buf is None or buf.rel is not rel:
                buf = self._buffers[ref] = buf or TableBuffer(rel=rel)
                buf.rel = rel
                self._txn_start.setdefault(ref, buf.count)
            rel.buf, rel.buf_batch = buf, self._batch_no
        return buf

    def _packed(self, run: PackedChanges) -> None:
        """A run of changes, kept packed: per run, not per row, bookkeeping."""
        rel = self._relations.get(run.relid)
        if rel is None or rel.stopped or not run.count:
            return
        if run.has_old and rel.key_idx and not run.keeps_keys(rel.key_idx):
            # an update of the run changed its key: two rows (D, I), decided one by one
            for event in run.events():
                self.add(event)
            return
        buf = rel.buf
        if rel.buf_batch != self._batch_no or buf is None:
            buf = self._buffer(rel)
        if rel.seq_txn != self._txn_no:
            rel.seq, rel.seq_txn = 0, self._txn_no
        n, seq = run.count, rel.seq
        rel.seq = seq + n
        buf.items.append(run)
        buf.tail += n
        buf.runs += 1
        buf.ops += run.ops
        end = seq + n
        buf.seqs += _SEQS[seq:end] if end <= len(_SEQS) else array("q", range(seq, end))
        self._rows += n
        self._bytes += ROW_OVERHEAD_BYTES * n + run.nbytes
        if self._first_at is None:
            self._first_at = self._clock()
        if self._bytes >= self._max_bytes and self._begin is not None:
            self._compact()

    def _change(self, relid: int, op: int, row: Row, *, from_update: bool = False) -> None:
        """One decoded row; `op` is the `_cdc_op` letter's byte (`_OP_I`, ...)."""
        rel = self._relations.get(relid)
        if rel is None or rel.stopped:
            return
        buf = rel.buf
        if rel.buf_batch != self._batch_no or buf is None:
            buf = self._buffer(rel)
        if rel.seq_txn != self._txn_no:
            rel.seq, rel.seq_txn = 0, self._txn_no
        seq = rel.seq
        rel.seq = seq + 1
        if from_update and UNCHANGED in row:  # only an update's new row can hold the marker
            buf.unchanged[buf.tail] = tuple(i for i, v in enumerate(row) if v is UNCHANGED)
        buf.items.append(row)
        buf.tail += 1
        buf.ops.append(op)
        buf.seqs.append(seq)
        self._rows += 1
        self._bytes += ROW_OVERHEAD_BYTES + sum(map(len, filter(None, row)))  # type: ignore[arg-type]
        if self._first_at is None:
            self._first_at = self._clock()
        if self._bytes >= self._max_bytes and self._begin is not None:
            self._compact()

    def _compact(self) -> None:
        """Inside a transaction whose text tails reached `CONVERT_BYTES` (a batch cannot close
        there): convert them to Arrow parts, smaller, and in pieces that bound what a
        conversion holds; once converted parts exceed the budget (`max_bytes`) as well, move
        them to spill files (read back piece by piece at `take`, never mapped whole), so one
        huge transaction still lands in one batch without holding it in RAM."""
        self._seal_tails()
        if self._part_bytes >= self._budget:
            for buf in self._buffers.values():
                self.spilled_bytes += spill_parts(buf, self._spill_dir)
            self._part_bytes = 0

    def _seal_tails(self) -> None:
        """Convert every buffer's text tail to an Arrow part (under the buffer's current shape)."""
        for buf in self._buffers.values():
            if buf.tail:
                self._seal(buf)
        self._bytes = 0

    def _seal(self, buf: TableBuffer) -> None:
        part = self._convert(buf)
        buf.parts.append(part)
        buf.converted += part.num_rows
        self._part_bytes += part.nbytes

    def _commit(self, ev: Commit) -> None:
        ts = ev.commit_ts_us
        for buf in self._buffers.values():
            if not buf.segments or buf.segments[-1][0] != buf.count:
                buf.segments.append((buf.count, ev.end_lsn, ts))
        self._version = ev.end_lsn
        self._txns += 1
        self._begin = None

    # ---- closing ----------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._begin is not None

    @property
    def pending_rows(self) -> int:
        return self._rows

    @property
    def version(self) -> int | None:
        """End LSN of the last committed transaction fed in (None before any)."""
        return self._version

    def ready(self) -> bool:
        """A batch should be taken now: full by rows or bytes, or the flush interval passed."""
        if self.in_transaction or self._version is None:
            return False
        full = self._bytes + self._part_bytes + self.spilled_bytes >= self._budget
        if self._new_stops or self._rows >= self._max_rows or full:
            return True
        return self._first_at is not None and self._clock() - self._first_at >= self._interval

    def take(self) -> ChangeBatch | None:
        """Everything committed so far as one batch (None when no transaction was fed)."""
        if self.in_transaction:
            raise RuntimeError("take() inside a transaction would split it")
        if self._version is None:
            return None
        tables: dict[TableRef, BatchTable] = {}
        keys: dict[TableRef, tuple[str, ...]] = {}
        for ref, buf in self._buffers.items():
            if buf.count and buf.spills:
                tables[ref] = self._to_spilled(buf)
                keys[ref] = buf.rel.key
            elif buf.count:
                tables[ref] = self._to_arrow(buf)
                keys[ref] = buf.rel.key
        batch = ChangeBatch(version=self._version, transactions=self._txns, tables=tables,
                            keys=keys, masked=self._masked, stopped=tuple(self._new_stops),
                            schema_changes=tuple(self._schema_changes))
        self._buffers.clear()
        self._batch_no += 1
        self._new_stops.clear()
        self._schema_changes = []
        self._masked = {}
        self._rows = self._bytes = self._part_bytes = self._txns = 0
        self.spilled_bytes = 0
        self._first_at = None
        self._version = None
        return batch

    def _convert(self, buf: TableBuffer) -> pa.Table:
        """The tail's text rows as one Arrow part (data columns, `_cdc_op`, `_cdc_seq`,
        `_cdc_unchanged`); the tail is emptied (before converting: the rows are let go of as
        soon as their text columns exist)."""
        rel, n = buf.rel, buf.tail
        columns = rel.relation.columns
        transposed, unchanged = tail_columns(buf, len(columns))
        ops, seqs = buf.ops, buf.seqs
        buf.clear_tail()
        selected = rel.spec.columns
        arrays: list[pa.Array] = []
        names: list[str] = []
        for col, values, convert in zip(columns, transposed, rel.converters, strict=True):
            if selected is not None and col.name not in selected and col.name not in rel.key:
                continue
            converted, bad = convert(values)
            if bad:
                masked = self._masked
                masked[(rel.spec.ref, col.name)] = masked.get((rel.spec.ref, col.name), 0) + bad
            arrays.append(converted)
            names.append(col.name)
        del transposed
        marks = _column_names(unchanged, columns) if unchanged is not None \
            else pa.nulls(n, pa.list_(pa.string()))
        arrays += [ops_array(ops), pa.Array.from_buffers(pa.int64(), n,
                                                          [None, pa.py_buffer(seqs)]), marks]
        names += [OP, SEQ, UNCHANGED_LIST]
        return pa.Table.from_arrays(arrays, names=names)

    def _to_arrow(self, buf: TableBuffer) -> pa.Table:
        if buf.tail or not buf.parts:
            self._seal(buf)
        if len(buf.parts) == 1:
            table = buf.parts[0]
        else:
            # parts of different shapes (an ALTER TABLE in between): missing columns become
            # null, widened types are promoted; data columns first, in order of appearance
            table = pa.concat_tables(buf.parts, promote_options="permissive")
            engine = [OP, SEQ, UNCHANGED_LIST]
            table = table.select([n for n in table.column_names if n not in engine] + engine)
        lsns, stamps = expand_segments(buf.segments, table.num_rows)
        table = table.add_column(table.schema.get_field_index(SEQ), LSN, lsns)
        return table.add_column(table.schema.get_field_index(UNCHANGED_LIST), COMMITTED_AT,
                                stamps.cast(ENGINE_SCHEMA.field(COMMITTED_AT).type))


    def _to_spilled(self, buf: TableBuffer) -> SpilledTable:
        """A buffer that spilled, as one spill file in the batch layout: its spill files and
        in-memory parts are read piece by piece, given one shape (as `_to_arrow`'s concat
        does) and their `_cdc_lsn` / `_cdc_committed_at`, and written out; at most one piece
        of a part is in memory at a time. The raw files are released as soon as they are read."""
        if buf.tail:
            self._seal(buf)
        raws = [w.finish() for w in buf.spills]
        buf.spills = []
        try:
            shape = pa.unify_schemas([r.schema for r in raws] + [p.schema for p in buf.parts],
                                     promote_options="permissive")
            engine = [OP, SEQ, UNCHANGED_LIST]
            fields = [f for f in shape if f.name not in engine] + [shape.field(n)
                                                                   for n in engine]
            out = pa.schema(fields)
            out = out.insert(out.get_field_index(SEQ), ENGINE_SCHEMA.field(LSN))
            out = out.insert(out.get_field_index(UNCHANGED_LIST),
                             ENGINE_SCHEMA.field(COMMITTED_AT))
            key = buf.rel.key[0] if len(buf.rel.key) == 1 else None  # its range, in this pass
            writer = SpillWriter(out, self._spill_dir, key=key)
            try:
                start = 0
                for piece in spilled_pieces(raws, buf.spill_keep, buf.parts):
                    n = piece.num_rows
                    lsns, stamps = expand_range(buf.segments, start, n)
                    columns = {LSN: lsns,
                               COMMITTED_AT: stamps.cast(ENGINE_SCHEMA.field(COMMITTED_AT).type)}
                    have = piece.schema.names
                    writer.write(pa.RecordBatch.from_arrays(
                        [columns[f.name] if f.name in columns
                         else piece.column(f.name).cast(f.type) if f.name in have
                         else pa.nulls(n, f.type) for f in out], schema=out))
                    start += n
                if start != buf.count:
                    raise RuntimeError(f"spilled {start} rows of a table holding {buf.count}")
                return writer.finish()
            except BaseException:
                writer.abort()
                raise
        finally:
            for raw in raws:
                raw.close()
            buf.parts = []


def _column_names(marks: pa.Array, columns: Sequence[RelationColumn]) -> pa.Array:
    """`_cdc_unchanged` from per-row column indices (list<int32>): the same lists of names."""
    names = pa.array([c.name for c in columns], pa.string())
    values = names.take(marks.values)
    return pa.ListArray.from_arrays(marks.offsets, values, mask=marks.is_null())


_OP_I, _OP_U, _OP_D, _OP_T = b"IUDT"
# Prebuilt, sliced per run: a packed run's `_cdc_seq` values cost no Python per row.
_SEQS: Final = array("q", range(1 << 16))

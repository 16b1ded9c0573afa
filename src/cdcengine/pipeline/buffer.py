"""One table's rows of the batch being built (`TableBuffer`), and turning them into Arrow.

The batcher (`cdcengine.pipeline.batcher`) owns the buffers; here is what a buffer holds and the
column-wise work on it: the text tail as columns (`tail_columns`, packed runs of changes kept
as Arrow arrays, `interleave`), the one-letter `_cdc_op` array (`ops_array`), the per-row end
LSN and commit time from per-transaction marks (`expand_segments`, `expand_range`), and moving
converted parts to spill files (`spill_parts`) when one transaction outgrows the memory budget.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine.events import UNCHANGED, PackedChanges, Row
from cdcengine.sink.spilled import SpilledTable, SpillWriter

if TYPE_CHECKING:
    from cdcengine.pipeline.batcher import _Relation

_one_letter_offsets: pa.Buffer = pa.py_buffer(array("i", range(1 << 16)))


@dataclass(slots=True)
class TableBuffer:
    """One table's rows: converted rows moved to spill files (`spills`, one per shape, in
    order: `spilled_rows` rows, of which the first `spill_keep` count when set), then converted
    `parts` in memory, then a tail of text rows and packed runs of changes (`items`; a run holds
    `run.count` rows, so `tail` counts rows, not items). Row positions count from the first
    spilled row; `segments` give
    (rows so far, end LSN, commit time) per committed transaction; `unchanged` is keyed by
    tail row position."""

    rel: _Relation  # the table's current relation (shape, converters) in the batcher
    parts: list[pa.Table] = field(default_factory=list)
    converted: int = 0  # rows held in `spills` and `parts`
    spills: list[SpillWriter] = field(default_factory=list)
    spilled_rows: int = 0
    spill_keep: int | None = None  # an aborted transaction's spilled rows are cut at take
    items: list[Row | PackedChanges] = field(default_factory=list)
    tail: int = 0  # rows in `items`
    runs: int = 0  # items that are packed runs
    ops: bytearray = field(default_factory=bytearray)  # one byte per row: b"I", b"U", ...
    seqs: array[int] = field(default_factory=lambda: array("q"))
    # tail row position -> indices of its columns holding an unchanged-TOAST marker
    unchanged: dict[int, tuple[int, ...]] = field(default_factory=dict)
    segments: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.converted + self.tail

    def clear_tail(self) -> None:
        self.items, self.ops, self.seqs, self.unchanged = [], bytearray(), array("q"), {}
        self.tail = self.runs = 0

    def truncate(self, upto: int) -> None:
        """Keep the first `upto` rows (drop an aborted transaction's tail)."""
        if upto >= self.converted:
            keep = upto - self.converted
            if self.runs:
                self._cut_items(keep)
            else:
                del self.items[keep:]
            self.tail = keep
            del self.ops[keep:], self.seqs[keep:]
            for i in [i for i in self.unchanged if i >= keep]:
                del self.unchanged[i]
            return
        self.clear_tail()
        kept: list[pa.Table] = []
        left = upto - self.spilled_rows
        if left < 0:  # rows already in spill files: cut when they are read back
            self.spill_keep = upto
        for part in self.parts:
            if left <= 0:
                break
            kept.append(part.slice(0, min(left, part.num_rows)))
            left -= kept[-1].num_rows
        self.parts, self.converted = kept, upto

    def _cut_items(self, keep: int) -> None:
        """Keep the tail's first `keep` rows; a run cut in the middle becomes its rows."""
        items: list[Row | PackedChanges] = []
        rows = 0
        for item in self.items:
            if rows >= keep:
                break
            if isinstance(item, PackedChanges):
                if rows + item.count <= keep:
                    items.append(item)
                    rows += item.count
                else:
                    items += item.rows()[: keep - rows]
                    rows = keep
            else:
                items.append(item)
                rows += 1
        self.items = items
        self.runs = sum(isinstance(item, PackedChanges) for item in items)


def spill_parts(buf: TableBuffer, directory: Path | None) -> int:
    """Move `buf`'s converted parts to its spill files (a new file when the shape changed: an
    ALTER TABLE inside the transaction); returns their Arrow bytes. The files are anonymous
    (`SpillFile`): nothing is left after a crash."""
    moved = 0
    for part in buf.parts:
        if not buf.spills or buf.spills[-1].schema != part.schema:
            buf.spills.append(SpillWriter(part.schema, directory, summarise=False))
        buf.spills[-1].write(part)
        buf.spilled_rows += part.num_rows
        moved += part.nbytes
    buf.parts = []
    return moved


Columns = Sequence[Sequence[bytes | None] | pa.Array]
_MARKS = pa.list_(pa.int32())


def tail_columns(buf: TableBuffer, ncols: int) -> tuple[Columns, pa.Array | None]:
    """The tail's values column by column -- lists of `bytes` when it holds decoded rows only,
    Arrow binary arrays when it holds packed runs (all runs' columns come from their class in
    one call; decoded rows in between are put back in place by one `take`) -- and per row the
    indices of the columns whose value is an unchanged-TOAST marker (list<int32>, null when
    none; None when no row has one). Marked values are null in the columns."""
    items = buf.items
    if buf.runs:
        runs = [item for item in items if isinstance(item, PackedChanges)]
        cls = type(runs[0])
        packed = cls.columns(runs, ncols) if all(type(r) is cls for r in runs) else None
        if packed is not None:
            if buf.runs == len(items):
                return packed.columns, packed.unchanged
            return interleave(buf, packed.columns, packed.unchanged)
        # a row of another shape: every run row by row (they raise if malformed)
        marks: list[tuple[int, ...] | None] = []
        rows: list[Row] = []
        for item in items:
            if isinstance(item, PackedChanges):
                for row in item.rows():
                    marks.append(_unchanged_in(row) if UNCHANGED in row else None)
                    rows.append(row)
            else:
                marks.append(buf.unchanged.get(len(rows)))
                rows.append(item)
        return _text_columns(rows, ncols, marks), _marks_array(marks)
    rows = items  # type: ignore[assignment]
    if not buf.unchanged:
        return _text_columns(rows, ncols, None), None
    marks = [buf.unchanged.get(i) for i in range(len(rows))]
    return _text_columns(rows, ncols, marks), _marks_array(marks)


def _unchanged_in(row: Row) -> tuple[int, ...]:
    return tuple(i for i, v in enumerate(row) if v is UNCHANGED)


def _text_columns(rows: list[Row], ncols: int,
                  marks: list[tuple[int, ...] | None] | None) -> Columns:
    if marks is not None:
        rows = [tuple(None if v is UNCHANGED else v for v in r) if m else r
                for r, m in zip(rows, marks, strict=True)]
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(ncols)]


def _marks_array(marks: list[tuple[int, ...] | None]) -> pa.Array | None:
    if not any(marks):
        return None
    return pa.array([list(m) if m else None for m in marks], _MARKS)


def ops_array(ops: bytearray) -> pa.Array:
    """`_cdc_op`: a string array of the one-letter ops on their bytes (offsets 0, 1, 2, ...:
    a shared prebuilt buffer, longer than needed is fine)."""
    global _one_letter_offsets
    n = len(ops)
    if (n + 1) * 4 > _one_letter_offsets.size:
        _one_letter_offsets = pa.py_buffer(array("i", range(2 * (n + 1))))
    return pa.Array.from_buffers(pa.string(), n, [None, _one_letter_offsets,
                                                  pa.py_buffer(bytes(ops))])


def interleave(buf: TableBuffer, packed: list[pa.Array],
               packed_marks: pa.Array | None) -> tuple[list[pa.Array], pa.Array | None]:
    """Columns (and unchanged marks) of a tail mixing packed runs (their columns: `packed`)
    and decoded rows, in tail order: the decoded rows' values are appended after the runs' and
    one `take` per column puts every row back in place."""
    rows: list[Row] = []
    order: list[int] = []
    row_marks: list[tuple[int, ...] | None] = []
    packed_at = 0
    first_row = len(packed[0]) if packed else 0
    position = 0
    for item in buf.items:
        if isinstance(item, PackedChanges):
            order += range(packed_at, packed_at + item.count)
            packed_at += item.count
            position += item.count
        else:
            mark = buf.unchanged.get(position)
            if mark:
                item = tuple(None if v is UNCHANGED else v for v in item)
            row_marks.append(mark)
            order.append(first_row + len(rows))
            rows.append(item)
            position += 1
    ncols = len(packed)
    if any(len(r) != ncols for r in rows):
        raise ValueError("rows of a table have different numbers of columns")
    index = pa.array(order, pa.int64())
    out: list[pa.Array] = []
    for j, column in enumerate(packed):
        decoded = pa.array([r[j] for r in rows], column.type)
        out.append(pa.concat_arrays([column, decoded]).take(index))
    marks = None
    if packed_marks is not None or any(row_marks):
        first = packed_marks if packed_marks is not None else pa.nulls(first_row, _MARKS)
        rest = _marks_array(row_marks)
        if rest is None:
            rest = pa.nulls(len(rows), _MARKS)
        marks = pa.concat_arrays([first, rest]).take(index)
    return out, marks


def expand_segments(segments: list[tuple[int, int, int]], n: int) -> tuple[pa.Array, pa.Array]:
    """Per-row (end LSN, commit time) from per-transaction (rows so far, end LSN, ts) marks,
    run-length decoded by Arrow."""
    ends: list[int] = []
    lsns: list[int] = []
    stamps: list[int] = []
    start = 0
    for upto, lsn, ts in segments:
        if upto > start:
            ends.append(upto)
            lsns.append(lsn)
            stamps.append(ts)
        start = upto
    if start != n:
        raise RuntimeError("rows without a committed transaction in a batch")
    if not ends:
        return pa.array([], pa.int64()), pa.array([], pa.int64())
    run_ends = pa.array(ends, pa.int64())

    def decode(values: list[int]) -> pa.Array:
        encoded = pa.RunEndEncodedArray.from_arrays(run_ends, pa.array(values, pa.int64()))
        return pc.run_end_decode(encoded)

    return decode(lsns), decode(stamps)


def expand_range(segments: list[tuple[int, int, int]], start: int,
                 n: int) -> tuple[pa.Array, pa.Array]:
    """`expand_segments` for the rows [start, start + n) only: a piece of a spilled table gets
    its columns without the whole batch's per-row arrays in memory."""
    end = start + n
    cut: list[tuple[int, int, int]] = []
    for upto, lsn, ts in segments:
        if upto <= start:
            continue
        cut.append((min(upto, end) - start, lsn, ts))
        if upto >= end:
            break
    return expand_segments(cut, n)


def spilled_pieces(raws: Sequence[SpilledTable], keep: int | None,
            parts: Sequence[pa.Table]) -> Iterator[pa.RecordBatch]:
    """The record batches of spill files (their first `keep` rows when set), then of parts."""
    left = keep
    for raw in raws:
        with raw.reader() as reader:
            for piece in reader:
                if left is not None:
                    if left <= 0:
                        return
                    piece = piece.slice(0, left)
                    left -= piece.num_rows
                yield piece
    for part in parts:
        yield from part.to_batches()

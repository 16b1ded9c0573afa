"""Packed changes: runs of pgoutput Insert/Update/Delete messages kept as raw bytes, split into
columns in bulk.

Why: a bulk load or a bulk update is almost all change messages, and decoding each one into a
tuple of `bytes` (then transposing the tuples and building Arrow arrays from Python objects) is
most of what the engine's reading thread spends per row. Instead, the change session
(`changes.py`) collects consecutive changes into one relation as a `ChangeRun` -- the messages
as the server sent them, joined, with each one's size and `_cdc_op` letter -- and the batcher,
when it converts a table's rows, asks `ChangeRun.columns` for all runs at once. That finds every
column's values with vectorised offset arithmetic (numpy), one column at a time over all rows:

* layouts (a streamed transaction's messages lose their leading xid before they are packed):
  Insert ``'I' relid(4) 'N' tuple``; Update ``'U' relid(4) 'N' tuple`` or, under REPLICA
  IDENTITY FULL, ``'U' relid(4) 'O' tuple 'N' tuple``; Delete ``'D' relid(4) ('K'|'O') tuple``;
  a tuple is ``ncols(int16)`` then per column a kind byte and, for 't' (text), a big-endian
  int32 length and the value; 'n' (NULL) and 'u' (unchanged TOAST) have no length;
* every row's first tuple starts 8 bytes in; for column j the kind bytes and lengths of all rows
  are gathered at once from the rows' current positions, which then advance past the column;
  rows with an old ('O') tuple then read their new tuple the same way;
* the value a row keeps per column is the one the row-by-row path keeps: the new tuple's for
  inserts and updates, the old tuple's for deletes, and for an update carrying the whole old
  row, the old value where the new one is an unchanged TOAST marker (the batcher's rule);
* column j is one Arrow binary array over the joined buffer whose offsets are the rows'
  (start, end) pairs -- every other element is a value -- and one `take` of the even elements
  (NULLs and unchanged markers by a null mask). Unchanged markers left after that rule come back
  as column indices per row, for `_cdc_unchanged`.

The packing is one row per message, decided when the run is made: an update that sends the old
key ('K': the key changed) is never packed, and a run holding updates with a whole old row
('O') is checked by the batcher with `keeps_keys` before it is kept packed (a changed key makes
two rows, a delete and an insert; such a run is decoded message by message instead).

Only the common shape takes the column-wise path: every tuple with exactly the relation's column
count, values text, NULL or (in an update's new tuple only) unchanged. Anything else -- binary
('b') values, another column count, an unchanged marker in an old tuple, a truncated or
malformed message -- makes `columns` return None and the caller decodes the rows one by one with
`pgoutput.decode` (`ChangeRun.rows`), exactly as if they had arrived as events (so malformed
input raises the same `PgoutputError`, only later: when the batch is converted, still before
anything of it is written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdcengine.events import (
    UNCHANGED,
    Change,
    Delete,
    Insert,
    PackedChanges,
    PackedColumns,
    Row,
    Update,
)
from cdcengine_postgres.replication.pgoutput import decode

__all__ = ["CHANGE_HEADER", "PACKABLE", "ChangeRun", "split_changes"]

#: kind relid(4) marker ncols(2): the bytes before a message's first tuple column.
CHANGE_HEADER: Final = 8
_KIND_TEXT: Final = 0x74  # 't'
_KIND_NULL: Final = 0x6E  # 'n'
_KIND_UNCHANGED: Final = 0x75  # 'u'
_MARK_NEW: Final = 0x4E  # 'N'
_MARK_OLD: Final = 0x4F  # 'O'
_OP_I, _OP_U, _OP_D = b"IUD"
_INT32_LIMIT: Final = 2**31 - 1
#: Messages split at once (see `ChangeRun.columns`).
GROUP_BYTES = 2 << 20
_BIN: Final = pa.binary()
_MARKS: Final = pa.list_(pa.int32())

#: (type byte, marker byte) of the messages a run may hold -> their `_cdc_op` letter. An
#: update with the old key ('K') is left out: it changed the key, which makes two rows.
PACKABLE: Final = {
    (0x49, _MARK_NEW): _OP_I,  # 'I' … 'N'
    (0x55, _MARK_NEW): _OP_U,  # 'U' … 'N' (no old tuple)
    (0x55, _MARK_OLD): _OP_U,  # 'U' … 'O' … 'N' (REPLICA IDENTITY FULL)
    (0x44, 0x4B): _OP_D,  # 'D' … 'K'
    (0x44, _MARK_OLD): _OP_D,  # 'D' … 'O'
}


class ChangeRun(PackedChanges):
    """Consecutive packable change messages into one relation, kept as the server sent them:
    joined into one `bytes` (no Python object per row) with each message's size and op."""

    __slots__ = ("data", "sizes")

    def __init__(self, relid: int, payloads: Sequence[bytes], ops: bytes | None = None,
                 has_old: bool = False) -> None:
        self.relid = relid
        self.data = b"".join(payloads)
        self.sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
        self.count = len(payloads)
        self.nbytes = len(self.data)
        if ops is None:  # each message's type byte is its op letter: read them all at once
            starts = np.cumsum(self.sizes) - self.sizes
            ops = np.frombuffer(self.data, dtype=np.uint8)[starts].tobytes()
        self.ops = ops
        self.has_old = has_old

    @classmethod
    def inserts(cls, relid: int, payloads: Sequence[bytes]) -> ChangeRun:
        """A run of plain Inserts (`'I' relid 'N' …` each)."""
        return cls(relid, payloads, b"I" * len(payloads))

    def payloads(self) -> list[bytes]:
        """The messages, one `bytes` each."""
        data, out, start = self.data, [], 0
        for size in self.sizes.tolist():
            out.append(data[start : start + size])
            start += size
        return out

    def events(self) -> list[Change]:
        out: list[Change] = []
        for payload in self.payloads():
            msg = decode(payload, in_stream=False)
            assert type(msg) in (Insert, Update, Delete)  # only those are packed
            out.append(msg)  # type: ignore[arg-type]
        return out

    def rows(self) -> list[Row]:
        return [_row_of(ev) for ev in self.events()]

    def keeps_keys(self, key_idx: Sequence[int]) -> bool:
        if not self.has_old:
            return True
        found = _Split.parse(self.data, self.sizes, None)
        return found is not None and found.keeps_keys(key_idx)

    @classmethod
    def columns(cls, runs: Sequence[PackedChanges], ncols: int) -> PackedColumns | None:
        # Runs are joined and split in groups of about `GROUP_BYTES`: the temporaries stay
        # small (and in cache), and no copy of a whole batch's messages is ever made.
        parts: list[PackedColumns] = []
        datas: list[bytes] = []
        sizes: list[np.ndarray] = []
        held = 0
        for i, run in enumerate(runs):
            assert isinstance(run, ChangeRun)
            datas.append(run.data)
            sizes.append(run.sizes)
            held += run.nbytes
            if held >= GROUP_BYTES or i == len(runs) - 1:
                data = datas[0] if len(datas) == 1 else b"".join(datas)
                size = sizes[0] if len(sizes) == 1 else np.concatenate(sizes)
                part = split_changes(data, size, ncols)
                if part is None:
                    return None
                parts.append(part)
                datas, sizes, held = [], [], 0
        if not parts:
            return split_changes(b"", np.empty(0, np.int64), ncols)
        if len(parts) == 1:
            return parts[0]
        columns = [pa.concat_arrays([part.columns[j] for part in parts]) for j in range(ncols)]
        marks = None
        if any(part.unchanged is not None for part in parts):
            marks = pa.concat_arrays([
                part.unchanged if part.unchanged is not None
                else pa.nulls(len(part.columns[0]) if ncols else 0, _MARKS)
                for part in parts])
        return PackedColumns(columns=columns, unchanged=marks)

    def __repr__(self) -> str:
        return (f"ChangeRun(relid={self.relid}, count={self.count}, nbytes={self.nbytes}, "
                f"ops={self.ops[:16]!r}{'…' if self.count > 16 else ''})")


def _row_of(ev: Change) -> Row:
    """The row the batcher keeps of one packed change (see the module docstring)."""
    if type(ev) is Insert:
        return ev.new
    if type(ev) is Delete:
        return ev.old
    assert type(ev) is Update
    old, new = ev.old, ev.new
    if old is not None and not ev.old_is_key and UNCHANGED in new:
        new = tuple(o if n is UNCHANGED and o is not None and o is not UNCHANGED else n
                    for n, o in zip(new, old, strict=False))
    return new


class _Tuples:
    """One tuple of every row of a group, located: per column (start, end) and kind bytes."""

    __slots__ = ("bounds", "ends", "kinds")

    def __init__(self, bounds: np.ndarray, kinds: np.ndarray, ends: np.ndarray) -> None:
        self.bounds = bounds  # (rows, 2 * ncols): start, end of each column's value
        self.kinds = kinds  # (rows, ncols) uint8
        self.ends = ends  # position after the tuple, per row

    @staticmethod
    def locate(buf: np.ndarray, data: bytes, pos: np.ndarray, ends: np.ndarray,
               ncols: int) -> _Tuples | None:
        """The tuples starting (at their ncols field) at `pos`, or None when any is not of the
        common shape (see the module docstring)."""
        n = len(pos)
        last = len(data) - 4
        if bool((pos + 2 > ends).any()) or last < 0:
            return None
        count = (buf[pos].astype(np.int64) << 8) | buf[pos + 1]
        if not bool((count == ncols).all()):
            return None
        # every 4-byte window of the buffer as a big-endian int32 (a view, unaligned: stride
        # 1); lengths are read at min(position, last), so a row whose kind byte is the
        # buffer's last ('n') reads a window it then ignores
        int32_at = np.ndarray(shape=(last + 1,), dtype=">i4", buffer=data, strides=(1,))
        pos = pos + 2
        bounds = np.empty((n, 2 * ncols), dtype=np.int64)
        kinds = np.empty((n, ncols), dtype=np.uint8)
        for j in range(ncols):
            if bool((pos >= ends).any()):
                return None
            kind = buf[pos]
            text = kind == _KIND_TEXT
            length = int32_at[np.minimum(pos + 1, last)]
            if bool(text.all()):
                start = pos + 5
                end = start + length
            else:
                # which tuple may hold unchanged markers is the caller's check
                other = (kind == _KIND_NULL) | (kind == _KIND_UNCHANGED)
                if not bool((text | other).all()):
                    return None  # 'b' or garbage: the row-by-row path decides
                start = pos + np.where(text, 5, 1)
                end = start + np.where(text, length, 0)
            if bool((end < start).any()) or bool((end > ends).any()):
                return None
            bounds[:, 2 * j] = start
            bounds[:, 2 * j + 1] = end
            kinds[:, j] = kind
            pos = end
        return _Tuples(bounds, kinds, pos)


class _Split:
    """A group of messages located: the tuple each row keeps, and for updates with an old row,
    both (`old`, `new`, on the rows `full`)."""

    __slots__ = ("bounds", "data", "full", "kinds", "new", "old")

    def __init__(self, data: bytes, bounds: np.ndarray, kinds: np.ndarray, full: np.ndarray,
                 old: _Tuples | None, new: _Tuples | None) -> None:
        self.data, self.bounds, self.kinds, self.full = data, bounds, kinds, full
        self.old, self.new = old, new

    @staticmethod
    def parse(data: bytes, sizes: np.ndarray, ncols: int | None) -> _Split | None:
        if int(sizes.min()) < CHANGE_HEADER or int(sizes.sum()) != len(data):
            return None
        buf = np.frombuffer(data, dtype=np.uint8)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        kind, mark = buf[starts], buf[starts + 5]
        if ncols is None:  # `keeps_keys`: the relation's column count is the messages'
            ncols = int(buf[starts[0] + 6]) << 8 | int(buf[starts[0] + 7])
        if ncols <= 0:
            return None
        full = (kind == 0x55) & (mark == _MARK_OLD)
        first = _Tuples.locate(buf, data, starts + 6, ends, ncols)
        if first is None:
            return None
        # only an update's new tuple holds unchanged markers (an old tuple is sent whole, an
        # insert has nothing to leave unchanged): one elsewhere goes row by row, like any
        # other surprise
        plain_update = (kind == 0x55) & ~full
        if bool(((first.kinds == _KIND_UNCHANGED) & ~plain_update[:, None]).any()):
            return None
        bounds, kinds = first.bounds, first.kinds
        old = new = None
        if bool(full.any()):
            rows = np.flatnonzero(full)
            at = first.ends[rows]
            if bool((at + 1 > ends[rows]).any()) or bool((buf[np.minimum(at, len(data) - 1)]
                                                          != _MARK_NEW).any()):
                return None
            new = _Tuples.locate(buf, data, at + 1, ends[rows], ncols)
            if new is None:
                return None
            old = _Tuples(first.bounds[rows], first.kinds[rows], first.ends[rows])
            # the batcher's rule: an unchanged TOASTed value is taken from the whole old row
            # (unless the old row has NULL there)
            take_old = (new.kinds == _KIND_UNCHANGED) & (old.kinds == _KIND_TEXT)
            nb = new.bounds.copy()
            both = np.repeat(take_old, 2, axis=1)
            nb[both] = old.bounds[both]
            nk = np.where(take_old, old.kinds, new.kinds)
            bounds, kinds = bounds.copy(), kinds.copy()
            bounds[rows], kinds[rows] = nb, nk
        return _Split(data, bounds, kinds, full, old, new)

    def keeps_keys(self, key_idx: Sequence[int]) -> bool:
        """No row with a whole old row changes a value at `key_idx` (the batcher's test: a
        value that differs and is not an unchanged marker)."""
        if self.old is None or not key_idx:
            return True
        rows = np.flatnonzero(self.full)
        for i in key_idx:
            if i >= self.kinds.shape[1]:
                continue
            new_kind = self.kinds[rows, i]
            old_kind = self.old.kinds[:, i]
            ob, nb = self.old.bounds[:, 2 * i : 2 * i + 2], self.bounds[rows, 2 * i : 2 * i + 2]
            olen, nlen = ob[:, 1] - ob[:, 0], nb[:, 1] - nb[:, 0]
            differs = (new_kind != _KIND_UNCHANGED) & (
                (new_kind != old_kind) | ((new_kind == _KIND_TEXT) & (olen != nlen)))
            if bool(differs.any()):
                return False
            same_len = (new_kind == _KIND_TEXT) & (old_kind == _KIND_TEXT)
            if bool(same_len.any()) and not _equal_bytes(self.data, ob[same_len], nb[same_len]):
                return False
        return True


def _equal_bytes(data: bytes, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the byte ranges a[i] and b[i] of `data` (same lengths) are equal for every i."""
    left = _slices(data, a)
    right = _slices(data, b)
    return bool(pc.all(pc.equal(left, right)).as_py())


def _slices(data: bytes, bounds: np.ndarray) -> pa.Array:
    """The byte ranges `bounds` (rows of start, end) of `data` as one binary array."""
    offsets = bounds.reshape(-1)
    small = len(data) <= _INT32_LIMIT
    typ = _BIN if small else pa.large_binary()
    flat = pa.py_buffer(offsets.astype(np.int32 if small else np.int64))
    values = pa.Array.from_buffers(typ, len(offsets) - 1, [None, flat, pa.py_buffer(data)])
    return values.take(pa.array(np.arange(0, len(offsets) - 1, 2)))


def split_changes(data: bytes, sizes: np.ndarray, ncols: int) -> PackedColumns | None:
    """The text columns of the change messages joined in `data`, `sizes` bytes each (see the
    module docstring), or None when a row is not of the common shape. Columns are binary
    (large_binary past 2 GiB of messages)."""
    n = len(sizes)
    if n == 0:
        return PackedColumns(columns=[pa.array([], _BIN) for _ in range(ncols)], unchanged=None)
    if ncols <= 0:
        return None
    found = _Split.parse(data, sizes, ncols)
    if found is None:
        return None
    small = len(data) <= _INT32_LIMIT
    typ = _BIN if small else pa.large_binary()
    even = np.arange(0, 2 * n - 1, 2, dtype=np.int32 if small else np.int64)
    every = pa.array(even)
    body = pa.py_buffer(data)
    out: list[pa.Array] = []
    for j in range(ncols):
        # this column's (start, end) per row, in row order: the pairs ascend (each lies in its
        # own message), so the odd elements in between are valid (non-negative) gaps
        offsets = np.ascontiguousarray(found.bounds[:, 2 * j : 2 * j + 2]).reshape(-1)
        values = pa.Array.from_buffers(
            typ, 2 * n - 1,
            [None, pa.py_buffer(offsets.astype(np.int32 if small else np.int64)), body])
        kind = found.kinds[:, j]
        null = kind != _KIND_TEXT
        out.append(values.take(pa.array(even, mask=null) if bool(null.any()) else every))
    return PackedColumns(columns=out, unchanged=_marks(found.kinds))


def _marks(kinds: np.ndarray) -> pa.Array | None:
    """Per row, the indices of the columns still holding an unchanged marker (null if none)."""
    unchanged = kinds == _KIND_UNCHANGED
    if not bool(unchanged.any()):
        return None
    per_row = unchanged.sum(axis=1)
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    _, cols = np.nonzero(unchanged)  # row-major: each row's columns in order
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int32)),
                                    mask=pa.array(per_row == 0))

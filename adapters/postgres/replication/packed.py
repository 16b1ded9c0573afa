"""Packed inserts: runs of pgoutput Insert messages kept as raw bytes, split into columns in bulk.

Why: a bulk load is almost all Insert messages, and decoding each one into a tuple of `bytes`
(then transposing the tuples and building Arrow arrays from Python objects) is most of what the
engine's reading thread spends per row. Instead, the change session (`changes.py`) collects
consecutive plain Inserts into one relation as an `InsertRun` -- a list of the messages as the
server sent them -- and the batcher, when it converts a table's rows, asks `InsertRun.columns`
for all runs at once. That joins the messages into one buffer and finds every column's values
with vectorised offset arithmetic (numpy), one column at a time over all rows:

* Insert layout: 'I' relid(4) 'N' ncols(int16), then per column a kind byte and, for 't'
  (text), a big-endian int32 length and the value; 'n' is NULL and has no length;
* for column j, the kind bytes and lengths of all rows are gathered at once from the rows'
  current positions, which then advance past the column; each value's (start, end) goes into
  one interleaved offsets array -- value of column 0, the bytes up to column 1's value, value of
  column 1, ... -- so the joined buffer *is* one Arrow binary array whose every other element is
  a value, and column j is one `take` of the elements at j*2, j*2 + 2*ncols, ... (NULLs by a
  null index).

Only the common shape takes this path: every row with exactly the relation's column count and
every value text ('t') or NULL ('n'). Anything else -- unchanged-TOAST ('u'), binary ('b'),
another column count, a truncated or malformed message -- makes `columns` return None and the
caller decodes the rows one by one with `pgoutput.decode` (`InsertRun.rows`), exactly as if they
had arrived as `Insert` events (so malformed input raises the same `PgoutputError`, only later:
when the batch is converted, still before anything of it is written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import pyarrow as pa

from cdcengine.events import Insert, PackedInserts, Row
from cdcengine_postgres.replication.pgoutput import decode

__all__ = ["INSERT_HEADER", "InsertRun", "split_inserts"]

#: 'I' relid(4) 'N' ncols(2): the bytes before an Insert's first column.
INSERT_HEADER: Final = 8
_KIND_TEXT: Final = 0x74  # 't'
_KIND_NULL: Final = 0x6E  # 'n'
_INT32_LIMIT: Final = 2**31 - 1
#: Messages split at once (see `InsertRun.columns`).
GROUP_BYTES = 2 << 20
_BIN: Final = pa.binary()


class InsertRun(PackedInserts):
    """Consecutive plain Insert messages into one relation, kept as the server sent them:
    joined into one `bytes` (no Python object per row) with each message's size."""

    __slots__ = ("data", "sizes")

    def __init__(self, relid: int, payloads: Sequence[bytes]) -> None:
        self.relid = relid
        self.data = b"".join(payloads)
        self.sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
        self.count = len(payloads)
        self.nbytes = len(self.data)

    def payloads(self) -> list[bytes]:
        """The messages, one `bytes` each."""
        data, out, start = self.data, [], 0
        for size in self.sizes.tolist():
            out.append(data[start : start + size])
            start += size
        return out

    def rows(self) -> list[Row]:
        out: list[Row] = []
        for payload in self.payloads():
            msg = decode(payload, in_stream=False)
            assert type(msg) is Insert  # only 'I' … 'N' messages are packed
            out.append(msg.new)
        return out

    @classmethod
    def columns(cls, runs: Sequence[PackedInserts], ncols: int) -> list[pa.Array] | None:
        # Runs are joined and split in groups of about `GROUP_BYTES`: the temporaries stay
        # small (and in cache), and no copy of a whole batch's messages is ever made.
        parts: list[list[pa.Array]] = []
        datas: list[bytes] = []
        sizes: list[np.ndarray] = []
        held = 0
        for i, run in enumerate(runs):
            assert isinstance(run, InsertRun)
            datas.append(run.data)
            sizes.append(run.sizes)
            held += run.nbytes
            if held >= GROUP_BYTES or i == len(runs) - 1:
                data = datas[0] if len(datas) == 1 else b"".join(datas)
                size = sizes[0] if len(sizes) == 1 else np.concatenate(sizes)
                part = split_inserts(data, size, ncols)
                if part is None:
                    return None
                parts.append(part)
                datas, sizes, held = [], [], 0
        if not parts:
            return split_inserts(b"", np.empty(0, np.int64), ncols)
        if len(parts) == 1:
            return parts[0]
        return [pa.concat_arrays([part[j] for part in parts]) for j in range(ncols)]

    def __repr__(self) -> str:
        return f"InsertRun(relid={self.relid}, count={self.count}, nbytes={self.nbytes})"


def split_inserts(data: bytes, sizes: np.ndarray, ncols: int) -> list[pa.Array] | None:
    """The text columns of the Insert messages joined in `data`, `sizes` bytes each (see the
    module docstring), or None when a row is not of the common shape. Columns are binary
    (large_binary past 2 GiB of messages)."""
    n = len(sizes)
    if n == 0:
        return [pa.array([], _BIN) for _ in range(ncols)]
    if ncols <= 0 or int(sizes.min()) < INSERT_HEADER or int(sizes.sum()) != len(data):
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    # every 4-byte window of the buffer as a big-endian int32 (a view, unaligned: stride 1);
    # `last` is the last window's start: lengths are read at min(position, last), so a row
    # whose kind byte is the buffer's last ('n') reads a window it then ignores
    last = len(data) - 4
    if last < 0:
        return None
    int32_at = np.ndarray(shape=(last + 1,), dtype=">i4", buffer=data, strides=(1,))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    # ncols is an int16; a valid message's is small and positive, so two bytes compare exactly
    count = (buf[starts + 6].astype(np.int64) << 8) | buf[starts + 7]
    if not bool((count == ncols).all()):
        return None
    pos = starts + INSERT_HEADER
    small = len(data) <= _INT32_LIMIT
    # per row: start, end of column 0's value, start, end of column 1's value, ...
    bounds = np.empty((n, 2 * ncols), dtype=np.int32 if small else np.int64)
    nulls: list[np.ndarray | None] = []
    for j in range(ncols):
        if bool((pos >= ends).any()):
            return None
        kind = buf[pos]
        text = kind == _KIND_TEXT
        length = int32_at[np.minimum(pos + 1, last)]
        if bool(text.all()):
            null = None
            start = pos + 5
            end = start + length
        else:
            null = kind == _KIND_NULL
            if not bool((text | null).all()):
                return None  # 'u', 'b' or garbage: the row-by-row path decides
            start = pos + np.where(text, 5, 1)
            end = start + np.where(text, length, 0)
        if bool((end < start).any()) or bool((end > ends).any()):
            return None
        bounds[:, 2 * j] = start
        bounds[:, 2 * j + 1] = end
        nulls.append(null)
        pos = end
    flat = bounds.reshape(-1)
    values = pa.Array.from_buffers(
        _BIN if small else pa.large_binary(),
        len(flat) - 1,
        [None, pa.py_buffer(flat), pa.py_buffer(data)],
    )
    stride = 2 * ncols
    out: list[pa.Array] = []
    for j, null in enumerate(nulls):
        index = np.arange(2 * j, stride * n, stride, dtype=np.int32 if small else np.int64)
        out.append(values.take(pa.array(index, mask=null)))
    return out

"""Key clustering of a consolidated table: how much its files' key ranges overlap, and the key
a sorting compaction orders by.

Why: delta-rs rewrites every file a MERGE touches (copy-on-write; it writes no deletion
vectors yet). The merge's key-range predicate (`sql._merge_predicate`) and delta-rs's early
pruning skip a file only when its min/max key lies outside the batch's keys, so a batch of
recent keys touches few files only while each file holds a narrow, separate key range. That
holds for keys handed out in increasing order (integers, dates, timestamps); a random key (a
UUID) is left in arrival order, where recent rows already share files. Plain
compaction (bin-packing) and the merges themselves mix ranges; a compaction that sorts by the
key (`optimize.z_order` over the one key column is a sort by it) restores them. It rewrites
the whole table, so it runs only when the ranges overlap enough to cost merges something.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from cdcengine.sink.columns import LSN

STATS_PROPERTY = "delta.dataSkippingStatsColumns"


@dataclass(frozen=True, slots=True)
class KeyOverlap:
    """Files (and their bytes) whose key range overlaps another file's in the same partition."""

    files: int
    overlapping_files: int
    bytes: int
    overlapping_bytes: int

    @property
    def fraction(self) -> float:
        return self.overlapping_bytes / self.bytes if self.bytes else 0.0


def cluster_key(configuration: dict[str, str | None]) -> str | None:
    """The table's single key column, from the statistics columns the engine stored at
    creation (key columns, then `_cdc_lsn`); None for a composite key, which the merge's
    key-range predicate does not prune by either."""
    raw = configuration.get(STATS_PROPERTY) or ""
    names = [_unquote(n) for n in _split(raw)]
    keys = [n for n in names if n != LSN and not n.startswith("_cdc_")]
    return keys[0] if len(keys) == 1 else None


def sorts_by_arrival(type_: pa.DataType) -> bool:
    """Whether sorting by a key of this type keeps rows that change together in few files:
    integer and date/time keys are mostly handed out in increasing order (serial, identity,
    a timestamp), so recent rows share a key range. A string key (a UUID, a code) is not:
    sorted, the newest rows would spread over every file, while in arrival order (how the
    engine appends them) they stay together — for those, `partition_by` a date column."""
    return bool(pa.types.is_integer(type_) or pa.types.is_temporal(type_))


def key_overlap(actions: Any, key: str) -> KeyOverlap:
    """Overlap of the files' [min, max] ranges of `key`, partition by partition.

    `actions`: `DeltaTable.get_add_actions(flatten=True)`. A file without statistics for the
    key counts as overlapping (a merge cannot prune it)."""
    table = pa.table(actions)
    if table.num_rows == 0:
        return KeyOverlap(0, 0, 0, 0)
    cols = table.column_names
    lo_name, hi_name = f"min.{key}", f"max.{key}"
    partitions = [c for c in cols if c.startswith("partition.")]
    lows = table.column(lo_name).to_pylist() if lo_name in cols else [None] * table.num_rows
    highs = table.column(hi_name).to_pylist() if hi_name in cols else [None] * table.num_rows
    sizes = table.column("size_bytes").to_pylist()
    parts = [tuple(r.values()) for r in table.select(partitions).to_pylist()] if partitions \
        else [()] * table.num_rows
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, part in enumerate(parts):
        groups[part].append(i)
    overlapping: set[int] = set()
    for members in groups.values():
        ranged = [i for i in members if lows[i] is not None and highs[i] is not None]
        overlapping.update(i for i in members if i not in set(ranged))
        ranged.sort(key=lambda i: lows[i])
        reach, owner = None, None  # the highest max so far and the file holding it
        for i in ranged:
            if reach is not None and lows[i] <= reach:
                overlapping.update((i, owner))
            if reach is None or highs[i] > reach:
                reach, owner = highs[i], i
    overlapping.discard(None)  # type: ignore[arg-type]
    return KeyOverlap(
        files=table.num_rows,
        overlapping_files=len(overlapping),
        bytes=sum(sizes),
        overlapping_bytes=sum(sizes[i] for i in overlapping),
    )


def _split(raw: str) -> list[str]:
    """Split a comma-separated list of backtick-quoted names (commas inside quotes kept)."""
    out, cur, quoted = [], [], False
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "`":
            if quoted and raw[i + 1:i + 2] == "`":
                cur.append("``")
                i += 2
                continue
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    if cur:
        out.append("".join(cur).strip())
    return [n for n in out if n]


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == "`":
        return name[1:-1].replace("``", "`")
    return name

"""Change history from an append (change-log) table: SCD2 versions and point-in-time state.

An append table (SPEC §5) holds one row per change: the data columns plus `_cdc_lsn`,
`_cdc_seq`, `_cdc_op` ('R' snapshot read, 'I', 'U', 'D', 'T' truncate with null data),
`_cdc_committed_at` and `_cdc_unchanged`. Ordered by `(_cdc_lsn, _cdc_seq)` it is the source's
history. This module derives from it, with DuckDB SQL over the Arrow data:

- `scd2(append, key)`: one row per version of a key (slowly changing dimension, type 2): the
  data columns, `valid_from_lsn`/`valid_from_seq`/`valid_from` (the change that opened the
  version: its LSN, sequence and commit time), `valid_to_lsn`/`valid_to` (the change that
  closed it; null = current) and `is_deleted`. Every R/I/U opens a version with the row's
  values; a D opens a deleted version (a tombstone, `is_deleted` true, carrying the row's last
  values where the log has them), which the key's next insert closes; a T closes every version
  open at that point (the table was emptied) without opening one. Several changes of a key in
  one transaction give versions whose `valid_from_lsn` equals their `valid_to_lsn`: real, but
  never visible at any LSN.
- `as_of(append, key, lsn)`: the table as it was at LSN `lsn` (after every transaction with
  end LSN <= `lsn`): the data columns of each live version with
  `valid_from_lsn <= lsn < valid_to_lsn` (or open), plus `_cdc_lsn` and `_cdc_committed_at` of
  the change that produced it; at the latest LSN this is exactly the consolidated table's live
  rows (its data columns, `_cdc_lsn`, `_cdc_committed_at`). It is complete from the latest `R`
  row's LSN on: a resumed snapshot reads its remaining chunks at a later point than the first
  ones, and before that point the unchanged rows of those chunks are not in the log yet.

An unchanged-TOAST column the engine could not resolve (still listed in `_cdc_unchanged`) and
a delete's unknown values (a null non-key column of a 'D') take the key's previous value in the
log (a null inside a struct never counts as missing: genuine NULLs are kept).

The SQL is plain DuckDB and is exposed (`scd2_sql`, `as_of_sql`, and the generic `SCD2_SQL`
for a table keyed by `id` with columns `id, v`) for running it directly, e.g. over
`DeltaSink.dataset(ref, "append")` (or `DeltaReader.dataset`) registered as a view. A Delta
table given by its path is read through the sink's reader (`cdcengine.sink.delta.read`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from cdcengine.sink.columns import COMMITTED_AT, LSN, OP, PREFIX, SEQ, UNCHANGED

__all__ = ["SCD2_SQL", "as_of", "as_of_sql", "scd2", "scd2_sql"]

_ENGINE_PREFIX = PREFIX
# orders (lsn, seq) pairs in one HUGEINT: lsn and seq are both below 2^63
_POS = f"({LSN}::HUGEINT * 9223372036854775808 + {SEQ})"


def _q(name: str) -> str:
    """A DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def scd2_sql(columns: Sequence[str], key: Sequence[str], *, relation: str = "append") -> str:
    """DuckDB SQL giving the SCD2 versions of the append table registered as `relation`.

    `columns`: the data columns to output (keys included, engine columns left out); `key`: the
    key columns. Output columns: `columns`, then `valid_from_lsn`, `valid_from_seq`,
    `valid_from`, `valid_to_lsn`, `valid_to`, `is_deleted`; ordered by key and version.
    """
    keys = list(key)
    if not keys:
        raise ValueError("scd2 needs the key columns")
    data = list(columns)
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"key column(s) {missing} are not among the columns {data}")
    part = ", ".join(_q(k) for k in keys)
    carried: list[str] = []
    for c in data:
        if c in keys:
            carried.append(_q(c))
            continue
        # known here: an R/I/U that does not list it as unchanged TOAST; a D that carries it
        known = (f"CASE WHEN {OP} = 'D' THEN {_q(c)} IS NOT NULL ELSE NOT list_contains("
                 f"coalesce({UNCHANGED}, []::VARCHAR[]), {_lit(c)}) END")
        previous = (f"last_value(CASE WHEN {known} THEN struct_pack(v := {_q(c)}) END "
                    f"IGNORE NULLS) OVER (PARTITION BY {part} ORDER BY pos ROWS BETWEEN "
                    "UNBOUNDED PRECEDING AND 1 PRECEDING)")
        carried.append(f"CASE WHEN {known} THEN {_q(c)} ELSE ({previous}).v END AS {_q(c)}")
    out = ", ".join(f"c.{_q(c)}" for c in data)
    order = ", ".join(f"c.{_q(k)}" for k in keys)
    # identifiers are quoted (`_q`), the only literals are column names (`_lit`) and ints
    return f"""
WITH log AS (                -- every change in source order; pos orders (lsn, seq)
    SELECT *, {_POS} AS pos FROM {relation}
),
truncates AS (               -- each row learns where the next TRUNCATE after it is
    SELECT pos, min(CASE WHEN {OP} = 'T' THEN pos END) OVER (
        ORDER BY pos ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING) AS next_t
    FROM log
),
changes AS (                 -- row changes (no T), unresolved values carried from the key's past
    SELECT {", ".join(carried)},
           log.{LSN}, log.{SEQ}, log.{OP}, log.{COMMITTED_AT}, log.pos,
           lead(log.pos) OVER (PARTITION BY {part} ORDER BY log.pos) AS next_change
    FROM log
    WHERE {OP} <> 'T'
),
closed AS (                  -- a version ends at the key's next change or the next T
    SELECT c.*, CASE WHEN t.next_t IS NULL THEN c.next_change
                     WHEN c.next_change IS NULL THEN t.next_t
                     ELSE least(c.next_change, t.next_t) END AS end_pos
    FROM changes c JOIN truncates t USING (pos)
)
SELECT {out},
       c.{LSN} AS valid_from_lsn, c.{SEQ} AS valid_from_seq, c.{COMMITTED_AT} AS valid_from,
       e.{LSN} AS valid_to_lsn, e.{COMMITTED_AT} AS valid_to,
       c.{OP} = 'D' AS is_deleted
FROM closed c LEFT JOIN log e ON e.pos = c.end_pos
ORDER BY {order}, c.pos
""".strip()  # noqa: S608


def as_of_sql(
    columns: Sequence[str], key: Sequence[str], lsn: int, *, relation: str = "append"
) -> str:
    """DuckDB SQL giving the live rows as of `lsn` (see module docstring): `columns`, then
    `_cdc_lsn` and `_cdc_committed_at` of the change that produced each row."""
    if not isinstance(lsn, int) or isinstance(lsn, bool):
        raise ValueError(f"lsn must be an int, got {lsn!r}")
    out = ", ".join(_q(c) for c in columns)
    order = ", ".join(_q(k) for k in key)
    return f"""
WITH versions AS (
{scd2_sql(columns, key, relation=relation)}
)
SELECT {out}, valid_from_lsn AS {LSN}, valid_from AS {COMMITTED_AT}
FROM versions
WHERE valid_from_lsn <= {lsn} AND (valid_to_lsn IS NULL OR valid_to_lsn > {lsn})
  AND NOT is_deleted
ORDER BY {order}
""".strip()  # noqa: S608


SCD2_SQL = scd2_sql(["id", "v"], ["id"])
"""The SCD2 query for an append table registered as `append` with key `id` and data column `v`
(`scd2_sql` writes it for any columns)."""


def _as_source(append: Any) -> tuple[Any, list[str]]:
    """Something DuckDB can scan, and its column names."""
    if isinstance(append, str):
        from cdcengine.sink.delta.read import DeltaReader

        snapshot = DeltaReader().open_path(append)
        if snapshot is None:
            raise LookupError(f"no Delta table at {append}")
        append = snapshot
    if hasattr(append, "to_pyarrow_dataset"):  # a DeltaSnapshot or a deltalake.DeltaTable
        append = append.to_pyarrow_dataset()
    if isinstance(append, (pa.Table, pads.Dataset, pa.RecordBatchReader)):
        return append, list(append.schema.names)
    raise TypeError(
        "expected a pyarrow Table or Dataset, a deltalake DeltaTable or a Delta table path, "
        f"got {type(append).__name__}"
    )


def _run(append: Any, key: Sequence[str], build: Any) -> pa.Table:
    import duckdb

    source, names = _as_source(append)
    required = [LSN, SEQ, OP, COMMITTED_AT]
    missing = [c for c in [*required, *key] if c not in names]
    if missing:
        raise ValueError(f"not an append table: column(s) {missing} missing from {names}")
    columns = [n for n in names if not n.startswith(_ENGINE_PREFIX)]
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        if UNCHANGED not in names:  # a log without it: nothing was unresolved
            con.register("raw_append", source)
            con.execute(f"CREATE VIEW append AS SELECT *, NULL::VARCHAR[] AS {UNCHANGED} "  # noqa: S608
                        "FROM raw_append")
        else:
            con.register("append", source)
        result = con.sql(build(columns))
        assert result is not None
        return result.to_arrow_table()
    finally:
        con.close()


def scd2(append: Any, key: Sequence[str]) -> pa.Table:
    """The SCD2 versions of an append table (see module docstring and `scd2_sql`).

    `append`: a pyarrow Table or Dataset (e.g. `DeltaSink.dataset(ref, "append")`), a
    `DeltaSnapshot` (or a deltalake DeltaTable) or the path of the Delta append table.
    """
    return _run(append, key, lambda columns: scd2_sql(columns, key))


def as_of(append: Any, key: Sequence[str], lsn: int) -> pa.Table:
    """The table's live rows as of LSN `lsn`, replayed from its append table (see `as_of_sql`).

    At the latest LSN this reproduces the consolidated table's live rows.
    """
    return _run(append, key, lambda columns: as_of_sql(columns, key, lsn))

"""Pure Arrow transforms of one table's change batch, before it reaches a Delta table.

Input shape (built by the core's batcher): the table's data columns plus the engine columns
`_cdc_op` ('I', 'U', 'D'; 'R' snapshot read; 'T' truncate in append mode only), `_cdc_lsn`,
`_cdc_seq`, `_cdc_committed_at` and `_cdc_unchanged` (list of the columns whose value is an
unchanged TOAST value the source did not send; the data column holds a null placeholder there;
null when none). Rows are in WAL order. A key-changing update is already split into a 'D' of the
old key and an 'I' of the new one. A 'D' under the default replica identity carries only the key
columns: its other data columns are NOT the row's last values.

Two functions, both vectorised (one stable sort by key, then a forward fill per affected column
with Arrow compute: `cumulative_max`, `take`; no per-row Python, no numpy), both pure (no I/O,
no Delta):

- `fold_for_merge`: one row per key, the key's last change, with what the batch knows carried
  into it. This is what a Delta merge needs: delta-rs applies a source row per matching target row
  and INSERTS DUPLICATES when the source repeats a key in the not-matched branch.
- `append_rows`: every row kept (a change log), unchanged-TOAST placeholders and delete rows
  filled from earlier changes of the same key in the batch where known.

"Known" value of column `c` at a row: an I/U/R/T row knows `c` unless `c` is listed in its
`_cdc_unchanged`; a D row knows `c` only when it carries a non-null value (replica identity FULL,
or a key column). A row's resolved value of `c` is the value at the latest row of the same key, at
or before it in the batch, that knows `c`; when there is none the row keeps its own value and, if
it listed `c`, still lists it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine.names import is_engine_column

OP = "_cdc_op"
LSN = "_cdc_lsn"
SEQ = "_cdc_seq"
COMMITTED_AT = "_cdc_committed_at"
UNCHANGED = "_cdc_unchanged"
HAS_VALUES = "_cdc_has_values"

MERGE_OPS: frozenset[str] = frozenset({"I", "U", "D", "R"})
"""Operations a consolidated (merged) batch may hold; 'R' (snapshot read) upserts like 'I'."""

UNCHANGED_TYPE = pa.list_(pa.string())


def data_columns(batch: pa.Table | pa.Schema) -> list[str]:
    """The batch's source columns in batch order: every column without the `_cdc_` prefix."""
    names = batch.names if isinstance(batch, pa.Schema) else batch.column_names
    return [n for n in names if not is_engine_column(n)]


def unresolved_rows(batch: pa.Table) -> int:
    """Rows that still list an unchanged-TOAST column the batch could not resolve."""
    if UNCHANGED not in batch.column_names or batch.num_rows == 0:
        return 0
    lengths = pc.fill_null(pc.list_value_length(batch.column(UNCHANGED)), 0)
    return int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)


def fold_for_merge(batch: pa.Table, key: Sequence[str]) -> pa.Table:
    """One row per key: the key's LAST change in WAL order, with the batch's knowledge carried in.

    Guarantees on the result:
    - exactly one row per distinct key (null key parts compare equal), in the WAL order of
      those last changes; the schema is the input's, plus `_cdc_unchanged` when the input had
      none, plus `_cdc_has_values` (bool, last);
    - `_cdc_op`, `_cdc_lsn`, `_cdc_seq`, `_cdc_committed_at` are the last change's: a D
      followed by an I of the same key ends as that I (revived), an I/U followed by a D ends
      as the D;
    - an unchanged-TOAST column of the last change takes the value of the latest earlier
      I/U/R of the same key in the batch that knew it, and is then dropped from
      `_cdc_unchanged` (a list left empty becomes null); otherwise it stays listed and null;
    - a D that follows an I/U/R of its key in the batch carries the row's last values: its
      non-key data columns hold the last values the batch knew, its `_cdc_unchanged` lists
      the non-key columns the batch did not know, and `_cdc_has_values` is true. A merge
      then writes those values with the delete (a soft-deleted row keeps its LAST values, not
      the ones stored before this batch). A D with no earlier I/U/R of its key in the batch is
      passed as received with `_cdc_has_values` false: its data columns (the key only, under
      the default replica identity) say nothing about the row's values.
    - `_cdc_has_values` is true for every I/U/R row.

    Raises ValueError for a missing key or engine column, an empty key, or an operation other
    than I, U, D, R (a truncate is not a row change; the pipeline handles it separately).
    """
    keys = _check(batch, key, require_key=True)
    if batch.num_rows == 0:
        return _output_schema(batch, for_merge=True).empty_table()
    ops = batch.column(OP)
    bad = pc.invert(pc.fill_null(pc.is_in(ops, value_set=pa.array(sorted(MERGE_OPS))), False))
    if pc.any(bad).as_py():
        found = sorted({str(v) for v in pc.unique(pc.filter(ops, bad)).to_pylist()})
        raise ValueError(f"fold_for_merge: operations {found} cannot be merged (allowed: I U D R)")
    groups = _Groups.of(batch, keys)
    if groups.unique:
        has_values = pc.invert(_bool(pc.equal(batch.column(OP), "D")))
        return _with_merge_columns(batch, has_values)
    lasts = pc.filter(groups.order, groups.is_last_sorted)  # each key's last row
    return _resolve(batch, keys, groups, lasts.take(pc.sort_indices(lasts)), for_merge=True)


def append_rows(batch: pa.Table, key: Sequence[str] = ()) -> pa.Table:
    """Every row, in input order, with unchanged-TOAST and delete values filled where known.

    For each row, a listed unchanged-TOAST column takes the value of the latest earlier change
    of the same key in the batch that knew it (and leaves `_cdc_unchanged`; an emptied list
    becomes null); columns the batch cannot resolve stay listed with a null value. A D row's
    non-key data columns take the last values the batch knew for the key. With an empty `key`
    (a table without a replica identity key) rows are not related and nothing is filled.
    Never changes the number, order or schema of the rows.
    """
    keys = _check(batch, key, require_key=False)
    if batch.num_rows == 0 or not keys:
        return _normalise_unchanged(batch)
    groups = _Groups.of(batch, keys)
    if groups.unique:
        return _normalise_unchanged(batch)
    return _resolve(batch, keys, groups, groups.positions, for_merge=False)


# --- internals ---------------------------------------------------------------------------


def _check(batch: pa.Table, key: Sequence[str], *, require_key: bool) -> list[str]:
    keys = list(key)
    if require_key and not keys:
        raise ValueError("fold_for_merge needs the key columns (the table's replica identity)")
    missing = [k for k in keys if k not in batch.column_names]
    if OP not in batch.column_names:
        missing.append(OP)
    if missing:
        raise ValueError(f"change batch lacks column(s) {missing}; has {batch.column_names}")
    return keys


def _normalise_unchanged(batch: pa.Table) -> pa.Table:
    """An empty `_cdc_unchanged` list becomes null (one spelling for "nothing unresolved")."""
    if UNCHANGED not in batch.column_names or batch.num_rows == 0:
        return batch
    col = batch.column(UNCHANGED)
    empty = pc.fill_null(pc.equal(pc.list_value_length(col), 0), False)
    if not pc.any(empty).as_py():
        return batch
    fixed = pc.if_else(empty, pa.scalar(None, type=col.type), col)
    return batch.set_column(batch.schema.get_field_index(UNCHANGED), UNCHANGED, fixed)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _bool(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return _array(pc.fill_null(values, False))


def _all_true(n: int) -> pa.Array:
    return pc.fill_null(pa.nulls(n, type=pa.bool_()), True)


@dataclass(frozen=True, slots=True)
class _Groups:
    """Rows grouped by key through one stable sort (WAL order kept inside a group).

    "Sorted" arrays are indexed by position in key order; `order` maps that position to the
    original row index and `inverse` maps back.
    """

    positions: pa.Array  # 0..n-1 (int64)
    order: pa.Array  # sorted position -> original row index (int64)
    inverse: pa.Array  # original row index -> sorted position (int64)
    start_of: pa.Array  # sorted position -> sorted position of its group's first row
    is_last_sorted: pa.Array  # sorted position is its group's last row (bool)
    unique: bool

    @classmethod
    def of(cls, batch: pa.Table, keys: list[str]) -> _Groups:
        n = batch.num_rows
        order = _array(
            pc.sort_indices(batch.select(keys), sort_keys=[(k, "ascending") for k in keys])
        ).cast(pa.int64())
        differs = pa.nulls(max(n - 1, 0), type=pa.bool_()).fill_null(False)
        for k in keys:
            col = _array(batch.column(k)).take(order)
            a, b = col.slice(1), col.slice(0, n - 1)
            neq = pc.fill_null(pc.not_equal(a, b), pc.not_equal(pc.is_null(a), pc.is_null(b)))
            differs = pc.or_(differs, neq)
        starts = pa.concat_arrays([pa.array([True]), _array(differs)])
        start_positions = pc.indices_nonzero(starts).cast(pa.int64())
        group_id = pc.subtract(pc.cumulative_sum(starts.cast(pa.int64())), 1)
        return cls(
            positions=pc.indices_nonzero(_all_true(n)).cast(pa.int64()),
            order=order,
            inverse=pc.inverse_permutation(order).cast(pa.int64()),
            start_of=start_positions.take(group_id),
            is_last_sorted=pa.concat_arrays([starts.slice(1), pa.array([True])]),
            unique=len(start_positions) == n,
        )


def _unchanged_masks(batch: pa.Table, positions: pa.Array) -> dict[str, pa.Array]:
    """Column name -> boolean per row (original order): the row lists it in `_cdc_unchanged`."""
    if UNCHANGED not in batch.column_names:
        return {}
    lists = _array(batch.column(UNCHANGED))
    flat = pc.list_flatten(lists)
    if len(flat) == 0:
        return {}
    parents = pc.list_parent_indices(lists).cast(pa.int64())
    masks: dict[str, pa.Array] = {}
    for name in pc.unique(flat).to_pylist():
        if name is None:
            continue
        rows = pc.filter(parents, _bool(pc.equal(flat, name)))
        masks[str(name)] = _bool(pc.is_in(positions, value_set=rows))
    return masks


def _resolve(
    batch: pa.Table, keys: list[str], groups: _Groups, rows: pa.Array, *, for_merge: bool
) -> pa.Table:
    """The batch's `rows` (original indices, output order) with known values carried forward.

    `for_merge`: a D row that follows an I/U/R of its key lists the non-key columns the batch
    did not know in `_cdc_unchanged`, and `_cdc_has_values` is added (see `fold_for_merge`).
    """
    order, inverse, start_of, positions = (
        groups.order,
        groups.inverse,
        groups.start_of,
        groups.positions,
    )
    n = batch.num_rows
    minus_one = pa.scalar(-1, type=pa.int64())
    is_delete = _bool(pc.equal(batch.column(OP), "D"))
    # an I/U/R of the same key at or before the row (for a D: strictly before)
    upsert_sorted = pc.invert(is_delete).take(order)
    latest_upsert = pc.cumulative_max(pc.if_else(upsert_sorted, positions, minus_one))
    has_prior = pc.greater_equal(latest_upsert, start_of).take(inverse)
    carried_delete = _bool(pc.and_(is_delete, has_prior))
    carry_deletes = bool(pc.any(carried_delete).as_py())

    masks = _unchanged_masks(batch, positions)
    key_set = set(keys)
    data = [c for c in data_columns(batch) if c not in key_set]
    carry = [c for c in data if carry_deletes or c in masks]

    columns: dict[str, pa.Array] = {
        name: _array(batch.column(name)).take(rows) for name in batch.column_names
    }
    no = pa.nulls(n, type=pa.bool_()).fill_null(False)
    listed: dict[str, pa.Array] = {c: m.take(rows) for c, m in masks.items()}
    changed_lists = False
    for c in carry:
        unchanged = masks.get(c)
        known = _all_true(n) if unchanged is None else pc.invert(unchanged)
        if carry_deletes:
            valid = pc.is_valid(batch.column(c))
            known = _bool(pc.and_(known, pc.or_(pc.invert(is_delete), valid)))
        known_sorted = known.take(order)
        latest = pc.cumulative_max(pc.if_else(known_sorted, positions, minus_one))
        found_sorted = pc.greater_equal(latest, start_of)
        source_sorted = pc.if_else(found_sorted, latest, positions)
        source = order.take(source_sorted).take(inverse)  # per original row: row to copy from
        picked = source.take(rows)
        if not picked.equals(rows):
            columns[c] = _array(batch.column(c)).take(picked)
        unknown = pc.invert(found_sorted.take(inverse))
        still = pc.and_(no if unchanged is None else unchanged, unknown)
        if for_merge and carry_deletes:
            still = pc.if_else(carried_delete, unknown, still)
        still = _bool(still).take(rows)
        before = listed.get(c)
        if not still.equals(no.take(rows) if before is None else before):
            listed[c] = still
            changed_lists = True

    if changed_lists:
        unchanged_type = (
            batch.schema.field(UNCHANGED).type
            if UNCHANGED in batch.column_names
            else UNCHANGED_TYPE
        )
        columns[UNCHANGED] = _build_unchanged(
            listed, column_order=batch.column_names, type_=unchanged_type
        )
    out = pa.table(columns)
    if for_merge:
        has_values = pc.or_(pc.invert(is_delete), has_prior).take(rows)
        out = _with_merge_columns(out, has_values)
    return _normalise_unchanged(out.cast(_output_schema(batch, for_merge=for_merge)))


def _output_schema(batch: pa.Table, *, for_merge: bool) -> pa.Schema:
    schema = batch.schema
    if not for_merge:
        return schema
    if UNCHANGED not in schema.names:
        schema = schema.append(pa.field(UNCHANGED, UNCHANGED_TYPE))
    return schema.append(pa.field(HAS_VALUES, pa.bool_(), nullable=False))


def _with_merge_columns(table: pa.Table, has_values: pa.Array) -> pa.Table:
    if UNCHANGED not in table.column_names:
        table = table.append_column(UNCHANGED, pa.nulls(table.num_rows, type=UNCHANGED_TYPE))
    return table.append_column(pa.field(HAS_VALUES, pa.bool_(), nullable=False), has_values)


def _build_unchanged(
    still: dict[str, pa.Array], *, column_order: Sequence[str], type_: pa.DataType
) -> pa.Array:
    """A list<string> column from per-name row masks (names in table column order; [] -> null)."""
    rank = {name: i for i, name in enumerate(column_order)}
    names = sorted(still, key=lambda c: (rank.get(c, len(rank)), c))
    n_rows = len(next(iter(still.values())))
    counts = pa.nulls(n_rows, type=pa.int32()).fill_null(0)
    pairs_row: list[pa.Array] = []
    pairs_name: list[pa.Array] = []
    for i, name in enumerate(names):
        mask = still[name]
        counts = pc.add(counts, mask.cast(pa.int32()))
        hit = pc.indices_nonzero(mask).cast(pa.int64())
        pairs_row.append(hit)
        pairs_name.append(pa.nulls(len(hit), type=pa.int32()).fill_null(i))
    pairs = pa.table({"row": pa.concat_arrays(pairs_row), "name": pa.concat_arrays(pairs_name)})
    pairs = pairs.sort_by([("row", "ascending"), ("name", "ascending")])
    values = pa.array(names, type=pa.string()).take(_array(pairs.column("name")))
    offsets = pa.concat_arrays(
        [pa.array([0], type=pa.int32()), _array(pc.cumulative_sum(counts)).cast(pa.int32())]
    )
    lists = pa.ListArray.from_arrays(offsets, values, mask=_bool(pc.equal(counts, 0)))
    return lists.cast(type_)

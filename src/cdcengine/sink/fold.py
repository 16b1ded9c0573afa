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
  filled from earlier changes of the same key in the batch where known, else from `prior`
  values (the stored consolidated rows, `append_lookup_keys` says which keys to look up); the
  insert half of a key-changing update takes its unchanged-TOAST values from the old key.

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
from cdcengine.sink.columns import COMMITTED_AT, HAS_VALUES, LSN, OP, SEQ, UNCHANGED

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


def rows_after(batch: pa.Table, applied: int | None) -> pa.Table:
    """The rows with `_cdc_lsn` above `applied` (all of them when None or 0): what a Delta
    table whose applied version is `applied` still lacks. After a restart batches are cut
    differently, so a replayed batch can straddle the applied version."""
    if not applied or applied <= 0 or batch.num_rows == 0:
        return batch
    # the usual case is a batch wholly above: no filter, which would copy every column (a
    # large transaction's batch twice over in memory, for nothing)
    if pc.min(batch[LSN]).as_py() > applied:
        return batch
    return batch.filter(pc.greater(batch[LSN], pa.scalar(applied, pa.int64())))


def newest_commit_us(batch: pa.Table) -> int | None:
    """The batch's newest source commit time (µs since the epoch), None when it has no rows."""
    if batch.num_rows == 0 or COMMITTED_AT not in batch.column_names:
        return None
    found = pc.max(batch[COMMITTED_AT].cast(pa.int64())).as_py()
    return None if found is None else int(found)


def transaction_commits(batch: pa.Table) -> tuple[tuple[int, int], ...]:
    """(end LSN, commit time in µs since the epoch) of each source transaction with rows in the
    batch: every row of a transaction carries the same two values."""
    if batch.num_rows == 0 or COMMITTED_AT not in batch.column_names:
        return ()
    pairs = pa.table({"lsn": batch[LSN], "at": batch[COMMITTED_AT].cast(pa.int64())})
    found = pairs.group_by("lsn").aggregate([("at", "min")])
    return tuple(zip(found["lsn"].to_pylist(), found["at_min"].to_pylist(), strict=True))


def fill_before(batch: pa.Table, column: str, value: pa.Scalar, upto: int) -> pa.Table:
    """`column` set to `value` where it is null in the rows with `_cdc_lsn <= upto` (rows that
    existed before a source `ADD COLUMN … DEFAULT <constant>`, which wrote no WAL for them)."""
    col = batch.column(column)
    fill = pa.scalar(value.as_py(), col.type)
    old = pc.less_equal(batch[LSN], pa.scalar(upto, pa.int64()))
    mask = pc.and_(old, pc.is_null(col))
    if not pc.any(mask).as_py():
        return batch
    filled = pc.if_else(mask, fill, col)
    return batch.set_column(batch.schema.get_field_index(column), column, filled)


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


def append_rows(
    batch: pa.Table, key: Sequence[str] = (), *, prior: pa.Table | None = None
) -> pa.Table:
    """Every row, in input order, with unchanged-TOAST and delete values filled where known.

    For each row, a listed unchanged-TOAST column takes the value of the latest earlier change
    of the same key in the batch that knew it (and leaves `_cdc_unchanged`; an emptied list
    becomes null); columns the batch cannot resolve stay listed with a null value. A D row's
    non-key data columns take the last values the batch knew for the key. With an empty `key`
    (a table without a replica identity key) rows are not related and nothing is filled.

    `prior`: the last known values of some keys as of BEFORE the batch (e.g. the stored
    consolidated rows; at most one row per key; the key columns plus any subset of the data
    columns). They count as a change preceding the batch that knew every column it holds, so
    what the batch itself cannot resolve is filled from them; a data column `prior` lacks
    stays unknown.

    Never changes the number or order of the rows, nor the schema (except that `_cdc_unchanged`
    is appended, all null, when `prior` is given and the batch had none).
    """
    keys = _check(batch, key, require_key=False)
    if batch.num_rows == 0 or not keys:
        return _normalise_unchanged(batch)
    if prior is not None and prior.num_rows and UNCHANGED not in batch.column_names:
        batch = batch.append_column(
            pa.field(UNCHANGED, UNCHANGED_TYPE), pa.nulls(batch.num_rows, UNCHANGED_TYPE)
        )
    # A key-changing UPDATE arrives as a D of the old key and an I of the new one; only such
    # an I can list unchanged-TOAST columns, and their values are the OLD key's: resolve those
    # first with the I counted as a change of the old key, then everything as usual.
    old_keyed, pairs = _key_change_view(batch, keys)
    if pairs is not None:
        first = _append_resolve(old_keyed, keys, prior)
        for name in [*data_columns(batch), UNCHANGED]:
            if name in keys:
                continue
            index = batch.schema.get_field_index(name)
            merged = pc.if_else(pairs, first.column(name), batch.column(name))
            batch = batch.set_column(index, batch.schema.field(index), merged)
    return _append_resolve(batch, keys, prior)


def _append_resolve(batch: pa.Table, keys: list[str], prior: pa.Table | None) -> pa.Table:
    if prior is not None and prior.num_rows:
        head = _prior_rows(batch, keys, prior)
        joined = pa.concat_tables([head, batch])
        groups = _Groups.of(joined, keys)
        out = _resolve(joined, keys, groups, groups.positions, for_merge=False)
        return out.slice(head.num_rows)
    groups = _Groups.of(batch, keys)
    if groups.unique:
        return _normalise_unchanged(batch)
    return _resolve(batch, keys, groups, groups.positions, for_merge=False)


def _key_change_view(batch: pa.Table, keys: list[str]) -> tuple[pa.Table, pa.Array | None]:
    """The batch with the key of every key-change insert (an I listing unchanged-TOAST columns
    right after a D of the same transaction: `_cdc_lsn` equal, `_cdc_seq` one more) replaced
    by the old key of that D, and the mask of those rows (None when there is none)."""
    n = batch.num_rows
    if UNCHANGED not in batch.column_names or SEQ not in batch.column_names or n < 2:
        return batch, None
    ops = _array(batch.column(OP))
    listed = _bool(pc.greater(pc.list_value_length(batch.column(UNCHANGED)), 0))
    inserts = _bool(pc.and_(pc.equal(ops, "I"), listed))
    if not pc.any(inserts).as_py():
        return batch, None
    lsn, seq = _array(batch.column(LSN)), _array(batch.column(SEQ))
    after_delete = _bool(pc.and_(
        pc.and_(pc.equal(ops.slice(0, n - 1), "D"), pc.equal(lsn.slice(1), lsn.slice(0, n - 1))),
        pc.equal(seq.slice(1), pc.add(seq.slice(0, n - 1), 1)),
    ))
    pairs = _bool(pc.and_(inserts, pa.concat_arrays([pa.array([False]), after_delete])))
    if not pc.any(pairs).as_py():
        return batch, None
    positions = pc.indices_nonzero(_all_true(n)).cast(pa.int64())
    source = pc.if_else(pairs, pc.subtract(positions, 1), positions)
    view = batch
    for k in keys:
        index = view.schema.get_field_index(k)
        view = view.set_column(index, view.schema.field(index), _array(view.column(k)).take(source))
    return view, pairs


def has_key_change_with_unchanged(batch: pa.Table, key: Sequence[str]) -> bool:
    """Whether the insert half of a key-changing update lists an unchanged-TOAST column (its
    value is the old key's, which the batch may not know)."""
    if UNCHANGED not in batch.column_names or not key or not unresolved_rows(batch):
        return False
    _, pairs = _key_change_view(batch, list(key))
    if pairs is None:
        return False
    lengths = pc.fill_null(pc.list_value_length(batch.column(UNCHANGED)), 0)
    return bool(pc.any(pc.and_(pairs, pc.greater(lengths, 0))).as_py())


def append_lookup_keys(batch: pa.Table, key: Sequence[str]) -> pa.Table:
    """The keys whose last known values the batch alone cannot supply, for a lookup elsewhere.

    A key is listed when one of its rows is a D with no earlier I/U/R of the key in the batch
    (under the default replica identity it carries only the key), or lists an unchanged-TOAST
    column that no earlier change of the key in the batch knew. Result: the key columns plus
    `_cdc_lsn`, the LSN of the key's FIRST change in the batch (values stored elsewhere are
    "before the batch" only when older than it); one row per key. 'T' rows are ignored. The
    insert half of a key-changing update that lists unchanged-TOAST columns the batch cannot
    resolve asks for its OLD key (whose values those are).
    """
    keys = _check(batch, key, require_key=True)
    schema = pa.schema([batch.schema.field(k) for k in keys] + [pa.field(LSN, pa.int64())])
    if batch.num_rows == 0:
        return schema.empty_table()
    ops = batch.column(OP)
    rows = batch.filter(_bool(pc.not_equal(ops, "T")))
    if rows.num_rows == 0:
        return schema.empty_table()
    need_toast = pa.nulls(rows.num_rows, pa.bool_()).fill_null(False)
    if UNCHANGED in rows.column_names and unresolved_rows(rows):
        resolved = append_rows(rows, keys)
        lengths = pc.fill_null(pc.list_value_length(resolved.column(UNCHANGED)), 0)
        need_toast = _bool(pc.greater(lengths, 0))
    rows, _ = _key_change_view(rows, keys)  # a key change's unresolved insert needs the old key
    n = rows.num_rows
    index = pc.indices_nonzero(_all_true(n)).cast(pa.int64())
    is_delete = _bool(pc.equal(rows.column(OP), "D"))
    null_i64 = pa.scalar(None, pa.int64())
    work = pa.table(
        {
            **{k: rows.column(k) for k in keys},
            "lsn": rows.column(LSN),
            "first_delete": pc.if_else(is_delete, index, null_i64),
            "first_upsert": pc.if_else(is_delete, null_i64, index),
            "toast": need_toast,
        }
    )
    agg = work.group_by(keys, use_threads=False).aggregate(
        [("lsn", "min"), ("first_delete", "min"), ("first_upsert", "min"), ("toast", "any")]
    )
    first_d, first_u = agg.column("first_delete_min"), agg.column("first_upsert_min")
    earlier = _bool(pc.less(first_d, first_u))  # null (no upsert, or no delete) -> False
    bare_delete = pc.and_(pc.is_valid(first_d), pc.or_(pc.is_null(first_u), earlier))
    wanted = agg.filter(_bool(pc.or_(bare_delete, _bool(agg.column("toast_any")))))
    return pa.table(
        {**{k: wanted.column(k) for k in keys}, LSN: wanted.column("lsn_min")}
    ).cast(schema)


# --- internals ---------------------------------------------------------------------------


def key_type_supported(t: pa.DataType) -> bool:
    """Can rows be keyed on a column of Arrow type `t`? Rows of a batch are grouped by key
    (Arrow hash kernels), looked up by key in the stored table and matched by key in the Delta
    MERGE; nested values (lists: PostgreSQL arrays; structs, maps) support none of that, so a
    key holding one must be refused before any row is captured (the prerequisite checks use
    this), never accepted and then stopped at the first change."""
    return not pa.types.is_nested(t)


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


def _prior_rows(batch: pa.Table, keys: list[str], prior: pa.Table) -> pa.Table:
    """`prior` laid out as batch rows: an 'U' that knew the columns `prior` holds (a column it
    lacks, or cannot cast to the batch's type, is listed unchanged); one row per key."""
    missing = [k for k in keys if k not in prior.column_names]
    if missing:
        raise ValueError(f"prior values lack key column(s) {missing}")
    m = prior.num_rows
    unknown: list[str] = []
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    for f in batch.schema:
        if f.name == OP:
            columns[f.name] = pa.array(["U"] * m, f.type)
        elif f.name in (LSN, SEQ):
            columns[f.name] = pa.nulls(m, f.type).fill_null(-1)
        elif f.name == UNCHANGED:
            continue
        elif is_engine_column(f.name) or f.name not in prior.column_names:
            columns[f.name] = pa.nulls(m, f.type)
            if not is_engine_column(f.name):
                unknown.append(f.name)
        else:
            try:
                columns[f.name] = prior.column(f.name).cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                if f.name in keys:
                    raise
                columns[f.name] = pa.nulls(m, f.type)
                unknown.append(f.name)
    type_ = batch.schema.field(UNCHANGED).type
    columns[UNCHANGED] = pa.array([unknown or None] * m, type_)
    return pa.table(columns, schema=batch.schema)


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

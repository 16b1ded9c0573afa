"""Arrow types and schemas of the stored tables: the engine columns' fields, the type Delta
stores for an Arrow type (`_normalise`), whether a type change is a widening (`widens`), and
laying out a batch as a table's rows (`_conform`, `_to_target`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, Field

from cdcengine.names import TableRef, is_engine_column
from cdcengine.sink.base import SinkSchemaError, TableKind
from cdcengine.sink.columns import COMMITTED_AT, DELETED, DELETED_AT, LSN, OP, SEQ, UNCHANGED
from cdcengine.sink.fold import UNCHANGED_TYPE, data_columns

TIMESTAMP_UTC = pa.timestamp("us", tz="UTC")

CONSOLIDATED_ENGINE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(LSN, pa.int64()),
    pa.field(COMMITTED_AT, TIMESTAMP_UTC),
    pa.field(DELETED, pa.bool_()),
    pa.field(DELETED_AT, TIMESTAMP_UTC),
)
"""Engine columns of a consolidated table, after the data columns (SPEC §5)."""

APPEND_ENGINE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(LSN, pa.int64()),
    pa.field(SEQ, pa.int64()),
    pa.field(OP, pa.string()),
    pa.field(COMMITTED_AT, TIMESTAMP_UTC),
    pa.field(UNCHANGED, UNCHANGED_TYPE),
)
"""Engine columns of an append (change-log) table, after the data columns (SPEC §5)."""

_ENGINE_COLUMNS = {
    TableKind.CONSOLIDATED: (LSN, COMMITTED_AT, DELETED, DELETED_AT),
    TableKind.APPEND: (LSN, SEQ, OP, COMMITTED_AT),
}
"""The engine columns every stored table of a kind has (a table without them is not ours;
`_cdc_unchanged` is not required of an append table)."""


def _normalise(type_: pa.DataType) -> pa.DataType:
    """The Arrow type Delta stores for `type_` (what reading the table back gives)."""
    if pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return pa.string()
    if (
        pa.types.is_large_binary(type_)
        or pa.types.is_binary_view(type_)
        or pa.types.is_fixed_size_binary(type_)
    ):
        return pa.binary()
    if pa.types.is_dictionary(type_):
        return _normalise(type_.value_type)
    if pa.types.is_timestamp(type_):
        return pa.timestamp("us", tz="UTC" if type_.tz is not None else None)
    if (
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
        or pa.types.is_list_view(type_)
        or pa.types.is_large_list_view(type_)
    ):
        return pa.list_(pa.field("element", _normalise(type_.value_type), True))
    if pa.types.is_struct(type_):
        return pa.struct([pa.field(f.name, _normalise(f.type), True) for f in type_.fields])
    if pa.types.is_map(type_):
        return pa.map_(_normalise(type_.key_type), _normalise(type_.item_type))
    return type_


def _check_storable(schema: pa.Schema, ref: TableRef) -> None:
    for f in schema:
        try:
            Field.from_arrow(pa.field(f.name, _normalise(f.type), True))
        except Exception as exc:  # delta-rs raises a bare Exception for an unmappable type
            raise SinkSchemaError(
                f"{ref}: column {f.name!r} has type {f.type}, which Delta cannot store",
                table=ref.qualified,
                column=f.name,
                incoming=str(f.type),
            ) from exc


def _arrow_schema(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def _consolidated_schema(batch: pa.Table) -> pa.Schema:
    fields = [
        pa.field(c, _normalise(batch.schema.field(c).type), True) for c in data_columns(batch)
    ]
    return pa.schema([*fields, *CONSOLIDATED_ENGINE_FIELDS])


def _append_schema(batch: pa.Table) -> pa.Schema:
    fields = [
        pa.field(c, _normalise(batch.schema.field(c).type), True) for c in data_columns(batch)
    ]
    return pa.schema([*fields, *APPEND_ENGINE_FIELDS])


def widens(stored: pa.DataType, incoming: pa.DataType) -> bool:
    """Whether every value of `stored` is exactly representable in `incoming` (PostgreSQL's
    widening ALTERs: smaller → larger integers, float4 → float8, integers → float8 or a numeric
    wide enough, a numeric with more integer digits and scale, integers/numerics → text)."""
    int_digits = {8: 3, 16: 5, 32: 10, 64: 19}
    if pa.types.is_signed_integer(stored):
        if pa.types.is_signed_integer(incoming):
            return incoming.bit_width >= stored.bit_width
        if pa.types.is_float64(incoming):
            return stored.bit_width <= 32
        if pa.types.is_decimal(incoming):
            return incoming.precision - incoming.scale >= int_digits[stored.bit_width]
        return pa.types.is_string(incoming)
    if pa.types.is_float32(stored):
        return pa.types.is_float64(incoming)
    if pa.types.is_decimal(stored):
        if pa.types.is_decimal(incoming):
            return (incoming.scale >= stored.scale
                    and incoming.precision - incoming.scale >= stored.precision - stored.scale)
        return pa.types.is_string(incoming)
    return False


def _with_missing_as_null(batch: pa.Table, target: pa.Schema) -> pa.Table:
    for f in target:
        if not is_engine_column(f.name) and f.name not in batch.column_names:
            batch = batch.append_column(f, pa.nulls(batch.num_rows, f.type))
    return batch


def _conform(batch: pa.Table, target: pa.Schema, ref: TableRef) -> pa.Table:
    """Cast the batch's data columns to the stored types; a real type change is an error."""
    for name in data_columns(batch):
        index = target.get_field_index(name)
        if index < 0:
            continue
        stored = target.field(index).type
        incoming = batch.schema.field(name).type
        if incoming == stored:
            continue
        if _normalise(incoming) != _normalise(stored):
            raise SinkSchemaError(
                f"{ref}: column {name!r} is stored as {stored} but the source now sends "
                f"{incoming}, which is not a widening; the table must be re-snapshotted",
                table=ref.qualified,
                column=name,
                stored=str(stored),
                incoming=str(incoming),
            )
        position = batch.schema.get_field_index(name)
        batch = batch.set_column(position, name, batch.column(name).cast(stored))
    return batch


def _consolidated_rows(upserts: pa.Table) -> pa.Table:
    """Upsert rows as consolidated-table rows (data columns + engine columns, not deleted)."""
    n = upserts.num_rows
    columns = {c: upserts.column(c) for c in data_columns(upserts)}
    columns[LSN] = upserts.column(LSN)
    columns[COMMITTED_AT] = upserts.column(COMMITTED_AT)
    columns[DELETED] = pa.nulls(n, pa.bool_()).fill_null(False)
    columns[DELETED_AT] = pa.nulls(n, TIMESTAMP_UTC)
    return pa.table(columns)


def _to_target(rows: pa.Table, target: pa.Schema) -> pa.Table:
    """Rows laid out exactly as the table: its column order, nulls for columns rows lack."""
    n = rows.num_rows
    columns = []
    for f in target:
        if f.name in rows.column_names:
            col = rows.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(columns, schema=target)


_MAX_VERSION = (1 << 63) - 1


def _check_batch(batch: pa.Table, version: int, *, require: Sequence[str]) -> pa.Table:
    """Validate a change batch and coerce the engine columns' types; ValueError on a bug."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"version must be an int LSN, got {version!r}")
    if not 0 <= version <= _MAX_VERSION:
        raise ValueError(f"version {version} is outside 0..2^63-1")
    missing = [c for c in require if c not in batch.column_names]
    if missing:
        raise ValueError(f"change batch lacks engine column(s) {missing}")
    wanted = {
        LSN: pa.int64(),
        SEQ: pa.int64(),
        OP: pa.string(),
        COMMITTED_AT: TIMESTAMP_UTC,
        UNCHANGED: UNCHANGED_TYPE,
    }
    for name, type_ in wanted.items():
        if name in batch.column_names and batch.schema.field(name).type != type_:
            index = batch.schema.get_field_index(name)
            batch = batch.set_column(index, name, batch.column(name).cast(type_))
    if batch.num_rows:
        top = pc.max(batch.column(LSN)).as_py()
        if top is not None and top > version:
            raise ValueError(f"batch holds {LSN} {top} above its version {version}")
    return batch

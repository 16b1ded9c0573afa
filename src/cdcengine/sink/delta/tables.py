"""The sink's Delta tables: names and app ids, handles (loaded, cached), creation with the
engine's layout, the layout check, schema evolution (new columns, widened types, a column
default backfilled), and turning Delta failures into the sink's errors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import structlog
from deltalake import CommitProperties, DeltaTable, Field, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError

from cdcengine.lsn import format_lsn
from cdcengine.names import TableRef, is_engine_column
from cdcengine.sink.base import SinkSchemaError, SinkWriteError, TableKind
from cdcengine.sink.columns import COMMITTED_AT, LSN
from cdcengine.sink.delta.read import error_detail, load_table
from cdcengine.sink.delta.schema import (
    APPEND_ENGINE_FIELDS,
    CONSOLIDATED_ENGINE_FIELDS,
    _arrow_schema,
    _check_storable,
    _normalise,
    widens,
)
from cdcengine.sink.delta.spool import _materialised, _write_delta
from cdcengine.sink.delta.sql import _SOURCE_ALIAS, _TARGET_ALIAS, quote_ident
from cdcengine.sink.destination import local_path
from cdcengine.sink.fold import data_columns

if TYPE_CHECKING:
    from cdcengine.sink.delta.maintain import DeltaMaintenance
    from cdcengine.sink.delta.read import DeltaReader

log = structlog.get_logger("cdcengine.sink")


LAYOUT_PROPERTY = "cdcengine.layout"
SNAPSHOT_PLAN_PROPERTY = "cdcengine.snapshot.plan"
LAYOUT_VERSION = "1"


class DeltaTables:
    """What every job of `DeltaSink` shares: its configuration, its cached table handles and the
    table-level operations (see the module docstring). `DeltaSink` sets the attributes."""

    destination: str
    source: str
    maintenance: DeltaMaintenance
    target_file_size: int | None
    spill_bytes: int
    spill_dir: str | None
    partition_by: dict[TableRef, tuple[str, ...]]
    reader: DeltaReader
    _storage_options: dict[str, str] | None
    _tables: dict[str, DeltaTable]
    _checkpointed_at: dict[str, int]
    _partition_warned: set[str]

    # --- names -------------------------------------------------------------------------

    def path(self, ref: TableRef, kind: TableKind | str) -> str:
        """`D/schema/table` or `D/schema/table_cdc` (SPEC §5)."""
        return self.reader.path(ref, kind)

    def app_id(self, ref: TableRef, kind: TableKind | str) -> str:
        """`cdcengine/<source>/<schema.table>/<kind>`: the txn app id of one Delta table."""
        return f"cdcengine/{self.source}/{ref.qualified}/{TableKind(kind)}"

    def data_columns(self, ref: TableRef, kind: TableKind | str) -> tuple[str, ...] | None:
        """The stored data columns (engine columns left out); None when the table is missing.
        Uses the cached handle: call it from the table's writer thread."""
        dt = self._cached(self.path(ref, kind))
        if dt is None:
            return None
        return tuple(n for n in _arrow_schema(dt).names if not is_engine_column(n))

    def backfill_column(
        self, ref: TableRef, kind: TableKind | str, column: str, value: pa.Scalar, *,
        upto_lsn: int,
    ) -> int:
        """Set `column` to `value` in every stored row with `_cdc_lsn <= upto_lsn` where it is
        null: the value a source `ADD COLUMN … DEFAULT <constant>` gave existing rows without
        writing WAL. The column is added first when the table lacks it.

        ONE commit carrying the table's CURRENT txn version (it applies no source change), so
        it is idempotent: a replay finds nothing null left (no commit at all). Returns the rows
        updated. A missing table is a no-op."""
        kind = TableKind(kind)
        path = self._writable_path(ref, kind)
        with self._delta_errors(path, ref, kind):
            dt = self._cached(path)
            if dt is None:
                return 0
            typed = pa.table({column: pa.array([value.as_py()], value.type)})
            self._add_new_columns(dt, ref, typed, kind)
            target = _arrow_schema(dt)
            stored = target.field(column).type
            fill = typed.column(column).cast(stored)
            applied = self._txn_version(dt, ref, kind)
            props = CommitProperties(
                app_transactions=[Transaction(self.app_id(ref, kind), applied)]
                if applied is not None else None,
                custom_metadata={"cdcengine.operation": "backfill_default",
                                 "cdcengine.column": column})
            col = f"{_TARGET_ALIAS}.{quote_ident(column)}"
            metrics: dict[str, Any] = dt.merge(
                _materialised(pa.table({"__cdc_fill": fill})), "true",
                source_alias=_SOURCE_ALIAS,
                target_alias=_TARGET_ALIAS, streamed_exec=False, commit_properties=props,
            ).when_matched_update(
                {quote_ident(column): f"{_SOURCE_ALIAS}.__cdc_fill"},
                predicate=f"{_TARGET_ALIAS}.{LSN} <= {int(upto_lsn)} AND {col} IS NULL",
            ).execute()
        updated = int(metrics.get("num_target_rows_updated", 0))
        log.info("delta_column_backfilled", table=ref.qualified, kind=str(kind), column=column,
                 rows=updated, upto_lsn=format_lsn(upto_lsn))
        return updated

    # --- internals ---------------------------------------------------------------------

    @contextmanager
    def _delta_errors(self, path: str, ref: TableRef, kind: TableKind) -> Iterator[None]:
        """Delta/IO failures as `SinkWriteError` (retryable), values that do not fit the stored
        types as `SinkSchemaError`; the cached table handle is dropped on any failure."""
        try:
            yield
        except (DeltaError, OSError) as exc:
            self._tables.pop(path, None)
            detail = _first_line(exc, self._storage_options)
            # the destination's own words say what is wrong (permission denied, no space, a
            # read-only file system); credentials are scrubbed from them
            raise SinkWriteError(
                f"Delta {kind} table of {ref} failed ({type(exc).__name__}"
                f"{': ' + detail if detail else ''})",
                table_specific=_table_specific(exc), detail=detail,
            ) from exc
        except pa.ArrowException as exc:
            self._tables.pop(path, None)
            raise SinkSchemaError(
                f"the batch for the Delta {kind} table of {ref} does not fit its schema "
                f"({type(exc).__name__})",
                table=ref.qualified,
            ) from exc
        except BaseException:
            self._tables.pop(path, None)
            raise

    def _writable_path(self, ref: TableRef, kind: TableKind) -> str:
        """The table's path, refused when deltalake 1.6.6 would corrupt it.

        delta-rs percent-decodes a local path (and decodes a `file://` URL twice) when it reads
        the log back, but writes the commit under the literal path: a path holding `%` gets a
        commit it can never read. Table segments are escaped with `~XX`, so only a destination
        that itself contains `%` gets here; it is refused before anything is written rather
        than failing on every retry.
        """
        path = self.path(ref, kind)
        if "%" in path:
            raise SinkWriteError(
                f"the Delta path of {ref} ({path}) contains '%', which deltalake 1.6.6 "
                "cannot read back",
                retryable=False,
                fix="Use a destination path without '%'.",
            )
        return path

    def _load(self, path: str) -> DeltaTable | None:
        """A fresh handle on the table at `path` (None when there is none)."""
        return load_table(path, self._storage_options)

    def _cached(self, path: str, *, refresh: bool = True,
                cache: dict[str, DeltaTable] | None = None) -> DeltaTable | None:
        """The table's handle, its log brought up to date (one listing of the log; on an
        object store a request) unless `refresh` is False: the caller has just done it.
        `cache`: where handles are kept (default: the sink's own, `_tables`)."""
        tables = self._tables if cache is None else cache
        dt = tables.get(path)
        if dt is not None:
            if refresh:
                dt.update_incremental()
            return dt
        dt = self._load(path)
        if dt is not None:
            tables[path] = dt
        return dt

    def _txn_version(self, dt: DeltaTable, ref: TableRef, kind: TableKind | str) -> int | None:
        value = dt.transaction_version(self.app_id(ref, kind))
        return None if value is None else int(value)

    def _commit_properties(self, ref: TableRef, kind: TableKind, version: int) -> CommitProperties:
        return CommitProperties(
            app_transactions=[Transaction(self.app_id(ref, kind), version)],
            custom_metadata={"cdcengine.lsn": format_lsn(version)},
        )

    def _after_commit(self, ref: TableRef, kind: TableKind, version: int) -> None:
        """Hook between the durable commit and the return; tests make it "crash" here."""

    def _create(
        self, path: str, ref: TableRef, kind: TableKind, schema: pa.Schema, keys: list[str]
    ) -> DeltaTable:
        stats = [*keys, LSN] if kind is TableKind.CONSOLIDATED else [*keys, LSN, COMMITTED_AT]
        configuration: dict[str, str | None] = {
            LAYOUT_PROPERTY: LAYOUT_VERSION,
            "delta.dataSkippingStatsColumns": ",".join(quote_ident(c) for c in stats),
            "delta.checkpointInterval": str(self.maintenance.checkpoint_interval),
        }
        if self.target_file_size:
            # merges and optimize read it from the table (`spool.TARGET_FILE_BYTES`: the rows
            # of one file are what a copy-on-write merge rewrites per touched file)
            configuration["delta.targetFileSize"] = str(self.target_file_size)
        _check_storable(schema, ref)
        partitions = self.partition_by.get(ref, ()) if kind is TableKind.CONSOLIDATED else ()
        _check_partitions(schema, partitions, ref)
        local = local_path(path)
        if local is not None and local.is_dir() and any(
                p.name != "_delta_log" for p in local.iterdir()):
            # never turn a folder of someone's files into a Delta table
            raise SinkSchemaError(
                f"{path} already holds files that are not a Delta table; the engine does not "
                "write its tables into other files (point destination at an empty directory)",
                table=ref.qualified)
        dt = DeltaTable.create(
            path,
            schema,
            mode="error",
            partition_by=list(partitions) or None,
            configuration=configuration,
            storage_options=self._storage_options,
            raise_if_key_not_exists=False,
        )
        self._tables[path] = dt
        log.info("delta_table_created", table=ref.qualified, kind=str(kind), path=path,
                 partition_by=list(partitions))
        return dt

    def _table_for(self, dt: DeltaTable | None, path: str, ref: TableRef, kind: TableKind,
                   shape: pa.Table, schema: pa.Schema, key: Sequence[str],
                   ) -> tuple[DeltaTable, tuple[str, ...]]:
        """The Delta table rows shaped like `shape` are written into, and the columns this
        added to it: created with `schema` when missing; else its layout checked, the batch's
        new columns added and widened types applied."""
        if dt is None:
            return self._create(path, ref, kind, schema, list(key)), ()
        self._check_layout(dt, ref, path, kind)
        added = self._add_new_columns(dt, ref, shape, kind)
        self._widen(dt, ref, kind, shape)
        return dt, added

    def _check_layout(self, dt: DeltaTable, ref: TableRef, path: str, kind: TableKind) -> None:
        layout = dt.metadata().configuration.get(LAYOUT_PROPERTY)
        if layout != LAYOUT_VERSION:
            raise SinkSchemaError(
                f"{path} holds a Delta table that is not a cdcengine layout-{LAYOUT_VERSION} "
                f"table ({LAYOUT_PROPERTY}={layout!r})",
                table=ref.qualified,
            )
        present = set(_arrow_schema(dt).names)
        fields = (
            CONSOLIDATED_ENGINE_FIELDS if kind is TableKind.CONSOLIDATED else (APPEND_ENGINE_FIELDS)
        )
        missing = [f.name for f in fields if f.name not in present]
        if missing:
            raise SinkSchemaError(
                f"{path} lacks the engine column(s) {missing}", table=ref.qualified
            )
        wanted = list(self.partition_by.get(ref, ())) if kind is TableKind.CONSOLIDATED else []
        stored = list(dt.metadata().partition_columns)
        if wanted != stored and path not in self._partition_warned:
            # partitioning is fixed when a table is created: say so once, keep writing
            self._partition_warned.add(path)
            log.warning("delta_partitioning_differs", table=ref.qualified, kind=str(kind),
                        configured=wanted, stored=stored,
                        remedy="partition_by applies when the Delta table is created; "
                               "recreate the table to change it")

    def _add_new_columns(
        self, dt: DeltaTable, ref: TableRef, batch: pa.Table, kind: TableKind
    ) -> tuple[str, ...]:
        """Add the batch's data columns the table lacks (nullable), in one commit of their own.

        That commit carries no txn action: replaying it is harmless (the columns then exist),
        and the data commit that follows carries the progress.
        """
        target = _arrow_schema(dt)
        stored = {name.lower(): name for name in target.names}
        new: list[pa.Field] = []
        for name in data_columns(batch):
            existing = stored.get(name.lower())
            if existing is None:
                new.append(pa.field(name, _normalise(batch.schema.field(name).type), True))
            elif existing != name:
                raise SinkSchemaError(
                    f"{ref}: column {name!r} clashes with stored column {existing!r} "
                    "(Delta column names ignore case)",
                    table=ref.qualified,
                    column=name,
                )
        if not new:
            return ()
        _check_storable(pa.schema(new), ref)
        dt.alter.add_columns([Field.from_arrow(f) for f in new])
        names = tuple(f.name for f in new)
        log.info("delta_columns_added", table=ref.qualified, kind=str(kind), columns=list(names))
        return names

    def _widen(self, dt: DeltaTable, ref: TableRef, kind: TableKind, batch: pa.Table) -> None:
        """Rewrite the table with the wider types a source column now has (int4 → int8, a
        wider numeric, …), in one commit that keeps the applied version's txn action.

        delta-rs neither widens on merge nor refuses: it would truncate silently. A change
        that is not a widening is left to `_conform`, which refuses it (`SinkSchemaError`).
        """
        target = _arrow_schema(dt)
        wider: dict[str, pa.DataType] = {}
        for name in data_columns(batch):
            index = target.get_field_index(name)
            if index < 0:
                continue
            stored, incoming = target.field(index).type, _normalise(batch.schema.field(name).type)
            if incoming != stored and widens(stored, incoming):
                wider[name] = incoming
        if not wider:
            return
        started = time.perf_counter()
        table = dt.to_pyarrow_table()
        for name, type_ in wider.items():
            index = table.schema.get_field_index(name)
            table = table.set_column(index, pa.field(name, type_, True),
                                     table.column(name).cast(type_))
        applied = self._txn_version(dt, ref, kind)
        props = CommitProperties(
            app_transactions=[Transaction(self.app_id(ref, kind), applied)]
            if applied is not None else None,
            custom_metadata={"cdcengine.operation": "widen"},
        )
        _write_delta(dt, table, mode="overwrite", schema_mode="overwrite",
                     commit_properties=props)
        log.info("delta_columns_widened", table=ref.qualified, kind=str(kind),
                 columns={n: str(t) for n, t in wider.items()}, rows=table.num_rows,
                 duration_ms=_ms(started))


def _check_partitions(schema: pa.Schema, partitions: tuple[str, ...], ref: TableRef) -> None:
    """`partition_by` columns must be captured data columns of a type Delta keeps in a folder
    name: a list, struct, binary or floating value cannot (or should not) be one."""
    for name in partitions:
        if name not in schema.names:
            raise SinkSchemaError(
                f"partition_by column {name!r} of {ref} is not among its captured columns "
                f"({', '.join(n for n in schema.names if not is_engine_column(n))}); fix "
                "partition_by in the config, then resync the table", table=ref.qualified)
        type_ = schema.field(name).type
        if (pa.types.is_nested(type_) or pa.types.is_binary(type_)
                or pa.types.is_large_binary(type_) or pa.types.is_floating(type_)):
            raise SinkSchemaError(
                f"partition_by column {name!r} of {ref} has type {type_}, which Delta cannot "
                "partition by; choose a date, integer, string or boolean column",
                table=ref.qualified)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


# Words of a failure of the destination itself (storage, network, a concurrent commit), not of
# one table's data: such a failure is retried by the source, never stops a table.
_DESTINATION_FAILURE = re.compile(
    r"object.?store|i/?o error|\bio\b|no space|disk|quota|permission|denied|read-only|"
    r"readonly|connect|timed? ?out|timeout|network|dns|http|s3|gcs|azure|throttl|slow ?down|"
    r"too many|broken pipe|reset by peer|not found|no such file|version \d+ already exists|"
    r"conflict|concurrent|transaction",
    re.IGNORECASE)


def _first_line(exc: BaseException, options: Mapping[str, str] | None) -> str:
    """The first line of a destination's message, credentials scrubbed, at most 300 chars."""
    return error_detail(exc, options)


def _table_specific(exc: BaseException) -> bool:
    """Does a Delta failure look like the table's own (its data or statement refused)?"""
    if isinstance(exc, (OSError, CommitFailedError)):
        return False
    return not _DESTINATION_FAILURE.search(str(exc))

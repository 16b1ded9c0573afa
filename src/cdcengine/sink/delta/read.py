"""The one Delta reader: everything outside the sink that reads a Delta table (`status`,
`verify`, `history`, the demo) reads it through `DeltaReader`, and the sink opens its own
handles through `load_table`.

A `DeltaReader` is built from a destination (and its storage options, passed to delta-rs
unchanged: never logged); `open` / `open_path` give a `DeltaSnapshot`, one read of a table's
log at a fixed version, from which the data (a pyarrow Table or Dataset: DuckDB scans the
latter), the row count, the Delta version and a txn app id's version are all read consistently.
Every call opens a fresh handle (no cache), so a reader may be used from any thread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from cdcengine.names import TableRef
from cdcengine.object_store import storage_plan
from cdcengine.secrets import environment_secrets, option_secrets, scrub
from cdcengine.sink.base import SinkWriteError, TableKind
from cdcengine.sink.columns import DELETED


def delta_options(
    location: str, storage_options: Mapping[str, str] | None
) -> dict[str, str] | None:
    """The options every deltalake call of the engine gets for `location` (a destination or a
    table path): the user's, with the engine's commit-safety rule applied
    (`cdcengine.object_store`: conditional put on S3). None when there are none."""
    return storage_plan(location, storage_options).options or None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_S3_ERROR = re.compile(r"<Code>([^<]{1,100})</Code>\s*(?:<Message>([^<]{0,200})</Message>)?")


def error_detail(exc: BaseException, options: Mapping[str, str] | None) -> str:
    """What a destination's message says, in one line of at most 300 characters, with every
    option value that may be secret and the object-store credentials of the environment
    scrubbed (a store's error may quote the request, never its keys; a driver might).

    delta-rs's object-store errors are a chain, one cause a line (`Generic S3 error` /
    `↳ Error performing list request` / … / `↳ Connection refused (os error 111)`), and an S3
    refusal ends in the store's XML: the first line is kept with the root cause (the XML's
    `Code: Message`, else the last line), which is what tells a user what to fix.
    """
    text = _ANSI.sub("", str(exc))
    lines = [ln.strip().lstrip("↳").strip() for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return ""
    s3 = _S3_ERROR.search(text)
    cause = f"{s3[1]}: {s3[2]}" if s3 and s3[2] else s3[1] if s3 else lines[-1]
    detail = lines[0] if cause == lines[0] else f"{lines[0]}: {cause}"
    return scrub(detail[:300], [*option_secrets(options), *environment_secrets()])


def load_table(path: str, storage_options: Mapping[str, str] | None = None) -> DeltaTable | None:
    """A fresh deltalake handle on the table at `path`; None when there is no Delta table.

    The destination failing the read (unreachable endpoint, missing bucket, refused
    credentials) raises `SinkWriteError` (`destination_failed`, retryable) naming the table and
    the store's own words, scrubbed: never a bare OSError, whose message may be all a user sees.
    """
    options = delta_options(path, storage_options)
    try:
        if not DeltaTable.is_deltatable(path, storage_options=options):
            return None
        return DeltaTable(path, storage_options=options)
    except (DeltaError, OSError) as exc:
        detail = error_detail(exc, options)
        raise SinkWriteError(
            f"cannot read the Delta table at {path} ({type(exc).__name__}"
            f"{': ' + detail if detail else ''})", detail=detail,
            fix="Check the destination and destination_options (endpoint, bucket, region, "
                "credentials); for S3 the keys come from destination_options or "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaTableInfo:
    path: str
    exists: bool
    version: int | None = None
    applied_version: int | None = None
    rows: int | None = None


class DeltaSnapshot:
    """One Delta table as of one read of its log (its version does not move)."""

    def __init__(self, table: DeltaTable, path: str) -> None:
        self._table = table
        self.path = path

    def __repr__(self) -> str:
        return f"DeltaSnapshot(path={self.path!r}, version={self.version})"

    @property
    def version(self) -> int:
        """The Delta version read."""
        return int(self._table.version())

    @property
    def schema(self) -> pa.Schema:
        """The table's Arrow schema."""
        return pa.schema(self._table.schema().to_arrow())

    @property
    def configuration(self) -> dict[str, str]:
        """The table properties (`cdcengine.layout`, `delta.*`, ...)."""
        return dict(self._table.metadata().configuration)

    def transaction_version(self, app_id: str) -> int | None:
        """The version of txn app id `app_id` in the log; None when it has none."""
        value = self._table.transaction_version(app_id)
        return None if value is None else int(value)

    def dataset(self) -> pads.Dataset:
        """A pyarrow dataset of the rows (for DuckDB: register it, then `... FROM name`)."""
        return self._table.to_pyarrow_dataset()

    to_pyarrow_dataset = dataset  # what readers of a deltalake.DeltaTable call

    def read(
        self, *, columns: Sequence[str] | None = None, filter: pads.Expression | None = None
    ) -> pa.Table:
        """The rows as a pyarrow Table (soft-deleted rows included unless `filter` drops them)."""
        cols = list(columns) if columns is not None else None
        if filter is None:
            return self._table.to_pyarrow_table(columns=cols)
        return self.dataset().to_table(columns=cols, filter=filter)

    def file_stats(self) -> pa.Table:
        """One row per data file from the log: `path`, `num_records`, `min.<col>`, `max.<col>`
        (for the columns the table keeps statistics of: keys and `_cdc_lsn`)."""
        return pa.table(self._table.get_add_actions(flatten=True))

    def column_max(self, column: str) -> int | None:
        """The largest value of `column` per the log's file statistics (no data read); None
        when the table has no rows or no statistics of it."""
        stats = self.file_stats()
        name = f"max.{column}"
        if stats.num_rows == 0 or name not in stats.column_names:
            return None
        value = pa.compute.max(stats.column(name)).as_py()
        return None if value is None else int(value)

    def commits(self) -> list[dict[str, object]]:
        """The commit infos of the log, newest first: `version`, `timestamp` (ms since the
        epoch, the writer's clock), `operation` and the engine's metadata (`cdcengine.lsn`)."""
        return [dict(c) for c in self._table.history()]

    def count(self, *, live_only: bool = False) -> int:
        """Rows in the table; `live_only`: rows not soft-deleted (a consolidated table)."""
        if live_only:
            return int(self.dataset().count_rows(filter=~pads.field(DELETED)))
        return int(self._table.count())


class DeltaReader:
    """Reads the Delta tables under `destination` (see the module docstring).

    `destination` may be omitted when only `open_path` is used.
    """

    def __init__(
        self, destination: str | None = None, *, storage_options: Mapping[str, str] | None = None
    ) -> None:
        self.destination = destination
        self._storage_options = (delta_options(destination, storage_options) if destination
                                 else dict(storage_options or {}) or None)

    def __repr__(self) -> str:
        return f"DeltaReader(destination={self.destination!r})"

    def path(self, ref: TableRef, kind: TableKind | str) -> str:
        """`D/schema/table` or `D/schema/table_cdc` (SPEC §5)."""
        if self.destination is None:
            raise ValueError("this DeltaReader has no destination: use open_path")
        return ref.delta_path(self.destination, append=TableKind(kind) is TableKind.APPEND)

    def open_path(self, path: str) -> DeltaSnapshot | None:
        """The Delta table at `path`, read now; None when there is none."""
        table = load_table(path, self._storage_options)
        return None if table is None else DeltaSnapshot(table, path)

    def open(self, ref: TableRef, kind: TableKind | str) -> DeltaSnapshot | None:
        """The `kind` Delta table of `ref`, read now; None when it does not exist."""
        return self.open_path(self.path(ref, kind))

    def _require(self, ref: TableRef, kind: TableKind | str) -> DeltaSnapshot:
        snapshot = self.open(ref, kind)
        if snapshot is None:
            raise LookupError(f"no Delta {TableKind(kind)} table for {ref}")
        return snapshot

    def exists(self, ref: TableRef, kind: TableKind | str) -> bool:
        """Whether the Delta table exists."""
        return self.open(ref, kind) is not None

    def read_table(
        self,
        ref: TableRef,
        kind: TableKind | str,
        *,
        columns: Sequence[str] | None = None,
        filter: pads.Expression | None = None,
    ) -> pa.Table:
        """The table's current rows (soft-deleted ones included unless `filter` drops them).
        Raises LookupError when the table does not exist."""
        return self._require(ref, kind).read(columns=columns, filter=filter)

    def dataset(self, ref: TableRef, kind: TableKind | str) -> pads.Dataset:
        """A pyarrow dataset of the current snapshot; LookupError when the table is missing."""
        return self._require(ref, kind).dataset()

    def row_count(
        self, ref: TableRef, kind: TableKind | str, *, live_only: bool = False
    ) -> int | None:
        """Rows in the table (None when it does not exist). `live_only`: consolidated rows
        not soft-deleted."""
        kind = TableKind(kind)
        snapshot = self.open(ref, kind)
        if snapshot is None:
            return None
        return snapshot.count(live_only=live_only and kind is TableKind.CONSOLIDATED)

    def table_info(
        self, ref: TableRef, kind: TableKind | str, *, app_id: str | None = None
    ) -> DeltaTableInfo:
        """Path, existence, Delta version, `app_id`'s applied version and row count
        (consolidated: live rows) of one table, from one read of its log."""
        kind = TableKind(kind)
        path = self.path(ref, kind)
        snapshot = self.open_path(path)
        if snapshot is None:
            return DeltaTableInfo(path=path, exists=False)
        return DeltaTableInfo(
            path=path, exists=True, version=snapshot.version,
            applied_version=None if app_id is None else snapshot.transaction_version(app_id),
            rows=snapshot.count(live_only=kind is TableKind.CONSOLIDATED))


__all__ = ["DeltaReader", "DeltaSnapshot", "DeltaTableInfo", "delta_options", "load_table"]

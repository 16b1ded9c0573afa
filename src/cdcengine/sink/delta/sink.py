"""`DeltaSink`: the Delta Lake sink, composed of its jobs, one module each.

- `tables` (`DeltaTables`, the shared base): names and app ids, table handles, creation with the
  layout, the layout check, schema evolution (columns added, types widened, defaults backfilled);
- `lookup` (`StoredLookups`): what a write reads back from the stored tables;
- `writes` (`ChangeWrites`): progress and the change batches (append, merge, truncate);
- `snapshot` (`SnapshotLoads`): initial snapshots, whole or chunked;
- `resync` (`Resyncs`): a re-snapshot swapped into an existing table;
- `maintain` (`Maintenance`): compaction, checkpoints, vacuum;
- `read` (`DeltaReader`): every read of a Delta table from outside the writer.

The pure parts they share: `schema` (types, schemas, row layout), `sql` (what delta-rs is
given as SQL) and `spool` (how deltalake is fed: materialised data only).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable

from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.sink.base import TableKind
from cdcengine.sink.delta.maintain import DeltaMaintenance, Maintenance
from cdcengine.sink.delta.read import DeltaReader, DeltaTableInfo, delta_options
from cdcengine.sink.delta.resync import Resyncs
from cdcengine.sink.delta.snapshot import SnapshotLoads
from cdcengine.sink.delta.spool import SPILL_BYTES, TARGET_FILE_BYTES
from cdcengine.sink.delta.writes import ChangeWrites


class DeltaSink(ChangeWrites, SnapshotLoads, Resyncs, Maintenance):
    """Writes change batches of one source into Delta tables under `destination`, exactly once.

    `source` names the source in every app id; `storage_options` go to delta-rs with the
    engine's commit-safety rule applied (`cdcengine.object_store`: on S3, conditional put unless
    a DynamoDB lock is configured; unsafe options refused) and are never logged nor in a repr.
    One writer thread owns an instance (it caches open table handles); `read_table`,
    `row_count`, `exists`, `table_info`, `dataset` and `applied_version` open fresh handles and
    may be called from any thread, as may `reader` (the sink's `DeltaReader`).
    """

    def __init__(
        self,
        destination: str,
        *,
        source: str,
        storage_options: Mapping[str, str] | None = None,
        maintenance: DeltaMaintenance | None = None,
        target_file_size: int | None = TARGET_FILE_BYTES,
        spill_bytes: int = SPILL_BYTES,
        spill_dir: str | None = None,
        partition_by: Mapping[TableRef, Sequence[str]] | None = None,
    ) -> None:
        if not destination:
            raise ValueError("DeltaSink needs a destination")
        if not source:
            raise ValueError("DeltaSink needs a source name")
        self.destination = destination
        self.source = source
        self.maintenance = maintenance or DeltaMaintenance()
        self.target_file_size = target_file_size
        self.spill_bytes, self.spill_dir = spill_bytes, spill_dir
        # per table: the consolidated table's partition columns (`partition_by` in the config),
        # applied when the table is created
        self.partition_by = {ref: tuple(cols) for ref, cols in (partition_by or {}).items()
                             if cols}
        # the user's options under the engine's commit-safety rule (S3: conditional put)
        self._storage_options = delta_options(destination, storage_options)
        self._tables: dict[str, DeltaTable] = {}
        # snapshot chunk writers' own handles, per thread (see SnapshotLoads._chunk_handle)
        self._chunk_handles = threading.local()
        self._checkpointed_at: dict[str, int] = {}
        self._partition_warned: set[str] = set()
        self.reader = DeltaReader(destination, storage_options=self._storage_options)

    @classmethod
    def for_source(cls, source: SourceConfig, *, destination: str | None = None) -> DeltaSink:
        """The sink of a configured source (its destination and storage options), or of
        another `destination` under the same options (a staging area)."""
        return cls(destination or source.destination, source=source.name,
                   storage_options=dict(source.destination_options) or None,
                   partition_by={tc.ref: tc.partition_by for tc in source.table_configs
                                 if tc.partition_by})

    def __repr__(self) -> str:
        return f"DeltaSink(destination={self.destination!r}, source={self.source!r})"

    def close(self) -> None:
        """Drop cached table handles (nothing is buffered: every write committed). Safe twice."""
        self._tables.clear()

    # --- reading (tests, `status`): through the reader -----------------------------------

    def exists(self, ref: TableRef, kind: TableKind | str) -> bool:
        """Whether the Delta table exists."""
        return self.reader.exists(ref, kind)

    def table_info(self, ref: TableRef, kind: TableKind | str) -> DeltaTableInfo:
        """Path, existence, Delta version, applied LSN and row count (consolidated: live rows)
        of one table, from one fresh read of its log."""
        kind = TableKind(kind)
        with self._delta_errors(self.path(ref, kind), ref, kind):
            return self.reader.table_info(ref, kind, app_id=self.app_id(ref, kind))

    def read_table(
        self, ref: TableRef, kind: TableKind | str, *, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """The table's current snapshot as a pyarrow Table (soft-deleted rows included).

        Raises LookupError when the table does not exist.
        """
        return self.reader.read_table(ref, kind, columns=columns)

    def dataset(self, ref: TableRef, kind: TableKind | str) -> pads.Dataset:
        """A pyarrow dataset of the current snapshot (for duckdb: `... FROM dset`)."""
        return self.reader.dataset(ref, kind)

    def row_count(
        self, ref: TableRef, kind: TableKind | str, *, live_only: bool = False
    ) -> int | None:
        """Rows in the table (None when it does not exist). `live_only`: consolidated rows
        not soft-deleted."""
        return self.reader.row_count(ref, kind, live_only=live_only)


__all__ = ["DeltaSink"]

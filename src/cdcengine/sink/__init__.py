"""Sinks: where change batches become durable, with progress committed atomically with the data.

`cdcengine.sink.base` is the seam (the `Sink` and `SnapshotSink` protocols, their result types
and `SinkFactory`; `delta_sink` is the default factory), `cdcengine.sink.columns` the engine's
column names, `cdcengine.sink.fold` the pure Arrow preparation of a batch, `cdcengine.sink.delta`
the Delta Lake implementation, which makes every write and every read of a Delta table (its
`DeltaReader` serves `status`, `verify`, `history` and the demo). Importing this package does
not import `deltalake`; `DeltaSink` and
`DeltaMaintenance` are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdcengine.sink.base import (
    AddedColumns,
    CommitResult,
    MaintenanceResult,
    Sink,
    SinkFactory,
    SinkSchemaError,
    SinkWriteError,
    SnapshotSink,
    TableKind,
    TableSpec,
    WriteResult,
    kinds_for,
)
from cdcengine.sink.fold import append_rows, fold_for_merge

if TYPE_CHECKING:
    from cdcengine.config import SourceConfig
    from cdcengine.sink.delta import DeltaMaintenance, DeltaSink

__all__ = [
    "AddedColumns",
    "CommitResult",
    "DeltaMaintenance",
    "DeltaSink",
    "MaintenanceResult",
    "Sink",
    "SinkFactory",
    "SinkSchemaError",
    "SinkWriteError",
    "SnapshotSink",
    "TableKind",
    "TableSpec",
    "WriteResult",
    "append_rows",
    "delta_sink",
    "fold_for_merge",
    "kinds_for",
]


def delta_sink(source: SourceConfig) -> SnapshotSink:
    """The default `SinkFactory`: the Delta Lake sink of the source's destination (imports
    deltalake on the first call)."""
    from cdcengine.sink.delta import DeltaSink

    return DeltaSink.for_source(source)


def __getattr__(name: str) -> object:
    if name in ("DeltaSink", "DeltaMaintenance"):
        from cdcengine.sink import delta

        return getattr(delta, name)
    raise AttributeError(f"module 'cdcengine.sink' has no attribute {name!r}")

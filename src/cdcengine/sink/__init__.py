"""Sinks: where change batches become durable, with progress committed atomically with the data.

`cdcengine.sink.base` is the seam (the `Sink` protocol and its result types),
`cdcengine.sink.columns` the engine's column names, `cdcengine.sink.fold` the pure Arrow
preparation of a batch, `cdcengine.sink.delta` the Delta Lake implementation, which makes every
write and every read of a Delta table (its `DeltaReader` serves `status`, `verify`, `history`
and the demo). Importing this package does not import `deltalake`; `DeltaSink` and
`DeltaMaintenance` are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdcengine.sink.base import (
    CommitResult,
    MaintenanceResult,
    Sink,
    SinkSchemaError,
    SinkWriteError,
    TableKind,
    TableSpec,
    WriteResult,
    kinds_for,
)
from cdcengine.sink.fold import append_rows, fold_for_merge

if TYPE_CHECKING:
    from cdcengine.sink.delta import DeltaMaintenance, DeltaSink

__all__ = [
    "CommitResult",
    "DeltaMaintenance",
    "DeltaSink",
    "MaintenanceResult",
    "Sink",
    "SinkSchemaError",
    "SinkWriteError",
    "TableKind",
    "TableSpec",
    "WriteResult",
    "append_rows",
    "fold_for_merge",
    "kinds_for",
]


def __getattr__(name: str) -> object:
    if name in ("DeltaSink", "DeltaMaintenance"):
        from cdcengine.sink import delta

        return getattr(delta, name)
    raise AttributeError(f"module 'cdcengine.sink' has no attribute {name!r}")

"""The engine's column names, defined once (SPEC §5, §6).

Every column the engine adds to a source table's columns starts with `_cdc_`
(`cdcengine.names.ENGINE_COLUMN_PREFIX`; a source column may not). A change batch carries
`OP`, `LSN`, `SEQ`, `COMMITTED_AT` and `UNCHANGED` after its data columns; a consolidated Delta
table stores `CONSOLIDATED_COLUMNS` after its data columns, an append (change-log) table
`APPEND_COLUMNS`. `HAS_VALUES` exists only inside a folded batch (`cdcengine.sink.fold`), never
in a stored table.
"""

from __future__ import annotations

from cdcengine.names import ENGINE_COLUMN_PREFIX

PREFIX = ENGINE_COLUMN_PREFIX

OP = "_cdc_op"
"""The change: 'I', 'U', 'D', 'R' (snapshot read), 'T' (truncate; append tables only)."""
LSN = "_cdc_lsn"
"""End LSN of the source transaction (int64)."""
SEQ = "_cdc_seq"
"""Ordinal of the change among its table's changes in the transaction (int64)."""
COMMITTED_AT = "_cdc_committed_at"
"""Commit time of the source transaction (timestamp[us, UTC])."""
UNCHANGED = "_cdc_unchanged"
"""The columns whose value is an unchanged TOAST value the engine could not resolve."""
DELETED = "_cdc_deleted"
"""Consolidated tables: the row is soft-deleted."""
DELETED_AT = "_cdc_deleted_at"
"""Consolidated tables: when the row was deleted."""
HAS_VALUES = "_cdc_has_values"
"""Folded batches only: the row's data columns hold values (see `fold_for_merge`)."""

CHANGE_COLUMNS: tuple[str, ...] = (OP, LSN, SEQ, COMMITTED_AT, UNCHANGED)
"""The engine columns of a change batch, in batch order."""
CONSOLIDATED_COLUMNS: tuple[str, ...] = (LSN, COMMITTED_AT, DELETED, DELETED_AT)
"""The engine columns of a consolidated table, in stored order."""
APPEND_COLUMNS: tuple[str, ...] = (LSN, SEQ, OP, COMMITTED_AT, UNCHANGED)
"""The engine columns of an append (change-log) table, in stored order."""
ENGINE_COLUMNS: frozenset[str] = frozenset(
    (*CHANGE_COLUMNS, *CONSOLIDATED_COLUMNS, *APPEND_COLUMNS, HAS_VALUES))
"""Every engine column name."""

__all__ = [
    "APPEND_COLUMNS",
    "CHANGE_COLUMNS",
    "COMMITTED_AT",
    "CONSOLIDATED_COLUMNS",
    "DELETED",
    "DELETED_AT",
    "ENGINE_COLUMNS",
    "HAS_VALUES",
    "LSN",
    "OP",
    "PREFIX",
    "SEQ",
    "UNCHANGED",
]

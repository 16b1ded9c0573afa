"""What rows older than a source `ADD COLUMN` hold in it, resolved on the pipeline's thread.

PostgreSQL's `ADD COLUMN … DEFAULT <constant>` gives every existing row the default without
writing WAL for them (SPEC §6), so the stream never says so. `AddedColumnDefaults` looks at each
batch before it goes to the writer: for the columns a consolidated table gains (those the batch
reports as added, plus batch columns the table lacks: after a restart the stream no longer shows
the shape change, and then every stored row predates it) it asks the source adapter once
(`SourceAdapter.added_column_defaults`, a query on its own connection) and

- a constant ("fast") default rides on the batch (`ChangeBatch.added`) for the sink, which fills
  it into the stored rows and the batch's rows from before the change (`Sink.write(added=...)`);
- a rewritten table (a volatile default, an identity column: each row got its own value, which
  only a re-snapshot can read) stops the table: it leaves the batch with a stated reason
  (remedy: resync).

The writer thread therefore never talks to the source. Which columns a table holds is read from
the sink once per session, before the writer starts, and then followed batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from cdcengine.config import TableConfig
from cdcengine.errors import Reason
from cdcengine.names import TableRef
from cdcengine.pipeline.batcher import ChangeBatch, StoppedTable
from cdcengine.sink.base import AddedColumns, SpilledTable
from cdcengine.sink.fold import data_columns
from cdcengine.source.adapter import ColumnDefault, DefaultKind

DefaultsFn = Callable[[TableRef, Sequence[str]], Mapping[str, ColumnDefault]]
"""What rows existing before an ADD COLUMN hold in it (`SourceAdapter.added_column_defaults`)."""


class AddedColumnDefaults:
    """Per session, on the pipeline's thread: `resolve` each batch before it is submitted.

    `stored`: per consolidated table streamed, the data columns its Delta table holds (None:
    not created yet, so no old rows). Without `ask` (an adapter that cannot tell) batches pass
    unchanged.
    """

    def __init__(self, ask: DefaultsFn | None, tables: Mapping[TableRef, TableConfig],
                 stored: Mapping[TableRef, Sequence[str] | None]) -> None:
        self._ask = ask
        self._tables = dict(tables)
        # lower-cased: the columns each table holds once the batches resolved so far are written
        self._known: dict[TableRef, set[str] | None] = {
            ref: None if cols is None else {c.lower() for c in cols}
            for ref, cols in stored.items()}

    def resolve(self, batch: ChangeBatch) -> tuple[ChangeBatch, list[StoppedTable]]:
        """The batch with its added columns' defaults attached (and the tables that must stop
        taken out of it and listed in `stopped`), and the tables it stopped."""
        if self._ask is None:
            return batch, []
        found_for: dict[TableRef, AddedColumns] = {}
        stops: list[StoppedTable] = []
        for ref, table in batch.tables.items():
            if ref not in self._known:
                continue  # no consolidated table: no stored rows to fill
            columns = data_columns(table.schema)
            known = self._known[ref]
            if known is None:  # a new Delta table: no old rows
                self._known[ref] = {c.lower() for c in columns}
                continue
            changes = [c for c in batch.schema_changes if c.ref == ref and c.added]
            new = {c for change in changes for c in change.added}
            new |= {c for c in columns if c.lower() not in known}
            known.update(c.lower() for c in columns)
            selected = self._tables[ref].columns
            if selected is not None:
                new &= set(selected)
            new &= set(table.column_names)
            if not new:
                continue
            found = self._ask(ref, sorted(new))
            rewritten = sorted(c for c, d in found.items() if d.kind is DefaultKind.REWRITTEN)
            if rewritten:
                stops.append(StoppedTable(
                    ref=ref, reason=Reason.SCHEMA_INCOMPATIBLE,
                    message=f"column(s) {rewritten} of {ref.qualified} were added with a "
                            "volatile default (or as identity): PostgreSQL rewrote the table "
                            "and gave each existing row its own value, which the change stream "
                            "does not carry.",
                    remedy="resync the table", lsn=batch.version))
                continue
            values = {c: d.value for c, d in found.items()
                      if d.kind is DefaultKind.FAST and d.value is not None}
            if values:
                found_for[ref] = AddedColumns(
                    values=values, upto=min((c.lsn for c in changes), default=None))
        if not stops and not found_for:
            return batch, []
        gone = {s.ref for s in stops}
        for ref in gone:  # a stopped table's spill file is not needed any more
            dropped = batch.tables.get(ref)
            if isinstance(dropped, SpilledTable):
                dropped.close()
        return replace(
            batch,
            tables={r: t for r, t in batch.tables.items() if r not in gone},
            keys={r: k for r, k in batch.keys.items() if r not in gone},
            stopped=(*batch.stopped, *stops),
            added={**batch.added, **found_for}), stops

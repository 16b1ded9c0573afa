"""Which tables a running source captures, as `enable` changes them while it streams.

`enable` on an enabled source registers its table list in the state store (each table's mode,
columns and declared key), also while a daemon holds the source's lease. The pipeline compares
the registrations with what it saw at its previous look: a table registered since is added (its
snapshot then runs beside the stream), one whose registration went is dropped (its Delta tables
stay as they are), one whose mode changed gets the new mode (a table switched to `both` has its
change log backfilled from a snapshot). Only changes since the pipeline started count, so a
daemon started on a config file that disagrees with the store keeps the config file's view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from cdcengine.config import SourceConfig, TableConfig, TableMode
from cdcengine.names import TableRef
from cdcengine.state.base import TableRecord

Registrations = dict[str, TableRecord]


@dataclass(frozen=True, slots=True)
class TableSetChange:
    source: SourceConfig  # the source capturing the new table set
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    remoded: tuple[str, ...] = ()  # tables whose mode changed

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.remoded)


def registrations(records: list[TableRecord]) -> Registrations:
    return {r.name: r for r in records}


def table_config(rec: TableRecord) -> TableConfig:
    return TableConfig(ref=TableRef.parse(rec.name), mode=TableMode(rec.mode),
                       columns=rec.columns, primary_key=rec.primary_key)


def registered_changes(source: SourceConfig, seen: Mapping[str, TableRecord],
                       now: Mapping[str, TableRecord]) -> TableSetChange:
    """`source` with the registrations made since `seen` applied (falsy: nothing to do)."""
    current = {tc.name: tc for tc in source.table_configs}
    added = tuple(n for n in now if n not in seen and n not in current)
    removed = tuple(n for n in seen if n not in now and n in current)
    remoded = tuple(n for n, rec in now.items() if n in seen and n in current
                    and rec.mode != seen[n].mode and rec.mode != str(current[n].mode))
    if not (added or removed or remoded):
        return TableSetChange(source=source)
    tables = [replace(tc, mode=TableMode(now[name].mode)) if name in remoded else tc
              for name, tc in current.items() if name not in removed]
    tables += [table_config(now[name]) for name in added]
    return TableSetChange(source=source.with_tables(tables), added=added, removed=removed,
                          remoded=remoded)

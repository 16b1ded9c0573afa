"""The Delta Lake sink (deltalake / delta-rs): every write of the engine goes through it, and
every read of a Delta table too (`read.DeltaReader`: `status`, `verify`, `history`, the demo).
deltalake is imported only inside this package; importing `cdcengine` or `cdcengine.sink` does
not load it (`DeltaSink` is loaded on first access).

Layout (SPEC §5): for source table `schema.table` and destination `D`, the consolidated table is
`D/schema/table` and the append (change-log) table `D/schema/table_cdc`. Progress is a Delta
transaction action, `app_id = cdcengine/<source>/<schema.table>/<kind>` with `version` = end LSN
of the last source transaction included, written in the SAME commit as the data. A write whose
version is at or below the table's applied version is skipped, so a replay after a crash
neither loses nor duplicates anything.

How a consolidated batch lands (one Delta commit per call, `writes`):
1. `fold_for_merge`: one row per key (delta-rs inserts duplicates when a merge source repeats
   a key in the not-matched branch), unchanged-TOAST values and delete rows filled from the batch.
2. New data columns are added as nullable columns in a commit of their own first (no txn action:
   adding a column is harmless to replay; the txn action always rides on the data commit).
3. One `DeltaTable.merge` with `streamed_exec=False` (lets delta-rs prune target files with the
   source's min/max) and, for a single integer, string or date key, an explicit key-range
   predicate. Clauses, first match wins: matched & D -> delete (hard), or soft delete: only
   `_cdc_deleted`, `_cdc_deleted_at`, `_cdc_lsn`, `_cdc_committed_at` change, except when the
   batch changed the row before deleting it (`_cdc_has_values`): then the data columns the
   batch knew are written too, so the row keeps its LAST values; matched & I/U/R -> every data
   column the batch sent except that row's unchanged-TOAST ones, undeleted; not matched & not
   D -> insert; not matched & D -> nothing.
4. A merge that changes no row does not commit in delta-rs 1.6.6 (and so would drop the txn
   action): the sink then commits an empty append carrying it.

deltalake 1.6.6 facts this package relies on (see the tests): `write_deltalake` refuses custom
table properties (`cdcengine.layout`), `DeltaTable.create(..., raise_if_key_not_exists=False)`
takes them; `merge(merge_schema=True)` adding a timestamp-without-timezone column commits a
table that no reader can open (no protocol upgrade), `alter.add_columns` upgrades correctly;
`vacuum` defaults to `dry_run=True`. Some of its calls block on delta-rs' tokio runtime
while holding the GIL, so deltalake is only ever given materialised data (`spool._write_delta`,
`spool._materialised`): a Python-backed reader deadlocks it.

Modules, one job each: `sink` (`DeltaSink`, composing the others), `tables`, `lookup`, `writes`,
`snapshot`, `resync`, `maintain`, `read`, and the pure `schema`, `sql` and `spool`.
"""

from __future__ import annotations

from cdcengine.sink.base import TableSpec
from cdcengine.sink.delta.maintain import DeltaMaintenance
from cdcengine.sink.delta.read import DeltaReader, DeltaSnapshot, DeltaTableInfo
from cdcengine.sink.delta.schema import APPEND_ENGINE_FIELDS, CONSOLIDATED_ENGINE_FIELDS, widens
from cdcengine.sink.delta.sink import DeltaSink
from cdcengine.sink.delta.spool import _materialised, _write_delta
from cdcengine.sink.delta.sql import quote_ident, quote_text
from cdcengine.sink.delta.tables import _table_specific

__all__ = [
    "APPEND_ENGINE_FIELDS",
    "CONSOLIDATED_ENGINE_FIELDS",
    "DeltaMaintenance",
    "DeltaReader",
    "DeltaSink",
    "DeltaSnapshot",
    "DeltaTableInfo",
    "TableSpec",
    "_materialised",
    "_table_specific",
    "_write_delta",
    "quote_ident",
    "quote_text",
    "widens",
]

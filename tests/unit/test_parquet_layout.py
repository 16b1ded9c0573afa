"""Every Parquet file the engine writes is zstd-compressed without dictionary pages (see
`sink/delta/spool.py` `PARQUET_COMPRESSION` for the measurements behind the choice): snapshot
loads, appends, merges and compaction alike."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from test_delta_sink import REF, changes

from cdcengine.config import TableMode
from cdcengine.names import TableRef
from cdcengine.sink import TableSpec
from cdcengine.sink.delta import DeltaMaintenance, DeltaSink
from cdcengine.sink.delta.spool import TARGET_FILE_BYTES


def layouts(table_dir: str) -> set[tuple[str, bool]]:
    """(compression, has a dictionary page) of every column chunk of every data file."""
    out: set[tuple[str, bool]] = set()
    files = [p for p in Path(table_dir).rglob("*.parquet") if "_delta_log" not in p.parts]
    assert files
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                out.add((col.compression, col.dictionary_page_offset is not None))
    return out


def test_every_write_path_writes_zstd_without_dictionaries(tmp_path: Path) -> None:
    sink = DeltaSink(str(tmp_path / "dest"), source="src1",
                     maintenance=DeltaMaintenance(vacuum_retention_hours=0,
                                                  enforce_retention_duration=False))
    # low-cardinality values: exactly what a dictionary would be tried on
    rows = [{"_cdc_op": "I", "id": i, "v": f"v{i % 3}", "big": "same"} for i in range(500)]
    sink.write_append(REF, changes(rows, 10), version=10, key=["id"])
    sink.write_consolidated(REF, changes(rows, 10), key=["id"], version=10)
    updates = [{"_cdc_op": "U", "id": i, "v": "after", "big": "same"} for i in range(0, 500, 7)]
    sink.write_consolidated(REF, changes(updates, 20), key=["id"], version=20)  # a merge
    more = [{"_cdc_op": "I", "id": 1000 + i, "v": "w", "big": "same"} for i in range(50)]
    sink.write_consolidated(REF, changes(more, 25), key=["id"], version=25)  # a second file
    assert sink.maintain(REF, "consolidated").files_added >= 1  # compaction rewrites
    snap = TableRef("public", "snap")
    chunk = pa.table({"id": pa.array(range(300), pa.int64()), "v": ["x"] * 300})
    sink.write_snapshot(snap, iter([chunk]), spec=TableSpec(key=("id",), mode=TableMode.BOTH),
                        version=30, committed_at_us=0)
    for ref, kind in ((REF, "append"), (REF, "consolidated"), (snap, "consolidated"),
                      (snap, "append")):
        assert layouts(sink.path(ref, kind)) == {("ZSTD", False)}, (ref, kind)
        # the file size merges and compaction aim at is the table's own property
        config = DeltaTable(sink.path(ref, kind)).metadata().configuration
        assert config["delta.targetFileSize"] == str(TARGET_FILE_BYTES) == str(32 * 1024 * 1024)
    sink.close()

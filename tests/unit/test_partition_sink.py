"""`partition_by` at the sink: the consolidated table is partitioned; a merge rewrites only the
files holding changed keys, and with the partition column in the key it also reads only the
partitions the batch names (what the README promises)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from structlog.testing import capture_logs

from cdcengine.names import TableRef
from cdcengine.sink.base import SinkSchemaError
from cdcengine.sink.delta import DeltaSink

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SCHEMA = pa.schema([("id", pa.int64()), ("day", pa.date32()), ("v", pa.string()),
                    ("g", pa.float64()), ("_cdc_op", pa.string()), ("_cdc_lsn", pa.int64()),
                    ("_cdc_seq", pa.int64()), ("_cdc_committed_at", pa.timestamp("us", tz="UTC")),
                    ("_cdc_unchanged", pa.list_(pa.string()))])


def _changes(rows: list[dict[str, object]], lsn: int) -> pa.Table:
    return pa.Table.from_pylist([{"_cdc_lsn": lsn, "_cdc_seq": i, "_cdc_committed_at": T0,
                                  "g": 1.0, **r} for i, r in enumerate(rows)], schema=SCHEMA)


@pytest.mark.parametrize(("keys", "scanned"), [(["id", "day"], 1), (["id"], 3)])
def test_merge_touches_only_the_partitions_and_files_it_must(
        tmp_path: Path, keys: list[str], scanned: int) -> None:
    ref = TableRef("public", "ev")
    sink = DeltaSink(str(tmp_path), source="s", partition_by={ref: ("day",)})
    for lsn in (1, 2, 3):  # ids interleave over the partitions: no key range to prune by
        rows = [{"_cdc_op": "I", "id": i * 3 + lsn, "day": date(2024, 1, lsn), "v": "x"}
                for i in range(500)]
        sink.write_consolidated(ref, _changes(rows, lsn), key=keys, version=lsn)
    dt = DeltaTable(sink.path(ref, "consolidated"))
    assert dt.metadata().partition_columns == ["day"]
    updates = [{"_cdc_op": "U", "id": i * 3 + 3, "day": date(2024, 1, 3), "v": "y"}
               for i in (5, 400)]
    sink.write_consolidated(ref, _changes(updates, 10), key=keys, version=10)
    metrics = DeltaTable(sink.path(ref, "consolidated")).history(1)[0]["operationMetrics"]
    assert metrics["num_target_files_scanned"] == scanned
    assert (metrics["num_target_files_removed"], metrics["num_target_files_added"]) == (1, 1)
    assert sink.row_count(ref, "consolidated") == 1500


def test_partition_column_of_a_type_delta_cannot_partition_by(tmp_path: Path) -> None:
    ref = TableRef("public", "ev")
    sink = DeltaSink(str(tmp_path), source="s", partition_by={ref: ("g",)})
    with pytest.raises(SinkSchemaError, match=r"partition_by column 'g' .* type double"):
        sink.write_consolidated(ref, _changes([{"_cdc_op": "I", "id": 1, "day": None}], 1),
                                key=["id"], version=1)
    assert not (tmp_path / "public" / "ev").exists()


def test_existing_table_keeps_its_layout_and_says_so_once(tmp_path: Path) -> None:
    ref = TableRef("public", "ev")
    plain = DeltaSink(str(tmp_path), source="s")
    plain.write_consolidated(ref, _changes([{"_cdc_op": "I", "id": 1, "day": date(2024, 1, 1)}],
                                           1), key=["id"], version=1)
    sink = DeltaSink(str(tmp_path), source="s", partition_by={ref: ("day",)})
    with capture_logs() as logs:
        for lsn in (2, 3):
            sink.write_consolidated(ref, _changes([{"_cdc_op": "U", "id": 1, "v": str(lsn),
                                                    "day": date(2024, 1, 1)}], lsn),
                                    key=["id"], version=lsn)
    warned = [e for e in logs if e["event"] == "delta_partitioning_differs"]
    assert len(warned) == 1
    assert (warned[0]["configured"], warned[0]["stored"]) == (["day"], [])
    assert DeltaTable(sink.path(ref, "consolidated")).metadata().partition_columns == []
    assert sink.read_table(ref, "consolidated").column("v").to_pylist() == ["3"]

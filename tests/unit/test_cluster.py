"""Key clustering: compaction sorts a consolidated table by its key when its files' key ranges
overlap, keeping exactly the same rows and the txn versions; otherwise it bin-packs."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from test_delta_sink import ENGINE, REF, changes, write

from cdcengine.sink.delta import DeltaMaintenance, DeltaSink
from cdcengine.sink.delta.cluster import cluster_key, key_overlap, sorts_by_arrival


def _files(sink: DeltaSink) -> list[list[int]]:
    dt = DeltaTable(sink.path(REF, "consolidated"))
    return [pq.read_table(uri, columns=["id"]).column("id").to_pylist()
            for uri in dt.file_uris()]


def _rows(sink: DeltaSink) -> list[dict[str, object]]:
    return sorted(sink.read_table(REF, "consolidated").to_pylist(), key=lambda r: r["id"])


def test_compaction_sorts_overlapping_files_by_key_and_keeps_the_rows(tmp_path: Path) -> None:
    policy = DeltaMaintenance(vacuum_retention_hours=None)
    sink = DeltaSink(str(tmp_path / "dest"), source="src1", maintenance=policy)
    rng = random.Random(7)
    ids = list(range(1, 801))
    rng.shuffle(ids)
    for lsn in range(1, 9):  # each insert batch spans the whole key range: files overlap
        chunk = ids[(lsn - 1) * 100:lsn * 100]
        write(sink, [{"_cdc_op": "I", "id": i, "v": f"v{i}" * 3} for i in chunk], lsn)
    # an update and a delete (a merge that touches one file rewrites just it)
    write(sink, [{"_cdc_op": "U", "id": ids[5], "v": "upd"}], 9)
    write(sink, [{"_cdc_op": "D", "id": ids[0]}], 10)
    before = _rows(sink)
    overlap = key_overlap(DeltaTable(sink.path(REF, "consolidated"))
                          .get_add_actions(flatten=True), "id")
    assert overlap.fraction > 0.5 and overlap.overlapping_files >= 2

    result = sink.maintain(REF, "consolidated")

    assert result.clustered
    assert result.to_dict()["clustered"] is True
    assert _rows(sink) == before  # exactly the same rows, every column
    assert sink.applied_version(REF, "consolidated") == 10
    files = _files(sink)
    for ids_in_file in files:
        assert ids_in_file == sorted(ids_in_file)
    ranges = sorted((min(f), max(f)) for f in files)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges
    after = key_overlap(DeltaTable(sink.path(REF, "consolidated"))
                        .get_add_actions(flatten=True), "id")
    assert after.overlapping_files == 0
    # clustered now: the next upkeep bin-packs (nothing to sort), and writes go on
    assert not sink.maintain(REF, "consolidated").clustered
    write(sink, [{"_cdc_op": "U", "id": ids[1], "v": "later"}], 11)
    assert {r["id"]: r["v"] for r in _rows(sink)}[ids[1]] == "later"


def test_disjoint_files_and_change_logs_are_bin_packed(tmp_path: Path) -> None:
    sink = DeltaSink(str(tmp_path / "dest"), source="src1",
                     maintenance=DeltaMaintenance(vacuum_retention_hours=None))
    for lsn in range(1, 5):  # ascending keys: each file its own range
        write(sink, [{"_cdc_op": "I", "id": lsn * 10 + i, "v": "x"} for i in range(5)], lsn)
    result = sink.maintain(REF, "consolidated")
    assert not result.clustered
    assert (result.files_removed, result.files_added) == (4, 1)


def test_cluster_key_and_overlap_measure() -> None:
    assert cluster_key({"delta.dataSkippingStatsColumns": "`id`,`_cdc_lsn`"}) == "id"
    assert cluster_key({"delta.dataSkippingStatsColumns": "`a,b`,`_cdc_lsn`"}) == "a,b"
    assert cluster_key({"delta.dataSkippingStatsColumns": "`a`,`b`,`_cdc_lsn`"}) is None
    assert cluster_key({}) is None
    actions = pa.table({"size_bytes": [10, 10, 10, 10], "min.id": [0, 5, 20, 30],
                        "max.id": [9, 6, 25, None]})
    overlap = key_overlap(actions, "id")
    # [0,9] and [5,6] overlap; [20,25] stands alone; no statistics: cannot be pruned
    assert (overlap.files, overlap.overlapping_files, overlap.fraction) == (4, 3, 0.75)
    parted = pa.table({"size_bytes": [10, 10], "min.id": [0, 0], "max.id": [9, 9],
                       "partition.day": ["a", "b"]})
    assert key_overlap(parted, "id").overlapping_files == 0  # ranges compare per partition


def test_random_string_keys_keep_their_arrival_order(tmp_path: Path) -> None:
    """Sorting by a UUID-like key would spread the newest rows over every file: not done."""
    sink = DeltaSink(str(tmp_path / "dest"), source="src1",
                     maintenance=DeltaMaintenance(vacuum_retention_hours=None))
    schema = pa.schema([("id", pa.string()), ("v", pa.string()), *ENGINE])
    rng = random.Random(3)
    for lsn in range(1, 5):
        rows = [{"_cdc_op": "I", "id": f"{rng.getrandbits(64):016x}", "v": "x"}
                for _ in range(20)]
        sink.write_consolidated(REF, changes(rows, lsn, schema), key=["id"], version=lsn)
    overlap = key_overlap(DeltaTable(sink.path(REF, "consolidated"))
                          .get_add_actions(flatten=True), "id")
    assert overlap.fraction > 0.5
    result = sink.maintain(REF, "consolidated")
    assert not result.clustered
    assert (result.files_removed, result.files_added) == (4, 1)  # bin-packed
    assert sorts_by_arrival(pa.int32()) and sorts_by_arrival(pa.timestamp("us"))
    assert not sorts_by_arrival(pa.string())

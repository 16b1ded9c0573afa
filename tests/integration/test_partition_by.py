"""Per-table `partition_by`: the consolidated table is a partitioned Delta table, snapshot and
stream land in the right partitions, an update that changes the partition column moves the
row, and a wrong setting is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cdc_util import source_for
from deltalake import DeltaTable
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import ConfigError
from cdcengine.names import TableRef
from cdcengine.sink.base import SinkSchemaError


def _files_by_day(src: SourceConfig, table: str) -> dict[str, set[int]]:
    """Partition folder → ids of the rows stored in its files (soft-deleted included)."""
    dt = DeltaTable(src.destination + TableRef.parse(table).delta_path(""))
    out: dict[str, set[int]] = {}
    for uri in dt.file_uris():
        folder = Path(uri).parent.name
        ids = pq.read_table(uri, columns=["id"]).column("id").to_pylist()
        out.setdefault(folder, set()).update(ids)
    return out


def test_partitioned_consolidated_table_end_to_end(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE ev (id int PRIMARY KEY, day date NOT NULL, v text);"
               "INSERT INTO ev SELECT i, DATE '2026-01-01' + (i % 2), 'v' || i"
               " FROM generate_series(1, 20) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["ev"], flush_interval_ms=200,
                     table={"public.ev": {"partition_by": ["day"]}})
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(live_rows(src, "ev")) == 20)
        db.execute("UPDATE ev SET day = DATE '2026-01-05', v = 'moved' WHERE id = 2;"
                   "UPDATE ev SET v = 'same day' WHERE id = 3;"
                   "INSERT INTO ev VALUES (100, DATE '2026-01-05', 'new');"
                   "DELETE FROM ev WHERE id = 4")
        wait_for(lambda: 100 in live_rows(src, "ev") and 4 not in live_rows(src, "ev"))
    rows = live_rows(src, "ev")
    source = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, day, v FROM ev")}
    assert {k: (r["day"], r["v"]) for k, r in rows.items()} == source
    dt = DeltaTable(src.destination + TableRef.parse("public.ev").delta_path(""))
    assert dt.metadata().partition_columns == ["day"]
    folders = _files_by_day(src, "public.ev")
    # the moved row lives only in its new partition; the unmoved ones stayed where they were
    assert 2 in folders["day=2026-01-05"]
    assert 2 not in folders.get("day=2026-01-03", set()) | folders["day=2026-01-01"]
    assert 100 in folders["day=2026-01-05"]
    assert 3 in folders["day=2026-01-02"]
    assert 4 in folders["day=2026-01-01"]  # soft-deleted: kept with its last values
    # every row exactly once over all partitions
    stored = [i for ids in folders.values() for i in ids]
    assert sorted(stored) == sorted(set(stored)) and len(stored) == 21


def test_partition_column_missing_is_refused_with_the_reason(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE ev (id int PRIMARY KEY, v text); INSERT INTO ev VALUES (1, 'a')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["ev"], flush_interval_ms=200,
                     table={"public.ev": {"partition_by": ["day"]}})
    api.enable_cdc(src, state=state)
    running = Running(src, state)
    running.thread.start()
    running.thread.join(120)
    assert not running.thread.is_alive()
    assert isinstance(running.error, SinkSchemaError)
    assert not running.error.retryable
    assert "partition_by column 'day' of public.ev is not among its captured columns" \
        in running.error.message
    # nothing half-made: no Delta table was created
    assert not (tmp_path / "lake" / "public" / "ev").exists()


@pytest.mark.parametrize(("override", "message"), [
    ({"partition_by": ["day"], "mode": "append"}, "mode 'append' writes none"),
    ({"partition_by": "day"}, "must be a non-empty list of column names"),
    ({"partition_by": []}, "must be a non-empty list of column names"),
    ({"partition_by": ["_cdc_lsn"]}, "reserved prefix _cdc_"),
    ({"partition_by": ["day"], "columns": ["id", "v"]}, "'day' is not captured"),
    ({"partition_by": ["a", "b", "c"]}, "use one (or two) coarse columns"),
    ({"partition_by": ["day", "Day"]}, "differ only in case"),
])
def test_partition_by_config_errors(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SourceConfig(name="s", dsn="postgresql://u@h/d", tables=["public.ev"],
                     destination="/tmp/lake", table={"public.ev": override})
    assert "table.public.ev.partition_by" in str(caught.value)
    assert message in str(caught.value)


def test_partition_by_survives_with_tables() -> None:
    src = SourceConfig(name="s", dsn="postgresql://u@h/d", tables=["public.ev"],
                       destination="/tmp/lake", table={"public.ev": {"partition_by": ["day"]}})
    again = src.with_tables(src.table_configs)
    assert again.table_configs[0].partition_by == ("day",)

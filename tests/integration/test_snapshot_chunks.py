"""Chunked, parallel, resumable snapshots (SPEC §8): exact under concurrent writes and kill -9."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cdc_util import (
    TransactionLoop,
    crash_at,
    daemon_config,
    query,
    source_for,
    start_daemon,
    store,
)
from test_append import replay_matches_consolidated
from test_pipeline import Running, wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.pipeline.snapshots import snapshot_table
from cdcengine.sink.delta import DeltaSink
from cdcengine.source.registry import adapter_for
from cdcengine.state.base import ChunkState, TableState
from cdcengine_postgres.replication.snapshot import TableSnapshot


class Writer(TransactionLoop):
    """Small transactions (insert, update, delete, key change) on `table` until stopped."""

    def __init__(self, dsn: str, table: str, *, first_id: int, top: int, seed: int = 7) -> None:
        super().__init__(dsn, seed)
        self.table, self.next_id, self.top = table, first_id, top

    def transaction(self, conn: psycopg.Connection[Any]) -> None:
        t = self.table
        for _ in range(self.rng.randint(1, 4)):
            k = self.rng.randint(1, self.top)
            choice = self.rng.random()
            self.next_id += 1
            if choice < 0.35:
                conn.execute(f"INSERT INTO {t} (id, v, note) VALUES (%s, 1, 'new')"
                             " ON CONFLICT DO NOTHING", [self.next_id])
            elif choice < 0.7:
                conn.execute(f"UPDATE {t} SET v = v + 1, note = note || 'u' "
                             "WHERE id = %s", [k])
            elif choice < 0.9:
                conn.execute(f"DELETE FROM {t} WHERE id = %s", [k])
            else:  # moves the row to another key range (another chunk)
                conn.execute(f"UPDATE {t} SET id = %s WHERE id = %s", [self.next_id, k])


def source_rows(dsn: str, table: str) -> dict[int, tuple[Any, ...]]:
    return {r[0]: tuple(r) for r in query(dsn, f"SELECT id, v, note FROM {table}")}


def delta_rows(src: SourceConfig, table: str) -> dict[int, tuple[Any, ...]]:
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef.parse(table)
    if sink.applied_version(ref, "consolidated") is None:
        return {}
    rows = sink.read_table(ref, "consolidated").to_pylist()
    live = [r for r in rows if not r["_cdc_deleted"]]
    out = {r["id"]: (r["id"], r["v"], r["note"]) for r in live}
    assert len(out) == len(live), "a key is in the Delta table twice"
    return out


def all_rows(src: SourceConfig, table: str) -> int:
    sink = DeltaSink(src.destination, source=src.name)
    return len(sink.read_table(TableRef.parse(table), "consolidated"))


def seed(db: Any, table: str, n: int, *, partitioned: bool = False) -> None:
    if partitioned:
        db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v int, note text) "
                   "PARTITION BY RANGE (id);"
                   f"CREATE TABLE {table}_a PARTITION OF {table} FOR VALUES FROM (MINVALUE) "
                   f"TO ({n // 3});"
                   f"CREATE TABLE {table}_b PARTITION OF {table} FOR VALUES FROM ({n // 3}) "
                   f"TO ({2 * n // 3});"
                   f"CREATE TABLE {table}_c PARTITION OF {table} FOR VALUES FROM ({2 * n // 3}) "
                   "TO (MAXVALUE)")
    else:
        db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v int, note text)")
    db.execute(f"INSERT INTO {table} SELECT i, i % 97, 'row ' || i "
               f"FROM generate_series(1, {n}) i; ANALYZE {table}")


def test_planning_cuts_key_ranges_per_leaf_from_statistics(db, tmp_path: Path) -> None:
    seed(db, "p", 30_000, partitioned=True)
    db.execute("CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small VALUES (1), (2);"
               "CREATE TABLE odd (flag bool, id int, v int, note text, PRIMARY KEY (flag, id));"
               "INSERT INTO odd SELECT i % 2 = 0, i, i, 'x' FROM generate_series(1, 5000) i;"
               "CREATE TABLE fresh (id text PRIMARY KEY);"  # never analyzed: sampled
               "INSERT INTO fresh SELECT 'k' || i FROM generate_series(1, 20000) i")
    src = source_for(db.dsn, tmp_path, ["p", "small", "odd", "fresh"])
    with TableSnapshot(src, src.table_config("p")) as snap:
        layout = snap.layout()
        assert layout.chunk_key == "id"
        assert layout.leaves == ("public.p_a", "public.p_b", "public.p_c")
        plan = snap.plan(2_000)
        assert [c.id for c in plan] == list(range(len(plan)))
        assert {c.leaf for c in plan} == set(layout.leaves)
        assert len(plan) >= 12
        snap.open_workers(2)
        seen = [r["id"] for c in plan for piece in snap.copy_chunk(c, worker=c.id % 2)
                for r in piece.to_pylist()]
        assert sorted(seen) == list(range(1, 30_001))  # no gap, no overlap
    with TableSnapshot(src, src.table_config("small")) as snap:
        assert len(snap.plan(2_000)) == 1
    with TableSnapshot(src, src.table_config("odd")) as snap:
        assert snap.layout().chunk_key is None  # a boolean key orders nothing useful
        assert [(c.lo, c.hi) for c in snap.plan(100)] == [(None, None)]
    with TableSnapshot(src, src.table_config("fresh"), piece_rows=1_000) as snap:
        plan = snap.plan(4_000)
        assert len(plan) >= 3
        pieces = [p for c in plan for p in snap.copy_chunk(c)]
        assert max(p.num_rows for p in pieces) <= 1_000  # bounded pieces
        assert sum(p.num_rows for p in pieces) == 20_000


def test_parallel_chunked_snapshot_with_concurrent_writes_is_exact(db, tmp_path: Path) -> None:
    n = 200_000
    seed(db, "big", n)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["big"], flush_interval_ms=200,
                     snapshot_chunk_rows=10_000, snapshot_workers=2)
    api.enable_cdc(src, state=state)
    with Writer(db.dsn, "big", first_id=n, top=n) as writer, Running(src, state):
        wait_for(lambda: _table_state(tmp_path, src) == TableState.STREAMING, timeout=120)
        assert writer.transactions > 0  # the copy ran under concurrent writes
    with Running(src, state):
        wait_for(lambda: delta_rows(src, "big") == source_rows(db.dsn, "big"), timeout=120)
    with store(tmp_path) as st:
        chunks = st.list_snapshot_chunks(src.name, "public.big")
        progress = st.get_snapshot_progress(src.name, "public.big")
    assert len(chunks) >= 15
    assert {c.state for c in chunks} == {ChunkState.FINISHED}
    assert progress is not None
    assert progress.finished
    copied = sum(c.rows for c in chunks)  # the rows at C: the seed plus writes before it
    assert abs(copied - n) < 5_000
    assert progress.rows_done == progress.rows_total == copied
    assert progress.chunks_done == progress.chunks_total == len(chunks)
    assert progress.rows_per_s and progress.rows_per_s > 0


def _table_state(tmp_path: Path, src: SourceConfig) -> TableState | None:
    with store(tmp_path) as st:
        tables = st.list_tables(src.name)
    return tables[0].state if tables else None


def _run_until_chunks(src: SourceConfig, tmp_path: Path, table: str, chunks: int) -> Any:
    """snapshot_table stopped (as by a shutdown) once `chunks` chunks are committed."""
    sink = DeltaSink(src.destination, source=src.name)
    stop = threading.Event()
    original = sink.write_snapshot_chunk
    committed = [0]

    def write(*args: Any, **kw: Any) -> int:
        rows = original(*args, **kw)
        committed[0] += 1
        if committed[0] >= chunks:
            stop.set()
        return rows

    sink.write_snapshot_chunk = write  # type: ignore[method-assign]
    with store(tmp_path) as st:
        return snapshot_table(adapter_for(src), src, src.table_config(table), sink, st,
                              stop=stop, workers=1)


def test_interrupted_snapshot_resumes_missing_chunks_only(db, tmp_path: Path) -> None:
    seed(db, "r", 40_000)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["r"], snapshot_chunk_rows=5_000, table_mode="both")
    api.enable_cdc(src, state=state)
    first = _run_until_chunks(src, tmp_path, "r", 3)
    assert not first.finished
    assert first.chunks_copied == 3
    db.execute("UPDATE r SET v = -1 WHERE id % 1000 = 0; DELETE FROM r WHERE id % 777 = 0;"
               "INSERT INTO r VALUES (50000, 5, 'late')")
    with store(tmp_path) as st:
        second = snapshot_table(adapter_for(src), src, src.table_config("r"),
                                DeltaSink(src.destination, source=src.name), st)
    assert second.finished
    assert second.resumed
    assert second.chunks_copied == second.chunks_total - 3
    assert 0 < second.rows_copied < 40_000 - first.rows_copied + 100
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef("public", "r")
    # the table replays its changes from the earliest chunk's point: before the late writes
    assert sink.applied_version(ref, "consolidated") < second.version + 1
    log = sink.read_table(ref, "append")
    positions = list(zip(log.column("_cdc_lsn").to_pylist(), log.column("_cdc_seq").to_pylist(),
                         strict=True))
    assert len(positions) == len(set(positions))
    assert 39_900 < len(positions) < 40_000  # the later chunks saw the deletes, not the insert
    with Running(src, state):
        wait_for(lambda: delta_rows(src, "r") == source_rows(db.dsn, "r"), timeout=60)
        wait_for(lambda: replay_log(src, "r") == source_rows(db.dsn, "r"), timeout=30)


@pytest.mark.parametrize("landed", ["append", "consolidated"])
def test_a_chunk_committed_to_one_of_both_tables_is_mirrored_into_the_other(
    db, tmp_path: Path, landed: str
) -> None:
    """The process dies between a chunk's two commits (`both`): the resumed snapshot gives the
    other Delta table that chunk from the one holding it, at the same point, so the change
    log's R rows and the consolidated rows agree (SPEC §5) and replaying the log is exact."""
    seed(db, "r", 12_000)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["r"], snapshot_chunk_rows=4_000, table_mode="both",
                     flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    sink = DeltaSink(src.destination, source=src.name)
    stop = threading.Event()
    original = sink.write_snapshot_chunk
    calls = [0]

    def write(ref: TableRef, kinds: Any, *args: Any, **kw: Any) -> int:
        calls[0] += 1
        if calls[0] == 2:  # the second chunk reaches one table only, then the process "dies"
            stop.set()
            return original(ref, [landed], *args, **kw)
        return original(ref, kinds, *args, **kw)

    sink.write_snapshot_chunk = write  # type: ignore[method-assign]
    with store(tmp_path) as st:
        first = snapshot_table(adapter_for(src), src, src.table_config("r"), sink, st,
                               stop=stop, workers=1)
    assert not first.finished
    ref = TableRef("public", "r")
    fresh = DeltaSink(src.destination, source=src.name)
    (point,) = set(fresh.read_table(ref, landed).column("_cdc_lsn").to_pylist())
    db.execute("UPDATE r SET v = -1 WHERE id % 100 = 0; DELETE FROM r WHERE id % 777 = 0")
    with store(tmp_path) as st:
        second = snapshot_table(adapter_for(src), src, src.table_config("r"), fresh, st)
    assert second.finished and second.resumed
    assert second.chunks_copied == second.chunks_total - 2
    consolidated = fresh.read_table(ref, "consolidated").to_pylist()
    log = fresh.read_table(ref, "append").to_pylist()
    # the two chunks of the first run are at its point in both tables, each key once
    assert sum(r["_cdc_lsn"] == point for r in consolidated) \
        == sum(r["_cdc_lsn"] == point for r in log) > 4_000
    assert len({r["id"] for r in log}) == len(log) == len(consolidated)
    positions = {(r["_cdc_lsn"], r["_cdc_seq"]) for r in log}
    assert len(positions) == len(log)
    with Running(src, state):
        # a change after the resumed run's point, so the log replays as of a point past it
        db.execute("INSERT INTO r VALUES (90000, 1, 'after')")
        wait_for(lambda: delta_rows(src, "r") == source_rows(db.dsn, "r"), timeout=60)
        wait_for(lambda: replay_log(src, "r") == source_rows(db.dsn, "r"), timeout=30)
    replay_matches_consolidated(src, "public.r", ["id"])


def replay_log(src: SourceConfig, table: str) -> dict[int, tuple[Any, ...]]:
    """The change log applied in (_cdc_lsn, _cdc_seq) order."""
    sink = DeltaSink(src.destination, source=src.name)
    rows = sink.read_table(TableRef.parse(table), "append").to_pylist()
    state: dict[int, tuple[Any, ...]] = {}
    for r in sorted(rows, key=lambda r: (r["_cdc_lsn"], r["_cdc_seq"])):
        if r["_cdc_op"] == "D":
            state.pop(r["id"], None)
        elif r["_cdc_op"] != "T":
            state[r["id"]] = (r["id"], r["v"], r["note"])
    return state


def test_keyless_table_restarts_whole(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE nk (flag bool, id int, v int, note text, PRIMARY KEY (flag, id))"
               " PARTITION BY LIST (flag);"
               "CREATE TABLE nk_t PARTITION OF nk FOR VALUES IN (true);"
               "CREATE TABLE nk_f PARTITION OF nk FOR VALUES IN (false);"
               "INSERT INTO nk SELECT i % 2 = 0, i, i, 'x' FROM generate_series(1, 6000) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["nk"], snapshot_chunk_rows=1_000)
    api.enable_cdc(src, state=state)
    first = _run_until_chunks(src, tmp_path, "nk", 1)
    assert not first.finished
    assert first.chunks_copied == 1  # one chunk per leaf: no usable key
    with store(tmp_path) as st:
        second = snapshot_table(adapter_for(src), src, src.table_config("nk"),
                                DeltaSink(src.destination, source=src.name), st)
    assert second.finished
    assert not second.resumed
    assert second.rows_copied == 6000  # restarted whole
    assert all_rows(src, "nk") == 6000  # the partial load was overwritten, not duplicated


def test_partitioned_table_is_copied_per_leaf_into_the_roots_table(db, tmp_path: Path) -> None:
    n = 30_000
    seed(db, "pt", n, partitioned=True)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["pt"], flush_interval_ms=200,
                     snapshot_chunk_rows=4_000, snapshot_workers=2)
    api.enable_cdc(src, state=state)
    with Writer(db.dsn, "pt", first_id=n, top=n), Running(src, state):
        wait_for(lambda: _table_state(tmp_path, src) == TableState.STREAMING, timeout=60)
    with Running(src, state):
        wait_for(lambda: delta_rows(src, "pt") == source_rows(db.dsn, "pt"), timeout=60)
    with store(tmp_path) as st:
        chunks = st.list_snapshot_chunks(src.name, "public.pt")
    assert {c.leaf for c in chunks} == {"public.pt_a", "public.pt_b", "public.pt_c"}
    assert len(chunks) >= 6
    assert not DeltaSink(src.destination, source=src.name).exists(
        TableRef("public", "pt_a"), "consolidated")


# ---- kill -9 mid-snapshot ------------------------------------------------------------------------
def _config(tmp_path: Path, src: SourceConfig, state: str) -> Path:
    return daemon_config(tmp_path, src, state, ["public.kill"], json_logs=True,
                         table_mode="both", flush_interval_ms=100, snapshot_chunk_rows=8000,
                         snapshot_workers=2)


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


@pytest.mark.slow
def test_kill_9_mid_snapshot_resumes_from_finished_chunks(db, tmp_path: Path) -> None:
    n = 120_000
    seed(db, "kill", n)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.kill"], table_mode="both")
    api.enable_cdc(src, state=state)
    cfg = _config(tmp_path, src, state)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with Writer(db.dsn, "kill", first_id=n, top=n, seed=11):
        crash_at(cfg, first_log, "snapshot_chunk_committed:4")
        daemon = start_daemon(cfg, second_log)
        try:
            wait_for(lambda: bool(_events(second_log, "table_snapshotted")), timeout=120)
        except BaseException:
            daemon.kill()
            raise
    try:
        wait_for(lambda: delta_rows(src, "kill") == source_rows(db.dsn, "kill"), timeout=120)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, second_log.read_text()[-3000:]
    committed_before = _events(first_log, "snapshot_chunk_committed")
    assert len(committed_before) >= 4
    (resumed,) = _events(second_log, "snapshot_resumed")
    assert resumed["chunks_remaining"] < resumed["chunks"]
    (done,) = _events(second_log, "table_snapshotted")
    assert done["resumed"] is True
    assert 0 < done["rows"] < n  # only the missing chunks were copied again
    assert done["chunks_copied"] == resumed["chunks_remaining"]
    # the change log holds every snapshot row and change once
    sink = DeltaSink(src.destination, source=src.name)
    log = sink.read_table(TableRef("public", "kill"), "append")
    positions = list(zip(log.column("_cdc_lsn").to_pylist(), log.column("_cdc_seq").to_pylist(),
                         strict=True))
    assert len(positions) == len(set(positions))

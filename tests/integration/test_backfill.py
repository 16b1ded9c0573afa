"""A table added to a running source, a resync and a mode change are snapshotted beside the
stream (SPEC §8): the other tables keep streaming meanwhile, and the result is exact."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog.testing
from cdc_util import (
    daemon_config,
    logs_on_failure,
    query,
    source_for,
    start_daemon,
    store,
)
from cli_util import run_cli
from test_append import replay_matches_consolidated
from test_pipeline import Running, wait_for
from test_snapshot_chunks import Writer, _events, delta_rows, seed, source_rows

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.control import history
from cdcengine.lsn import parse_lsn
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine.source.adapter import SnapshotStopped
from cdcengine.source.registry import adapter_for
from cdcengine.state.base import TableState
from cdcengine_postgres.control.slots import temp_slot_name
from cdcengine_postgres.replication import snapshot as pg_snapshot


@contextlib.contextmanager
def open_transaction(dsn: str) -> Iterator[None]:
    """A transaction holding an xid: creating a snapshot slot waits until it ends, so a table
    snapshot started meanwhile is stuck at its very start (the stream is not)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT txid_current()")
        yield
        conn.rollback()


def state_of(tmp_path: Path, src: SourceConfig, table: str) -> TableState | None:
    found = {t.name: t.state for t in store(tmp_path).list_tables(src.name)}
    return found.get(table)


def confirmed_flush(dsn: str, slot: str) -> int:
    return parse_lsn(query(dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                                " WHERE slot_name = %s", [slot])[0][0])


def streams_meanwhile(db, src: SourceConfig, table: str, first_id: int) -> None:
    """Rows written to `table` now reach its Delta table (while something else waits)."""
    db.execute(f"INSERT INTO {table} SELECT i, 0, 'meanwhile' "
               f"FROM generate_series({first_id}, {first_id + 99}) i")
    wait_for(lambda: all(i in delta_rows(src, table) for i in (first_id, first_id + 99)),
             timeout=30)


def test_a_table_added_while_streaming_loads_beside_the_stream(db, tmp_path: Path) -> None:
    seed(db, "o", 1000)
    seed(db, "n", 20_000)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.o"], flush_interval_ms=100,
                     snapshot_chunk_rows=4000)
    api.enable_cdc(src, state=state)
    wider = src.with_tables([*src.table_configs, dataclasses.replace(
        src.table_configs[0], ref=TableRef("public", "n"))])
    with Running(src, state):
        wait_for(lambda: len(delta_rows(src, "o")) == 1000)
        with Writer(db.dsn, "n", first_id=100_000, top=20_000, seed=3), \
                open_transaction(db.dsn):
            # `enable` on a running source: the publication and the registration now have n
            res = api.enable_cdc(wider, state=state)
            assert res.already_enabled and res.daemon_running and res.added == ("public.n",)
            wait_for(lambda: state_of(tmp_path, src, "public.n") is TableState.SNAPSHOTTING)
            # n's snapshot is stuck at its start; the stream is not, and it confirms nothing
            held_at = confirmed_flush(db.dsn, src.slot_name)
            streams_meanwhile(db, src, "o", 10_000)
            streams_meanwhile(db, src, "o", 20_000)
            assert state_of(tmp_path, src, "public.n") is TableState.SNAPSHOTTING
            assert DeltaSink.for_source(src).applied_version(TableRef("public", "n"),
                                                             "consolidated") is None
            assert confirmed_flush(db.dsn, src.slot_name) == held_at
        wait_for(lambda: state_of(tmp_path, src, "public.n") is TableState.STREAMING,
                 timeout=60)
        streams_meanwhile(db, src, "n", 300_000)
        streams_meanwhile(db, src, "o", 30_000)
        # the slot moves again once the snapshot is in
        wait_for(lambda: confirmed_flush(db.dsn, src.slot_name) > held_at)
        wait_for(lambda: delta_rows(src, "n") == source_rows(db.dsn, "n"), timeout=60)
        assert delta_rows(src, "o") == source_rows(db.dsn, "o")


def test_a_snapshot_held_up_by_a_transaction_names_it_and_stops_on_request(
    db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction left open (in any database) holds a snapshot's start up: the engine says
    which backend it waits for, a stop ends the wait, and no temporary slot is left behind."""
    seed(db, "w", 10)
    src = source_for(db.dsn, tmp_path, ["public.w"])
    monkeypatch.setattr(pg_snapshot, "WAIT_REPORT_S", 0.5)
    adapter, table = adapter_for(src), src.table_configs[0]
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def enter() -> None:
        try:
            with adapter.snapshot(src, table, stop=stop):
                outcome["entered"] = True
        except SnapshotStopped as exc:
            outcome["stopped"] = exc

    with psycopg.connect(db.dsn) as holder, structlog.testing.capture_logs() as logs:
        holder.execute("SELECT txid_current()")
        waiting = threading.Thread(target=enter)
        waiting.start()
        wait_for(lambda: any(e["event"] == "snapshot_waiting_for_transactions" for e in logs),
                 timeout=20)
        stop.set()
        waiting.join(10)
        assert not waiting.is_alive() and set(outcome) == {"stopped"}
        report = next(e for e in logs if e["event"] == "snapshot_waiting_for_transactions")
        assert report["table"] == "public.w" and report["waited_s"] >= 0
        assert any(f"pid {holder.info.backend_pid} " in b for b in report["blockers"]), report
        holder.rollback()
    assert query(db.dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                 [temp_slot_name(src.slot_name, "snapshot")])[0][0] == 0
    with adapter.snapshot(src, table) as snap:  # nothing in the way: it starts at once
        assert snap.consistent_point > 0


def test_a_daemon_stops_promptly_while_a_snapshot_waits_for_a_transaction(
    db, tmp_path: Path
) -> None:
    seed(db, "o", 100)
    seed(db, "n", 100)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.o"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    wider = src.with_tables([*src.table_configs, dataclasses.replace(
        src.table_configs[0], ref=TableRef("public", "n"))])
    with contextlib.ExitStack() as held:
        with Running(src, state):
            wait_for(lambda: len(delta_rows(src, "o")) == 100)
            held.enter_context(open_transaction(db.dsn))  # open until after the stop
            api.enable_cdc(wider, state=state)
            wait_for(lambda: state_of(tmp_path, src, "public.n") is TableState.SNAPSHOTTING)
            stopping = time.monotonic()
        # the held-up snapshot did not keep the daemon from stopping, and left no slot
        assert time.monotonic() - stopping < 15
        assert query(db.dsn, "SELECT count(*) FROM pg_replication_slots WHERE temporary"
                             " AND database = current_database()")[0][0] == 0
    with Running(wider, state):  # the transaction is over: the next daemon loads n
        wait_for(lambda: delta_rows(src, "n") == source_rows(db.dsn, "n"), timeout=60)


def test_resync_under_load_keeps_the_other_tables_streaming(db, tmp_path: Path) -> None:
    seed(db, "r", 8000)
    seed(db, "o", 100)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.r", "public.o"], table_mode="both",
                     flush_interval_ms=100, snapshot_chunk_rows=2000)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: len(delta_rows(src, "r")) == 8000 and len(delta_rows(src, "o")) == 100)
        with Writer(db.dsn, "r", first_id=50_000, top=8000, seed=5), open_transaction(db.dsn):
            res = api.resync_table(src, "public.r", state=state)
            assert res.queued and res.daemon_running
            wait_for(lambda: state_of(tmp_path, src, "public.r") is TableState.SNAPSHOTTING)
            streams_meanwhile(db, src, "o", 1000)
            assert state_of(tmp_path, src, "public.r") is TableState.SNAPSHOTTING
        wait_for(lambda: state_of(tmp_path, src, "public.r") is TableState.STREAMING,
                 timeout=60)
        streams_meanwhile(db, src, "r", 200_000)
        wait_for(lambda: delta_rows(src, "r") == source_rows(db.dsn, "r"), timeout=60)
        assert delta_rows(src, "o") == source_rows(db.dsn, "o")
    replay_matches_consolidated(src, "public.r", ["id"])
    log = DeltaSink.for_source(src).read_table(TableRef("public", "r"), "append")
    assert "R" in set(log.column("_cdc_op").to_pylist())


def test_mode_switch_and_removal_while_streaming(db, tmp_path: Path) -> None:
    """`enable` with `a` switched to both and `b` removed, on a running source: a's change log
    is backfilled from a snapshot beside the stream, b stops being written, c streams on."""
    for t in ("a", "b", "c"):
        seed(db, t, 2000)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.a", "public.b", "public.c"],
                     flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    a, _, c = src.table_configs
    changed = src.with_tables([dataclasses.replace(a, mode="both"), c])  # type: ignore[arg-type]
    with Running(src, state):
        wait_for(lambda: all(len(delta_rows(src, t)) == 2000 for t in ("a", "b", "c")))
        with Writer(db.dsn, "a", first_id=10_000, top=2000, seed=9), open_transaction(db.dsn):
            res = api.enable_cdc(changed, state=state)
            assert (res.removed, res.changed, res.added) == (("public.b",), ("public.a",), ())
            wait_for(lambda: state_of(tmp_path, src, "public.a") is TableState.SNAPSHOTTING)
            assert state_of(tmp_path, src, "public.b") is None  # no longer registered
            streams_meanwhile(db, src, "c", 5000)
            db.execute("INSERT INTO b VALUES (9999, 0, 'after removal')")
        wait_for(lambda: state_of(tmp_path, src, "public.a") is TableState.STREAMING,
                 timeout=60)
        streams_meanwhile(db, src, "a", 100_000)
        wait_for(lambda: delta_rows(src, "a") == source_rows(db.dsn, "a"), timeout=60)
        streams_meanwhile(db, src, "c", 6000)
    assert 9999 not in delta_rows(src, "b")  # b's Delta table stays as it was
    assert len(delta_rows(src, "b")) == 2000
    assert query(db.dsn, "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s"
                         " AND tablename = 'b'", [src.publication_name])[0][0] == 0
    # the change log starts at its own snapshot point (R rows stamped C): replaying it gives
    # the consolidated table's values
    sink = DeltaSink.for_source(src)
    ref = TableRef("public", "a")
    replayed = history.as_of(sink.dataset(ref, "append"), ["id"],
                             sink.applied_version(ref, "consolidated") or 0)
    assert {r["id"]: (r["id"], r["v"], r["note"]) for r in replayed.to_pylist()} \
        == delta_rows(src, "a")


SETTINGS: dict[str, str | int] = {"table_mode": "both", "flush_interval_ms": 100,
                                  "snapshot_chunk_rows": 6000, "snapshot_workers": 2}


@pytest.mark.slow
def test_kill_9_mid_background_snapshot_resumes_it(db, tmp_path: Path) -> None:
    """The daemon dies while a table added to it is half copied (others streaming); the next
    daemon resumes that snapshot from its finished chunks, and everything ends exact."""
    n = 60_000
    seed(db, "o", 500)
    seed(db, "big", n)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.o"], table_mode="both")
    api.enable_cdc(src, state=state)
    cfg = daemon_config(tmp_path, src, state, ["public.o"], json_logs=True, **SETTINGS)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    # o's own snapshot is one chunk: the 4th committed chunk is big's 3rd
    crashing = start_daemon(cfg, first_log, "snapshot_chunk_committed:4")
    daemon = None
    # the waits add up to less than the test timeout: a stuck daemon fails with its logs
    with logs_on_failure(first_log, second_log):
        try:
            wait_for(lambda: len(delta_rows(src, "o")) == 500, timeout=45)
            with Writer(db.dsn, "big", first_id=n, top=n, seed=13), \
                    Writer(db.dsn, "o", first_id=100_000, top=500, seed=14):
                cfg = daemon_config(tmp_path, src, state, ["public.o", "public.big"],
                                    json_logs=True, **SETTINGS)
                api.enable_cdc(src.with_tables([*src.table_configs, dataclasses.replace(
                    src.table_configs[0], ref=TableRef("public", "big"))]), state=state)
                crashing.wait(timeout=60)
                assert crashing.returncode == -signal.SIGKILL
                daemon = start_daemon(cfg, second_log)
                wait_for(lambda: bool(_events(second_log, "table_snapshotted")), timeout=60)
                streams_meanwhile(db, src, "o", 200_000)
            wait_for(lambda: delta_rows(src, "big") == source_rows(db.dsn, "big")
                     and delta_rows(src, "o") == source_rows(db.dsn, "o"), timeout=60)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        finally:
            for process in (crashing, daemon):
                if process is not None and process.poll() is None:
                    process.kill()
        assert daemon.returncode == 0
        (resumed,) = _events(second_log, "snapshot_resumed")
        assert 0 < resumed["chunks_remaining"] < resumed["chunks"]
        (done,) = _events(second_log, "table_snapshotted")
        assert done["resumed"] is True and 0 < done["rows"] < n
        assert _events(second_log, "backfill_started")  # beside the stream, not before it
    for table in ("public.big", "public.o"):
        replay_matches_consolidated(src, table, ["id"])


def test_cli_enable_adds_a_table_to_a_running_daemon(db, tmp_path: Path) -> None:
    """The user's way: edit `tables`, run `cdcengine enable` while `cdcengine run` runs."""
    seed(db, "o", 300)
    seed(db, "n", 700)
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.o"])
    cfg = daemon_config(tmp_path, src, state, ["public.o"], flush_interval_ms=100)
    assert run_cli(cfg, "enable").returncode == 0
    daemon = start_daemon(cfg, tmp_path / "daemon.log")
    try:
        wait_for(lambda: len(delta_rows(src, "o")) == 300, timeout=60)
        cfg = daemon_config(tmp_path, src, state, ["public.o", "public.n"],
                            flush_interval_ms=100)
        enable = run_cli(cfg, "enable")
        assert enable.returncode == 0, enable
        assert "tables added: public.n" in enable.stdout, enable
        assert "running daemon" in enable.stdout, enable
        wait_for(lambda: delta_rows(src, "n") == source_rows(db.dsn, "n"), timeout=60)
        streams_meanwhile(db, src, "n", 10_000)
        # a lost connection: the daemon reconnects, and the added table stays captured
        (pid,) = query(db.dsn, "SELECT active_pid FROM pg_replication_slots"
                               " WHERE slot_name = %s", [src.slot_name])[0]
        query(db.dsn, "SELECT pg_terminate_backend(%s)", [pid])
        wait_for(lambda: query(db.dsn, "SELECT active_pid FROM pg_replication_slots WHERE "
                                       "slot_name = %s", [src.slot_name])[0][0] not in (None, pid),
                 timeout=60)
        streams_meanwhile(db, src, "n", 20_000)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0

"""Network faults between the engine and PostgreSQL (issue 13), through a TCP proxy: the
connection cut, the connection stalled (no bytes either way, sockets open) for longer than the
replication timeout, and the walsender frozen with SIGSTOP. Each is detected, reconnected and
survived exactly: under a steady workload, every committed transaction reaches the change log
once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cdc_util import query, source_for
from netproxy import TcpProxy
from structlog.testing import capture_logs
from test_reconnect import Workload, assert_each_once

from cdcengine import api
from cdcengine.serve import runner
from cdcengine.serve.runner import SourceRunner

TIMEOUT_S = 3  # replication_timeout_s


def _walsender_pid(dsn: str, slot: str) -> int | None:
    rows = query(dsn, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [slot])
    return rows[0][0] if rows and rows[0][0] else None


def _wait_streaming(dsn: str, slot: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _walsender_pid(dsn, slot)
        if pid:
            return pid
        time.sleep(0.1)
    raise AssertionError("the engine did not stream again")


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_cut_stalled_and_frozen_connections_are_detected_and_survived_exactly(
        db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if db.server.host.startswith("/"):
        pytest.skip("the test server is reached over a unix socket: no TCP to proxy")
    db.execute("CREATE TABLE t (id bigserial PRIMARY KEY, xid bigint NOT NULL, n int)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    monkeypatch.setattr(runner, "BACKOFF_START_S", 0.2)
    with TcpProxy("127.0.0.1", db.server.port) as proxy:
        src = source_for(proxy.dsn(db.dsn), tmp_path, ["t"], table_mode="append",
                         flush_interval_ms=200, replication_timeout_s=TIMEOUT_S)
        api.enable_cdc(src, state=state)
        stop = threading.Event()
        run = SourceRunner(src, state, stop)
        thread = threading.Thread(target=run.run, daemon=True)
        work = Workload(db.dsn, pause_s=0.02)  # the workload goes straight to the server
        with capture_logs() as events:
            thread.start()
            try:
                work.thread.start()
                _wait_streaming(db.dsn, src.slot_name)
                # 1. cut, three times
                for _ in range(3):
                    time.sleep(1.5)
                    assert proxy.cut() >= 1
                    _wait_streaming(db.dsn, src.slot_name)
                # 2. stalled: nothing moves, the sockets stay open, for 3x the timeout
                time.sleep(1.5)
                proxy.stall()
                time.sleep(3 * TIMEOUT_S)
                proxy.resume()
                _wait_streaming(db.dsn, src.slot_name)
                # 3. the walsender frozen (SIGSTOP) for 3x the timeout
                time.sleep(1.5)
                pid = _walsender_pid(db.dsn, src.slot_name)
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
                try:
                    time.sleep(3 * TIMEOUT_S)
                finally:
                    os.kill(pid, signal.SIGCONT)
                new_pid = _wait_streaming(db.dsn, src.slot_name)
                time.sleep(1.5)
                expected, got = work.finish(src, timeout=90)
            finally:
                stop.set()
                run.wake()
                thread.join(60)
    assert new_pid != pid
    assert_each_once(expected, got)
    silent = [e for e in events if e["event"] == "source_reconnecting"
              and "nothing heard from the server" in e["message"]]
    assert len(silent) >= 2, [e.get("message") for e in events
                              if e["event"] == "source_reconnecting"]  # the stall, the freeze


class _Inserts:
    """One-row inserts on their own connection, reconnecting while the server restarts."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    while not self.stop.is_set():
                        conn.execute("INSERT INTO t (v) VALUES ('x')")
                        conn.execute("UPDATE t SET v = v || 'y' WHERE id = 1")
                        time.sleep(0.01)
            except psycopg.Error:
                time.sleep(0.2)  # the server is restarting


@pytest.mark.slow
@pytest.mark.timeout(280)
@pytest.mark.parametrize(("mode", "during"), [("fast", "stream"), ("immediate", "stream"),
                                              ("fast", "snapshot"), ("immediate", "snapshot")])
def test_postgres_restarted_mid_stream_or_snapshot_is_survived_exactly(
        make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
        during: str) -> None:
    """The daemon's runner rides through a server restart by itself (fast: a clean shutdown;
    immediate: a crash and WAL recovery), during streaming under a workload or during a
    chunked snapshot: the consolidated table equals the source, the change log holds every
    streamed insert once."""
    import psycopg

    from cdcengine.names import TableRef
    from cdcengine.sink.delta import DeltaSink

    cluster = make_cluster()
    dsn = cluster.dsn()
    rows = 300_000 if during == "snapshot" else 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v text NOT NULL)")
        conn.execute("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, %s) g",
                     [rows])
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(dsn, tmp_path, ["t"], table_mode="both", flush_interval_ms=100,
                     snapshot_chunk_rows=20_000, snapshot_workers=1)
    api.enable_cdc(src, state=state)
    monkeypatch.setattr(runner, "BACKOFF_START_S", 0.2)
    stop = threading.Event()
    run = SourceRunner(src, state, stop)
    thread = threading.Thread(target=run.run, daemon=True)
    work = _Inserts(dsn)
    sink = DeltaSink(src.destination, source=src.name)
    ref = TableRef.parse("t")

    def chunks_done() -> int:
        with api.open_store(state) as store:
            progress = store.get_snapshot_progress(src.name, "public.t")
        return 0 if progress is None else progress.chunks_done

    thread.start()
    try:
        if during == "snapshot":
            deadline = time.monotonic() + 120
            while chunks_done() < 2:
                assert time.monotonic() < deadline, "the snapshot did not start"
                time.sleep(0.05)
        else:
            deadline = time.monotonic() + 60
            while sink.applied_version(ref, "consolidated") is None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        work.thread.start()
        time.sleep(1.0)
        cluster.stop(mode=mode)  # type: ignore[arg-type]
        time.sleep(1.0)
        cluster.start()
        time.sleep(2.0)
        work.stop.set()
        work.thread.join(30)

        def same() -> bool:
            want = sorted(query(dsn, "SELECT id, v FROM t"))
            if sink.applied_version(ref, "consolidated") is None:
                return False
            got = sorted((r["id"], r["v"]) for r in sink.read_table(ref, "consolidated")
                         .select(["id", "v", "_cdc_deleted"]).to_pylist()
                         if not r["_cdc_deleted"])
            return got == want

        deadline = time.monotonic() + 180
        while not same():
            assert time.monotonic() < deadline, "Delta never caught up with the source"
            time.sleep(0.5)
    finally:
        work.stop.set()
        stop.set()
        run.wake()
        thread.join(60)
    assert run.outcome.restarts >= 1
    log = sink.read_table(ref, "append").select(["id", "_cdc_op", "_cdc_lsn", "_cdc_seq"])
    entries = log.to_pylist()
    assert len({(r["_cdc_lsn"], r["_cdc_seq"]) for r in entries}) == len(entries)
    inserted = [r["id"] for r in entries if r["_cdc_op"] == "I"]
    assert len(inserted) == len(set(inserted)), "an insert is in the change log twice"
    snapshot = {r["id"] for r in entries if r["_cdc_op"] == "R"}
    assert set(inserted) | snapshot == {r[0] for r in query(dsn, "SELECT id FROM t")}

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
from test_reconnect import Workload, _change_log

from cdcengine import api, runner
from cdcengine.runner import SourceRunner

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
                work.stop.set()
                work.thread.join(30)
                assert work.error is None, work.error
                expected = set(work.xids)
                got: list[dict[str, Any]] = []
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    got = _change_log(src)
                    if {r["xid"] for r in got} >= expected:
                        break
                    time.sleep(0.5)
            finally:
                stop.set()
                run.wake()
                thread.join(60)
    assert new_pid != pid
    missing = sorted(expected - {r["xid"] for r in got})
    assert not missing, f"{len(missing)} committed transactions never reached Delta"
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == 5 * len(expected), "a change is in the log twice"
    silent = [e for e in events if e["event"] == "source_reconnecting"
              and "nothing heard from the server" in e["message"]]
    assert len(silent) >= 2, [e.get("message") for e in events
                              if e["event"] == "source_reconnecting"]  # the stall, the freeze

"""The daemon's own monitor against the real server (SPEC §7, issue 6): a long-open source
transaction pinning restart_lsn, a settings change picked up while running, the auto-drop of
a streaming source's slot, a slot dropped behind the daemon's back (/health 503) and `repair`
while the daemon keeps running."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
from cdc_util import publication_exists, query, slot_exists, start_daemon
from cli_util import run_cli
from test_pipeline import live_rows, wait_for
from test_slot_health import _config, grow_wal, run_sql, same_as_source, setup

from cdcengine import api

MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def state_of(src: object, state: str) -> str:
    return api.cdc_status(src, state=state).state  # type: ignore[arg-type]


def test_daemon_monitor_sees_a_pinned_restart_lsn_and_auto_drops_after_settings(
        db, tmp_path: Path) -> None:
    src, state = setup(db, tmp_path, lag_warning_threshold_mb=2, lag_critical_threshold_mb=1000,
                       lag_check_interval_s=1)
    cfg = _config(tmp_path, state, [src])
    log = tmp_path / "daemon.log"
    daemon = start_daemon(cfg, log)
    try:
        wait_for(lambda: same_as_source(src), timeout=60)
        # an open transaction holding an xid pins restart_lsn; later transactions still stream
        # and are confirmed, so lag stays small while retained WAL grows
        with psycopg.connect(db.dsn) as pinning:
            pinning.execute("INSERT INTO items VALUES (1000, 'open')")
            grow_wal(db.dsn, src.slot_name, 3)
            db.execute("INSERT INTO items VALUES (1001, 'streamed')")
            wait_for(lambda: 1001 in live_rows(src, "items"), timeout=30)
            wait_for(lambda: state_of(src, state) == "warning", timeout=30)
            def pinned() -> bool:
                slot = api.cdc_status(src, state=state).slot
                return slot.lag_bytes < slot.retained_wal_bytes - MB  # type: ignore[operator]
            wait_for(pinned, timeout=30)  # (the confirmation follows the commit closely)
            st = api.cdc_status(src, state=state)
            assert st.slot.retained_wal_bytes >= 2 * MB, st.slot
            assert st.lag["level"] == "warning"
            assert slot_exists(db.dsn, src.slot_name)

            # the running daemon picks the new threshold up at its next check
            changed = run_cli(cfg, "settings", "--source", src.name, "--lag-critical-mb", "3")
            assert changed.returncode == 0, changed
            grow_wal(db.dsn, src.slot_name, 3.5)
            wait_for(lambda: state_of(src, state) == "broken", timeout=30)
            pinning.rollback()
        st = api.cdc_status(src, state=state)
        assert st.broken is not None and st.broken.reason == "auto_dropped_critical_lag"
        assert "critical threshold 3 MB" in st.broken.message
        assert not slot_exists(db.dsn, src.slot_name)
        assert not publication_exists(db.dsn, src.publication_name)
        assert daemon.poll() is None, "the daemon keeps running, waiting for repair"
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    text = log.read_text()
    assert daemon.returncode == 1, text[-3000:]  # a broken source never exits 0
    assert "slot_lag_warning" in text and "slot_auto_dropped" in text


def test_slot_dropped_behind_the_daemon_then_repaired_while_it_runs(db, tmp_path: Path
                                                                      ) -> None:
    src, state = setup(db, tmp_path, lag_check_interval_s=1)
    port = free_port()
    cfg = _config(tmp_path, state, [src], http_port=port)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(cfg, log)
    try:
        wait_for(lambda: same_as_source(src), timeout=60)
        wait_for(lambda: get(port, "/health")[0] == 200, timeout=30)
        # terminate the walsender and drop the slot in one go (it reconnects quickly)
        deadline = time.monotonic() + 30
        while slot_exists(db.dsn, src.slot_name):
            assert time.monotonic() < deadline
            run_sql(db.dsn, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                            " WHERE slot_name = %s AND active_pid IS NOT NULL", [src.slot_name])
            try:
                run_sql(db.dsn, "SELECT pg_drop_replication_slot(%s)", [src.slot_name])
            except psycopg.Error:
                time.sleep(0.05)
        db.execute("UPDATE items SET v = 'missed' WHERE id = 3")
        wait_for(lambda: get(port, "/health")[0] == 503, timeout=30)
        _code, body = get(port, "/health")
        problems = body["problems"]
        assert isinstance(problems, list) and problems[0]["reason"] == "slot_missing", body
        assert daemon.poll() is None

        repaired = run_cli(cfg, "repair", "--source", src.name)
        assert repaired.returncode == 0, repaired
        # the daemon's runner sees the marker gone, re-snapshots and streams again
        wait_for(lambda: get(port, "/health")[0] == 200, timeout=30)
        wait_for(lambda: same_as_source(src), timeout=60)
        assert live_rows(src, "items")[3]["v"] == "missed"
        db.execute("INSERT INTO items VALUES (500, 'after')")
        wait_for(lambda: same_as_source(src), timeout=60)
        jobs = run_cli(cfg, "jobs", "--source", src.name, "--json")
        assert jobs.returncode == 0, jobs
        runs = json.loads(jobs.stdout)["sources"][0]["runs"]
        # the run that lost its walsender ended failed with its reason; a new one streams
        assert runs[1]["status"] == "failed" and runs[1]["error_reason"], runs
        assert runs[0]["status"] == "running" and runs[0]["rows"].get("public.items"), runs
        assert query(db.dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s"
                             " AND active", [src.slot_name])[0][0] == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]


def test_two_daemons_on_one_postgresql_state_store_never_stream_the_same_source(
        db, tmp_path: Path) -> None:
    state = db.dsn + "?schema=cdcengine_state"
    src, _ = setup(db, tmp_path, state=state)
    cfg = _config(tmp_path, state, [src])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    first = start_daemon(cfg, logs[0])
    second = None
    try:
        wait_for(lambda: same_as_source(src), timeout=60)
        second = start_daemon(cfg, logs[1])
        wait_for(lambda: "source_standby" in logs[1].read_text(), timeout=30)
        for i in range(5):
            db.execute(f"INSERT INTO items VALUES ({200 + i}, 'while both run')")
            time.sleep(0.3)
            active = query(db.dsn, "SELECT count(*) FROM pg_stat_replication r JOIN"
                                   " pg_replication_slots s ON s.active_pid = r.pid"
                                   " WHERE s.slot_name = %s", [src.slot_name])[0][0]
            assert active <= 1
        wait_for(lambda: same_as_source(src), timeout=30)
        holder = api.cdc_status(src, state=state).lease
        assert holder is not None and holder["pid"] == first.pid, holder
        assert "snapshot_started" not in logs[1].read_text()

        # the streaming daemon dies without releasing its lease: the standby takes over (its
        # pid is gone on this host) and goes on exactly where Delta and the slot say
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        db.execute("UPDATE items SET v = 'after takeover' WHERE id = 7;"
                   "INSERT INTO items VALUES (300, 'after takeover')")
        wait_for(lambda: same_as_source(src), timeout=60)
        holder = api.cdc_status(src, state=state).lease
        assert holder is not None and holder["pid"] == second.pid, holder
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    assert second is not None and second.returncode == 0, logs[1].read_text()[-3000:]

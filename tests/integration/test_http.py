"""A real `cdcengine run` daemon process serving /health, /status and /metrics (SPEC §7).

Loopback only; each test picks a free port and passes it as `[engine] http_port`. Logs are
configured as JSON, and every line the daemon writes must be one JSON object.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cdc_util import start_daemon
from prometheus_client.parser import text_string_to_metric_families
from test_pipeline import live_rows, wait_for
from test_run_command import clean_env

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.state import open_state

Sample = tuple[str, tuple[tuple[str, str], ...]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_source(db: Any, tmp_path: Path, prefix: str, table: str) -> SourceConfig:
    # slot names are cluster-wide: make them unique to this test's database
    dbname = psycopg.conninfo.conninfo_to_dict(db.dsn)["dbname"]
    return SourceConfig(name=f"{prefix}_{str(dbname).lower()}", dsn=db.dsn, tables=[table],
                        destination=str(tmp_path / "lake" / prefix), flush_interval_ms=100)


def write_config(tmp_path: Path, sources: list[SourceConfig], state: str, port: int) -> Path:
    text = f'[engine]\nstate = "{state}"\nhttp_port = {port}\nlog_format = "json"\n'
    for src in sources:
        text += (f'[[source]]\nname = "{src.name}"\ndsn = "{src.dsn}"\n'
                 f'tables = {json.dumps([t.name for t in src.table_configs])}\n'
                 f'destination = "{src.destination}"\nflush_interval_ms = 100\n')
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text(text)
    return cfg


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def health(port: int) -> tuple[int, dict[str, Any]]:
    code, _, body = get(port, "/health")
    return code, json.loads(body)


def metrics(port: int) -> dict[Sample, float]:
    code, ctype, body = get(port, "/metrics")
    assert code == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def until(check: Callable[[], bool], timeout: float = 60.0, *,
          seen: Callable[[], object] | None = None) -> None:
    """Poll `check` (tolerating a server not listening yet); on timeout say what `seen` saw."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"condition not reached in {timeout} s; last seen: "
                         f"{seen() if seen else '-'}")


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


def json_events(log: Path) -> list[str]:
    events = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert {"event", "level", "timestamp"} <= set(record), line
        events.append(record["event"])
    return events


def drop_slot_behind_its_back(db: Any, slot: str) -> None:
    terminate = ("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                 "WHERE slot_name = %s AND active_pid IS NOT NULL")
    db.execute(terminate, [slot])
    deadline = time.monotonic() + 30
    while True:
        try:
            db.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            db.execute(terminate, [slot])  # the daemon reconnected meanwhile
            time.sleep(0.05)


def test_daemon_endpoints_while_streaming_and_after_a_slot_is_dropped(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "CREATE TABLE notes (id int PRIMARY KEY, v text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    a = make_source(db, tmp_path, "a", "public.items")
    b = make_source(db, tmp_path, "b", "public.notes")
    for src in (a, b):
        api.enable_cdc(src, state=state)
    port = free_port()
    log = tmp_path / "daemon.log"
    proc = start_daemon(write_config(tmp_path, [a, b], state, port), log)
    rows = ("cdcengine_rows_applied_total", (("source", a.name), ("table", "public.items")))
    try:
        until(lambda: health(port) == (200, {"status": "ok", "sources": {
            a.name: "streaming", b.name: "streaming"}}), seen=lambda: health(port))

        db.execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 5) g")
        until(lambda: metrics(port).get(rows, 0) >= 5, seen=lambda: metrics(port).get(rows))
        db.execute("INSERT INTO items SELECT g, 'y' FROM generate_series(6, 8) g;"
                   "INSERT INTO notes VALUES (1, 'n')")
        until(lambda: metrics(port).get(rows, 0) >= 8, seen=lambda: metrics(port).get(rows))
        wait_for(lambda: set(live_rows(b, "public.notes")) == {1}, timeout=60)
        m = metrics(port)
        src_a = (("source", a.name),)
        assert m[rows] == 8  # exactly once
        assert m[("cdcengine_bytes_applied_total", rows[1])] > 0
        assert m[("cdcengine_commit_latency_seconds_count", src_a)] >= 2
        assert m[("cdcengine_batch_latency_seconds_count", src_a)] >= 2
        # one observation per source transaction (two touched `items`), not per batch
        assert m[("cdcengine_commit_to_delta_seconds_count", src_a)] == 2
        assert m[("cdcengine_source_state", (*src_a, ("state", "streaming")))] == 1
        assert m[("cdcengine_source_state", (*src_a, ("state", "broken")))] == 0

        code, ctype, body = get(port, "/status")
        assert code == 200 and ctype.startswith("application/json")
        status = {s["name"]: s for s in json.loads(body)["sources"]}
        assert set(status) == {a.name, b.name}
        assert status[a.name]["state"] == "streaming"
        assert status[a.name]["slot"]["exists"] is True
        assert status[a.name]["slot"]["name"] == a.slot_name
        assert [t["name"] for t in status[a.name]["tables"]] == ["public.items"]
        assert db.server.password.encode() not in body

        # someone drops a's slot: a's pipeline finds it gone and marks the source broken,
        # b keeps streaming, and the daemon keeps serving
        drop_slot_behind_its_back(db, a.slot_name)
        until(lambda: health(port)[0] == 503, seen=lambda: health(port))
        code, doc = health(port)
        assert doc["status"] == "unhealthy"
        assert doc["sources"] == {a.name: "broken", b.name: "streaming"}
        [problem] = doc["problems"]
        assert problem["source"] == a.name
        assert problem["state"] == "broken"
        assert problem["reason"] == "slot_missing"
        assert problem["message"] and problem["at"]
        m = metrics(port)
        assert m[("cdcengine_source_state", (*src_a, ("state", "broken")))] == 1
        # the walsender's end and the missing slot are errors (which is seen first depends on
        # whether the pipeline or the slot monitor notices the drop)
        assert sum(v for (name, labels), v in m.items() if name == "cdcengine_errors_total"
                   and ("source", a.name) in labels) >= 1
        assert proc.poll() is None
    finally:
        code = stop(proc)
    assert code == 1  # a broken source never ends the daemon as if all were well
    events = json_events(log)
    assert {"daemon_started", "http_started", "batch_committed", "source_stopped",
            "http_stopped", "daemon_stopped"} <= set(events), events
    assert db.server.password not in log.read_text()


def test_health_is_503_once_the_state_store_says_broken(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = make_source(db, tmp_path, "a", "public.items")
    api.enable_cdc(src, state=state)
    port = free_port()
    proc = start_daemon(write_config(tmp_path, [src], state, port), tmp_path / "daemon.log")
    try:
        until(lambda: health(port)[0] == 200)
        with open_state(state) as store:
            store.set_broken(src.name, "source_changed", "the database was restored")
        code, doc = health(port)
        assert code == 503
        assert doc["problems"] == [{"source": src.name, "state": "broken",
                                    "reason": "source_changed",
                                    "message": "the database was restored",
                                    "at": doc["problems"][0]["at"]}]
        with open_state(state) as store:
            store.clear_broken(src.name)
        assert health(port)[0] == 200
    finally:
        stop(proc)


def test_run_refuses_a_port_in_use_naming_the_key(tmp_path: Path) -> None:
    src = SourceConfig(name="shop", dsn="postgresql://cdc@127.0.0.1:1/shop", tables=["t"],
                       destination=str(tmp_path / "lake"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, [src], f"sqlite:///{tmp_path / 'state.db'}", port)
        res = subprocess.run([sys.executable, "-m", "cdcengine", "--config", str(cfg),
                              "run"], cwd=tmp_path, env=clean_env(), capture_output=True,
                             text=True, timeout=60)
    assert res.returncode == 2, res
    assert f"http_port = {port}" in res.stderr
    assert "already in use" in res.stderr
    assert "daemon_started" not in res.stderr  # no source ran

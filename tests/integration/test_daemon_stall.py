"""A daemon that cannot make progress says so (issue 12, defect 4), against the real server.

The daemon runs as its own process with a short `stall_timeout_s`; its Delta writer is made to
hang after a commit with the `hang` failpoint (like a deltalake call that never returns). Then
`cdcengine status --json` (another process), the library's `cdc_status`, `/health` and
`/metrics` say `stalled` with what the source's threads are doing, and the log carries the
thread dump; releasing the hang clears it all. The same daemon idling with nothing received,
for longer than the timeout, is never stalled.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from cdc_util import logs_on_failure, start_daemon
from cli_util import run_cli
from test_daemon_health import free_port, get
from test_pipeline import live_rows, wait_for
from test_slot_health import same_as_source, setup

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.failpoints import RELEASE_ENV

TIMEOUT_S = 2


def _config(tmp_path: Path, state: str, src: SourceConfig, port: int) -> Path:
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text(
        f'[engine]\nstate = "{state}"\nhttp_port = {port}\nlog_format = "json"\n'
        f'[[source]]\nname = "{src.name}"\ndsn = "{src.dsn}"\ntables = ["items"]\n'
        f'destination = "{src.destination}"\nflush_interval_ms = 100\n'
        f"stall_timeout_s = {TIMEOUT_S}\n")
    return cfg


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _events(log: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def _doing(src: SourceConfig, state: str, thread: str) -> str:
    """What `thread` does in the source's current stall ('' when not stalled)."""
    stalled = api.cdc_status(src, state=state).stalled
    found = [t for t in stalled.threads if t["name"] == thread] if stalled else []
    return str(found[0]["doing"]) if found else ""


def test_a_hung_delta_write_is_reported_stalled_and_clears_when_it_resumes(
        db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, state = setup(db, tmp_path)
    port = free_port()
    cfg = _config(tmp_path, state, src, port)
    log = tmp_path / "daemon.log"
    release = tmp_path / "release-the-writer"
    monkeypatch.setenv(RELEASE_ENV, str(release))  # inherited by the daemon process
    gauge = f'cdcengine_source_stalled{{source="{src.name}"}}'
    daemon = start_daemon(cfg, log, failpoint="after_commit=hang")
    try:
        with logs_on_failure(log):
            wait_for(lambda: same_as_source(src), timeout=60)
            wait_for(lambda: api.cdc_status(src, state=state).state == "streaming", timeout=30)
            # idle (nothing received) for well over the timeout: never stalled
            deadline = time.monotonic() + 3 * TIMEOUT_S
            while time.monotonic() < deadline:
                assert api.cdc_status(src, state=state).state == "streaming"
                assert get(port, "/health")[0] == 200
                time.sleep(0.5)
            assert f"{gauge} 0.0" in _metrics(port)
            assert not _events(log, "source_stalled")

            # the first streamed batch: the writer commits it, then hangs (a slow commit on a
            # busy machine may be reported on its own first: wait for the hang's picture)
            db.execute("INSERT INTO items VALUES (1000, 'hung')")
            wait_for(lambda: _doing(src, state, f"writer-{src.name}").startswith("_hang"),
                     timeout=30)

            shown = run_cli(cfg, "status", "--json")
            assert shown.returncode == 0, shown
            [doc] = shown.json()["sources"]
            assert doc["state"] == "stalled", doc
            stalled = doc["stalled"]
            assert f"stall_timeout_s = {TIMEOUT_S}" in stalled["message"], stalled
            assert [w["lane"] for w in stalled["work"]] == ["stream"], stalled
            threads = {t["name"]: t for t in stalled["threads"]}
            assert {f"source-{src.name}", f"writer-{src.name}"} <= set(threads), threads
            writer = threads[f"writer-{src.name}"]
            assert writer["doing"].startswith("_hang (failpoints.py:"), writer
            assert any("in _write" in frame for frame in writer["stack"]), writer
            text = run_cli(cfg, "status")
            assert f"{src.name}: stalled" in text.stdout, text
            assert f"thread writer-{src.name}: _hang" in text.stdout, text

            code, body = get(port, "/health")
            assert code == 503, body
            [problem] = body["problems"]  # type: ignore[misc]
            assert (problem["state"], problem["reason"]) == ("stalled", "stalled"), problem
            assert f"writer-{src.name}" in {t["name"] for t in problem["threads"]}, problem

            metrics = _metrics(port)
            assert f"{gauge} 1.0" in metrics
            assert (f'cdcengine_source_state{{source="{src.name}",state="stalled"}} 1.0'
                    in metrics)

            dump = _events(log, "source_stalled")[-1]
            assert dump["source"] == src.name and dump["level"] == "error", dump
            own = {t["name"]: t for t in dump["threads"]}  # type: ignore[attr-defined]
            assert any("failpoints.py" in f for f in own[f"writer-{src.name}"]["stack"]), own
            assert any(t["name"] == "slot-monitor"
                       for t in dump["other_threads"]), dump  # type: ignore[attr-defined]

            # the hang ends: the batch becomes durable, the stall clears
            release.touch()
            wait_for(lambda: api.cdc_status(src, state=state).state == "streaming", timeout=30)
            assert api.cdc_status(src, state=state).stalled is None
            assert get(port, "/health")[0] == 200
            assert f"{gauge} 0.0" in _metrics(port)
            wait_for(lambda: bool(_events(log, "source_unstalled")), timeout=10)
            db.execute("INSERT INTO items VALUES (1001, 'after')")
            wait_for(lambda: {1000, 1001} <= set(live_rows(src, "items")), timeout=30)
            assert api.cdc_status(src, state=state).state == "streaming"
    finally:
        release.touch()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]
    # a clean stop leaves no stall behind
    assert api.cdc_status(src, state=state).stalled is None


def test_a_hung_snapshot_is_reported_stalled_and_clears_when_it_resumes(
        db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, state = setup(db, tmp_path)
    port = free_port()
    cfg = _config(tmp_path, state, src, port)
    log = tmp_path / "daemon.log"
    release = tmp_path / "release-the-snapshot"
    monkeypatch.setenv(RELEASE_ENV, str(release))
    # the snapshot's coordinating thread hangs once its chunk is committed: no more progress
    daemon = start_daemon(cfg, log, failpoint="snapshot_chunk_committed=hang")
    try:
        with logs_on_failure(log):
            wait_for(lambda: _doing(src, state, f"source-{src.name}").startswith("_hang"),
                     timeout=60)
            st = api.cdc_status(src, state=state)
            assert st.stalled is not None
            assert [w["lane"] for w in st.stalled.work] == ["snapshot"], st.stalled
            assert "snapshot of public.items running" in st.stalled.message
            reading = {t["name"]: t for t in st.stalled.threads}[f"source-{src.name}"]
            assert reading["doing"].startswith("_hang (failpoints.py:"), reading
            assert any("in snapshot_table" in f for f in reading["stack"]), reading  # type: ignore[union-attr]
            code, body = get(port, "/health")
            assert code == 503 and body["problems"][0]["state"] == "stalled", body  # type: ignore[index]
            assert {e["source"] for e in _events(log, "source_stalled")} == {src.name}

            release.touch()
            wait_for(lambda: same_as_source(src), timeout=60)
            wait_for(lambda: api.cdc_status(src, state=state).state == "streaming", timeout=30)
            assert get(port, "/health")[0] == 200
            wait_for(lambda: bool(_events(log, "source_unstalled")), timeout=10)
    finally:
        release.touch()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]


def test_a_failure_repeating_on_every_retry_is_reported_stalled(
        db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same changes fail on every reconnect (like a MERGE the destination refuses): each run
    is short and the source is mostly in backoff, yet nothing becomes durable — stalled."""
    src, state = setup(db, tmp_path)
    port = free_port()
    cfg = _config(tmp_path, state, src, port)
    log = tmp_path / "daemon.log"
    release = tmp_path / "stop-failing"
    monkeypatch.setenv(RELEASE_ENV, str(release))
    daemon = start_daemon(cfg, log, failpoint="batch_taken=fail")
    try:
        with logs_on_failure(log):
            wait_for(lambda: api.cdc_status(src, state=state).state == "streaming", timeout=60)
            db.execute("INSERT INTO items VALUES (1000, 'refused')")
            def retried() -> bool:
                st = api.cdc_status(src, state=state)
                return st.state == "stalled" and "is retried" in str(st.stalled.message)  # type: ignore[union-attr]
            wait_for(retried, timeout=30)
            assert len(_events(log, "source_reconnecting")) >= 1
            assert get(port, "/health")[0] == 503

            release.touch()
            wait_for(lambda: 1000 in live_rows(src, "items"), timeout=60)
            wait_for(lambda: api.cdc_status(src, state=state).state == "streaming", timeout=30)
            assert get(port, "/health")[0] == 200
    finally:
        release.touch()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]

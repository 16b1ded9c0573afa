"""The destination fails mid-stream and recovers (issue 13), against the real server.

The lake lives on a small tmpfs mounted by the test (root needed; skipped with the reason
otherwise). While the daemon streams, the file system is remounted read-only, or filled to the
last byte. The source must report the fault by name (`status`, `/health`, the stalled metric),
promptly — with the default 300 s stall timeout, the same writes failing run after run is a
stall at once — confirm nothing past what is durable, and resume by itself, exactly, once the
fault is cleared: every row in the consolidated table, every change once in the change log.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cdc_util import logs_on_failure, query, source_for, start_daemon
from test_daemon_health import free_port, get
from test_pipeline import live_rows, wait_for

from cdcengine import api
from cdcengine.lsn import parse_lsn
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the destination needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def _fill(mnt: Path) -> Path:
    """Fill the file system to its last byte; the filler file, to delete to clear it."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def _change_log(src: object) -> list[dict[str, object]]:
    sink = DeltaSink(src.destination, source=src.name)  # type: ignore[attr-defined]
    return sink.read_table(TableRef.parse("items"), "append").select(
        ["id", "_cdc_op", "_cdc_lsn"]).to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read_only", "disk_full"])
def test_a_destination_fault_is_reported_and_survived_exactly(
        db, tmp_path: Path, small_disk: Path, fault: str) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g")
    state = "sqlite:///" + str(tmp_path / "state.db")  # the state store is not on that disk
    src = source_for(db.dsn, small_disk, ["items"], table_mode="both", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    port = free_port()
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text(
        f'[engine]\nstate = "{state}"\nhttp_port = {port}\nlog_format = "json"\n'
        f'[[source]]\nname = "{src.name}"\ndsn = "{src.dsn}"\ntables = ["items"]\n'
        f'destination = "{src.destination}"\ntable_mode = "both"\nflush_interval_ms = 100\n'
        "maintenance_interval_s = 0\n")  # the default stall_timeout_s (300 s)
    log = tmp_path / "daemon.log"
    gauge = f'cdcengine_source_stalled{{source="{src.name}"}}'
    daemon = start_daemon(cfg, log)
    filler: Path | None = None
    try:
        with logs_on_failure(log):
            wait_for(lambda: len(live_rows(src, "items")) == 20, timeout=60)
            if fault == "read_only":
                _remount(small_disk, "ro")
            else:
                filler = _fill(small_disk)
            first_commit_by = 0
            for i in range(5):
                db.execute("INSERT INTO items SELECT g, 'new' "
                           "FROM generate_series(%s::int, %s::int) g", [100 + 10 * i, 109 + 10 * i])
                if i == 0:  # at or past the end of the first refused transaction's commit
                    first_commit_by = parse_lsn(
                        query(db.dsn, "SELECT pg_current_wal_lsn()::text")[0][0])
            db.execute("UPDATE items SET v = 'changed' WHERE id <= 5; DELETE FROM items "
                       "WHERE id = 20")

            words = "Read-only file system" if fault == "read_only" else "No space left"

            def reported() -> bool:
                st = api.cdc_status(src, state=state)
                return st.state == "stalled" and words in str(st.stalled.message)  # type: ignore[union-attr]

            wait_for(reported, timeout=90)
            code, body = get(port, "/health")
            assert code == 503 and body["problems"][0]["state"] == "stalled", body  # type: ignore[index]
            assert f"{gauge} 1.0" in _metrics(port)
            # nothing past what is durable was confirmed: the slot still holds the changes
            confirmed = query(db.dsn, "SELECT confirmed_flush_lsn::text FROM "
                                      "pg_replication_slots WHERE slot_name = %s",
                              [src.slot_name])[0][0]
            assert parse_lsn(confirmed) < first_commit_by, (confirmed, first_commit_by)
            assert len(live_rows(src, "items")) == 20

            if fault == "read_only":
                _remount(small_disk, "rw")
            else:
                assert filler is not None
                filler.unlink()
            want = {r[0]: r[1] for r in query(db.dsn, "SELECT id, v FROM items")}
            wait_for(lambda: {k: r["v"] for k, r in live_rows(src, "items").items()} == want,
                     timeout=120)
            wait_for(lambda: api.cdc_status(src, state=state).state == "streaming", timeout=60)
            assert get(port, "/health")[0] == 200
    finally:
        if fault == "read_only":
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]
    # the change log: the snapshot, then each change exactly once
    changes = [(r["id"], r["_cdc_op"]) for r in _change_log(src) if r["_cdc_op"] != "R"]
    assert len(changes) == len(set(changes)) == 50 + 5 + 1
    assert sorted(i for i, op in changes if op == "I") == [
        100 + 10 * t + k for t in range(5) for k in range(10)]
    assert sorted(i for i, op in changes if op == "U") == [1, 2, 3, 4, 5]
    assert [i for i, op in changes if op == "D"] == [20]


def _metrics(port: int) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


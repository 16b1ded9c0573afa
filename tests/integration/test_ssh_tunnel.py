"""A source reached through an SSH bastion (`ssh_tunnel`): a real sshd on 127.0.0.1 (tests/sshd.py).

The end-to-end case runs the real command line: `enable`, then `cdcengine run` snapshots and
streams through the tunnel while a workload runs; every engine connection to the database (the
walsender included) is shown to come from the sshd process; the SSH connections are then killed
mid-stream and the daemon must reconnect through a new one and resume exactly (Delta equals the
source, the change log holds every change once). The other cases: a changed or unknown host key
refused, a rejected login, a bastion that cannot forward or is down, and no secret in any output.

Password logins: the tests run as root here, whose password is locked, so a password login is
tested up to the bastion's refusal (`ssh_auth_failed`); key logins are tested for real, with and
without a passphrase.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from cdc_util import daemon_config, logs_on_failure, query, source_for, start_daemon
from cli_util import assert_no_secret, closed_port, run_cli
from sshd import PASSPHRASE, SshServer, fresh_tunnel_pool, sshd_server, tcp_db
from test_crash import COLUMNS, TABLES, Workload, delta_rows, replay_log, source_rows
from test_pipeline import wait_for

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaSink
from cdcengine_postgres.connection import connect_source

__all__ = ["fresh_tunnel_pool", "sshd_server", "tcp_db"]  # fixtures, imported for pytest
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_tunnel_pool")]






def tunnel_config(tmp_path: Path, src: SourceConfig, state: str, tunnel: dict[str, object],
                  **keys: str | int) -> Path:
    """The daemon's config with the tunnel as a `[source.ssh_tunnel]` sub-table."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = daemon_config(tmp_path, src, state, list(src.tables), **keys)
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in tunnel.items())
    cfg.write_text(cfg.read_text() + "[source.ssh_tunnel]\n" + table)
    return cfg


def engine_backends(db, walsender: bool = False) -> set[int]:  # type: ignore[no-untyped-def]
    """Client ports of the engine's backends in the test's database."""
    rows = query(db.server.admin_dsn,
                 "SELECT client_port, backend_type FROM pg_stat_activity WHERE datname = %s "
                 "AND application_name LIKE 'cdcengine%%' AND client_port IS NOT NULL",
                 [db.name])
    return {r[0] for r in rows if not walsender or r[1] == "walsender"}


def tunneled(db, ssh: SshServer) -> bool:  # type: ignore[no-untyped-def]
    """A walsender is streaming, and every engine backend came through the bastion."""
    ports = engine_backends(db)
    return bool(engine_backends(db, walsender=True)) and ports <= ssh.forwarded_ports()


def streamed(log: Path) -> bool:
    """The daemon committed changes to Delta after its stream started."""
    text = log.read_text()
    start = text.find("stream_started")
    return start >= 0 and "delta_committed" in text[start:]


def test_snapshot_and_stream_through_the_tunnel_and_resume_exactly_after_it_drops(
        tcp_db, tmp_path: Path, sshd_server: SshServer) -> None:
    db, ssh = tcp_db, sshd_server
    # fewer than 1000 accounts: the workload inserts ids from 1001
    db.execute("CREATE TABLE acct (id int PRIMARY KEY, v int, note text);"
               "CREATE TABLE ledger (id serial PRIMARY KEY, acct int, amount int);"
               "INSERT INTO acct SELECT i, i % 7, 'seed' FROM generate_series(1, 900) i;"
               "INSERT INTO ledger (acct, amount) SELECT i, i FROM generate_series(1, 500) i")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, [f"public.{t}" for t in TABLES], table_mode="both")
    # the encrypted key: its passphrase is a secret that must show nowhere
    cfg = tunnel_config(tmp_path, src, state, ssh.tunnel(
        private_key_file=str(ssh.client_key_encrypted), private_key_passphrase=PASSPHRASE),
        table_mode="both", flush_interval_ms=50, snapshot_chunk_rows=200, snapshot_workers=2)
    sink = DeltaSink(src.destination, source=src.name)
    log = tmp_path / "daemon.log"

    enable = run_cli(cfg, "enable")
    assert enable.returncode == 0, enable
    with logs_on_failure(log):
        with Workload(db.dsn, seed=1717):
            daemon = start_daemon(cfg, log)
            try:
                wait_for(lambda: all(sink.exists(TableRef("public", t), "consolidated")
                                     for t in TABLES), timeout=90)
                wait_for(lambda: streamed(log), timeout=60)  # changes applied from the stream
                wait_for(lambda: tunneled(db, ssh), timeout=60)
                before = engine_backends(db, walsender=True)
                assert ssh.kill_sessions() > 0  # every SSH connection drops, mid-stream
                # a new walsender, through a new SSH connection
                wait_for(lambda: tunneled(db, ssh)
                         and not engine_backends(db, walsender=True) & before, timeout=90)
                wait_for(lambda: log.read_text().count("ssh_tunnel_opened") >= 2, timeout=30)
                after = len(source_rows(db.dsn, "ledger"))
                wait_for(lambda: len(source_rows(db.dsn, "ledger")) > after + 20, timeout=30)
            except BaseException:
                daemon.kill()
                raise
        try:
            for t in TABLES:
                wait_for(lambda t=t: delta_rows(sink, t, COLUMNS[t]) == source_rows(db.dsn, t),
                         timeout=120)
            # verify's own connections (its snapshot slot, its reads) go through the tunnel too
            verify = run_cli(cfg, "verify", "--source", src.name, "--wait", "30")
            assert verify.returncode == 0, verify
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    text = log.read_text()
    assert daemon.returncode == 0, text[-3000:]
    assert "ssh_tunnel_lost" in text
    for t in TABLES:
        expected = source_rows(db.dsn, t)
        assert delta_rows(sink, t, COLUMNS[t]) == expected
        assert replay_log(sink, t, COLUMNS[t]) == expected  # no change twice, none missing

    status = run_cli(cfg, "status", "--json")
    assert status.returncode == 0, status
    assert_no_secret([enable, verify, status], [PASSPHRASE, db.server.password or ""])
    assert PASSPHRASE not in text
    assert "Accepted publickey" in ssh.log()


def test_a_changed_or_unknown_host_key_is_refused(tcp_db, tmp_path: Path,
                                                  sshd_server: SshServer) -> None:
    db, ssh = tcp_db, sshd_server
    db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.items"])
    changed = run_cli(tunnel_config(tmp_path / "changed", src, state,
                                    ssh.tunnel(known_hosts=str(ssh.other_known_hosts))), "enable")
    assert changed.returncode == 1, changed
    assert "ssh_host_key_mismatch" in changed.output
    assert "CHANGED" in changed.output
    assert "ssh-keyscan" in changed.output  # the fix

    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    unknown = run_cli(tunnel_config(tmp_path / "unknown", src, state,
                                    ssh.tunnel(known_hosts=str(empty))), "enable")
    assert unknown.returncode == 1, unknown
    assert "ssh_host_key_mismatch" in unknown.output
    assert "never trusted on first use" in unknown.output
    assert "Accepted publickey" not in ssh.log()  # refused before logging in
    assert query(db.dsn, "SELECT count(*) FROM pg_replication_slots "
                         "WHERE slot_name = %s", [src.slot_name]) == [(0,)]


def test_a_host_key_that_changes_under_the_daemon_pauses_the_source(
        tcp_db, tmp_path: Path, sshd_server: SshServer) -> None:
    """SPEC §7: a failure an operator must look at pauses the source (the daemon keeps running,
    waiting for `resume`) rather than retrying a bastion that may be an impostor."""
    db, ssh = tcp_db, sshd_server
    db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.items"])
    known = tmp_path / "known_hosts"
    known.write_text(ssh.known_hosts.read_text())
    cfg = tunnel_config(tmp_path, src, state, ssh.tunnel(known_hosts=str(known)))
    enable = run_cli(cfg, "enable")
    assert enable.returncode == 0, enable
    known.write_text(ssh.other_known_hosts.read_text())  # the bastion "changed" its key
    log = tmp_path / "daemon.log"

    def paused() -> str | None:
        with api.open_store(state) as store:
            rec = store.get_source(src.name)
        return rec.paused.reason if rec is not None and rec.paused is not None else None

    with logs_on_failure(log):
        daemon = start_daemon(cfg, log)
        try:
            wait_for(lambda: paused() is not None, timeout=60)
            assert daemon.poll() is None  # waiting for an operator, not gone
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    assert paused() == "ssh_host_key_mismatch"
    assert daemon.returncode == 0, log.read_text()[-3000:]


def test_check_says_a_tunnelled_source_is_encrypted_as_far_as_the_bastion(
        tcp_db, tmp_path: Path, sshd_server: SshServer) -> None:
    """libpq's end of a tunnelled connection is the local forwarder (127.0.0.1): the encryption
    line must name the tunnel, not call the source local."""
    db, ssh = tcp_db, sshd_server
    db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.items"])
    cfg = tunnel_config(tmp_path, src, state, ssh.tunnel())
    check = run_cli(cfg, "check", "--json")
    assert check.returncode == 0, check
    (checked,) = check.json()["sources"]
    line = next(c for c in checked["checks"] if c["name"] == "encryption")
    assert line["severity"] == "ok"
    assert "inside the SSH tunnel through ssh://" in line["message"]
    assert "on this machine" not in line["message"]


def test_a_rejected_login_says_so_without_the_password(tcp_db, tmp_path: Path,
                                                       sshd_server: SshServer) -> None:
    db, ssh = tcp_db, sshd_server
    db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["public.items"])
    secret = "Tunnel-Pw-93x!"
    cfg = tunnel_config(tmp_path, src, state, ssh.tunnel(private_key_file=None, password=secret))
    res = run_cli(cfg, "enable")
    assert res.returncode == 1, res
    assert "ssh_auth_failed" in res.output
    assert "password authentication" in res.output
    check = run_cli(cfg, "check")
    assert "ssh_auth_failed" in check.output
    assert_no_secret([res, check], [secret])
    assert "Failed password" in ssh.log() or "Failed none" in ssh.log()


def test_a_bastion_that_cannot_forward_or_is_down_is_a_retryable_tunnel_failure(
        tcp_db, tmp_path: Path, sshd_server: SshServer) -> None:
    db, ssh = tcp_db, sshd_server
    tunnel = ssh.tunnel()
    src = source_for(db.dsn, tmp_path, ["public.items"], ssh_tunnel=tunnel)
    with connect_source(src) as conn:  # the database through the bastion
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.hostaddr == "127.0.0.1"
        assert conn.info.port != db.server.port

    nowhere = db.dsn.replace(f":{db.server.port}/", f":{closed_port()}/")
    with pytest.raises(CDCError) as refused:
        connect_source(source_for(nowhere, tmp_path, ["public.items"], name="src_nowhere",
                                  ssh_tunnel=tunnel))
    assert refused.value.reason == "ssh_tunnel_failed"
    assert refused.value.retryable
    assert "refused to forward" in refused.value.message

    ssh.stop()  # the bastion goes away: its SSH connection dies with it
    with pytest.raises(CDCError) as down:
        connect_source(src)
    assert down.value.reason == "ssh_tunnel_failed"
    assert down.value.retryable
    assert ssh.tunnel()["host"] in down.value.message

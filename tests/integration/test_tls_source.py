"""TLS to the source, against a real PostgreSQL 15 with `ssl = on` and a CA made by the fixture.

The server's pg_hba.conf has only `hostssl` lines for TCP, so every connection the engine opens
-- control, snapshot, the walsender, verify -- either speaks TLS or is refused; the tests also
read `pg_stat_ssl` for the engine's walsender to see it directly. The engine runs as the real
console command (`check`, `enable`, `run` as a daemon process, `verify`), rows are read back from
Delta. Certificate failures (wrong CA, wrong host name, missing or unreadable files, a client
certificate the server does not trust) must come back as `ssl_verify_failed` (or `auth_failed`
for pg_hba `cert` without a certificate) with a fix naming the dsn parameter to correct, and
never with the password; the daemon pauses such a source until `resume`. `check`'s
`encryption` line warns (⚠️) only for a source across the network reached without encryption.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cdc_util import daemon_config, logs_on_failure, source_for, start_daemon
from cli_util import CliResult, assert_no_secret, run_cli
from test_pg_connection import _all_texts
from test_pipeline import live_rows, wait_for
from tlsutil import (
    Pki,
    make_pki,
    non_loopback_address,
    openssl_missing,
    tls_cluster_options,
    tls_dsn,
)

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.source.adapter import Check, Severity
from cdcengine_postgres.connection import connect
from cdcengine_postgres.testing.cluster import ClusterError, TempCluster, find_bindir

pytestmark = pytest.mark.slow

CERT_USER = "cdc_cert"
DAEMON_TIMEOUT_S = 90


@dataclass(frozen=True)
class TlsServer:
    cluster: TempCluster
    pki: Pki
    remote_ip: str | None  # a non-loopback address of this machine the server listens on too

    @property
    def password(self) -> str:
        return self.cluster.password

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        """The superuser over the (trusted, unencrypted) unix socket, for set-up only."""
        return psycopg.connect(f"host={self.cluster.socket_dir} port={self.cluster.port} "
                               f"user=postgres dbname={dbname}", autocommit=True)

    def dsn(self, dbname: str, *, host: str = "localhost", user: str = "postgres",
            with_password: bool = True, **params: str | Path) -> str:
        password = self.password if with_password and user == "postgres" else None
        return tls_dsn(host, self.cluster.port, dbname, user=user, password=password, **params)

    def verified(self, dbname: str, **params: str | Path) -> str:
        """The dsn a user should write: sslmode=verify-full against the fixture's CA."""
        return tls_dsn("localhost", self.cluster.port, dbname, user="postgres",
                       password=self.password, sslmode="verify-full",
                       sslrootcert=self.pki.ca_cert, **params)

    def new_database(self, name: str, owner: str = "postgres") -> None:
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    if why := openssl_missing():
        pytest.skip(why)
    try:
        find_bindir()
    except ClusterError as exc:
        pytest.skip(f"needs local PostgreSQL server binaries: {exc}")
    remote_ip = non_loopback_address()
    addresses = ["127.0.0.1"] + ([remote_ip] if remote_ip else [])
    pki = make_pki(tmp_path_factory.mktemp("pki"), client_user=CERT_USER,
                   server_names=("localhost",), server_ips=[remote_ip] if remote_ip else [])
    opts = tls_cluster_options(pki, addresses=addresses)
    with TempCluster(opts.settings, hba=opts.hba, files=opts.files) as cluster:
        server = TlsServer(cluster, pki, remote_ip)
        with server.admin() as conn:
            conn.execute(f"CREATE ROLE {CERT_USER} LOGIN REPLICATION")
        yield server


def _table(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, %s) g",
                     [rows])


def _encryption(result: CliResult) -> dict[str, str | None]:
    found = [c for c in result.checks() if c["name"] == "encryption"]
    assert len(found) == 1, result
    return found[0]


def _engine_sessions(server: TlsServer, source: str) -> list[tuple[str, bool, str | None]]:
    """(backend_type, ssl, client_dn) of the engine's sessions, read on the server."""
    with server.admin() as conn:
        return conn.execute(
            "SELECT a.backend_type, s.ssl, s.client_dn FROM pg_stat_activity a"
            " JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE %s",
            [f"cdcengine:{source}%"]).fetchall()


def _stream_and_verify(server: TlsServer, src: SourceConfig, cfg: Path, log: Path,
                       table_dsn: str) -> tuple[list[tuple[str, bool, str | None]], CliResult]:
    """`cdcengine run`: the snapshot lands, a later insert and update stream through, and
    `cdcengine verify` (which waits for the running daemon to catch up) compares the table.
    Returns the engine's sessions as the server saw them while it streamed, and verify's
    result."""
    proc = start_daemon(cfg, log)
    try:
        with logs_on_failure(log):
            wait_for(lambda: set(live_rows(src, "public.items")) == {1, 2, 3},
                     timeout=DAEMON_TIMEOUT_S)
            with psycopg.connect(table_dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO items VALUES (4, 'new'); "
                             "UPDATE items SET v = 'changed' WHERE id = 1")
            wait_for(lambda: live_rows(src, "public.items").get(1, {}).get("v") == "changed"
                     and 4 in live_rows(src, "public.items"), timeout=DAEMON_TIMEOUT_S)
            sessions = _engine_sessions(server, src.name)
            verify = run_cli(cfg, "verify", "--source", src.name, "--wait", "30", "--json")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    return sessions, verify


def _assert_verified(verify: CliResult, rows: int) -> None:
    """`verify --json` compared every row of the table over TLS and found it equal."""
    doc = verify.json()["sources"][0]
    assert doc["ok"] is True, verify
    assert doc["tables"][0]["comparison"]["rows_compared"] == rows, verify


# ---- verify-full with a password, end to end ---------------------------------------------------


def test_verify_full_source_checks_snapshots_streams_and_verifies(
        tls_server: TlsServer, tmp_path: Path) -> None:
    tls_server.new_database("tls_pw")
    dsn = tls_server.verified("tls_pw")
    _table(dsn, 3)
    src = source_for(dsn, tmp_path, ["public.items"], name="tls_pw", flush_interval_ms=100)
    cfg = daemon_config(tmp_path, src, f"sqlite:///{tmp_path / 'state.db'}", ["public.items"],
                        flush_interval_ms=100)

    check = run_cli(cfg, "check")
    assert check.returncode == 0, check
    enc = _encryption(check)
    assert enc["symbol"] == "✅" and "verify-full" in (enc["message"] or ""), check
    enable = run_cli(cfg, "enable")
    assert enable.returncode == 0, enable

    log = tmp_path / "daemon.log"
    sessions, verify = _stream_and_verify(tls_server, src, cfg, log, dsn)
    walsenders = [s for s in sessions if s[0] == "walsender"]
    assert walsenders, sessions  # the replication connection ...
    assert all(ssl for _, ssl, _ in sessions), sessions  # ... and every other one used TLS

    assert verify.returncode == 0, verify
    _assert_verified(verify, rows=4)
    assert_no_secret([check, enable, verify], [tls_server.password])
    assert tls_server.password not in log.read_text()


# ---- client certificate, pg_hba `cert` ----------------------------------------------------------


def test_client_certificate_with_cert_auth_streams(tls_server: TlsServer, tmp_path: Path) -> None:
    tls_server.new_database("tls_cert", owner=CERT_USER)
    pki = tls_server.pki
    dsn = tls_server.dsn("tls_cert", user=CERT_USER, sslmode="verify-full",
                         sslrootcert=pki.ca_cert, sslcert=pki.client_cert, sslkey=pki.client_key)
    assert ":" not in dsn.split("@")[0].removeprefix("postgresql://")  # no password at all
    _table(dsn, 3)  # owned by the certificate's user, as managed mode's publication needs
    src = source_for(dsn, tmp_path, ["public.items"], name="tls_cert", flush_interval_ms=100)
    cfg = daemon_config(tmp_path, src, f"sqlite:///{tmp_path / 'state.db'}", ["public.items"],
                        flush_interval_ms=100)

    check = run_cli(cfg, "check")
    assert check.returncode == 0, check
    assert _encryption(check)["symbol"] == "✅", check
    assert run_cli(cfg, "enable").returncode == 0

    sessions, verify = _stream_and_verify(tls_server, src, cfg, tmp_path / "daemon.log", dsn)
    walsenders = [s for s in sessions if s[0] == "walsender"]
    assert walsenders, sessions
    # the server saw our client certificate on the replication connection
    assert all(ssl and dn == f"/CN={CERT_USER}" for _, ssl, dn in walsenders), sessions
    assert verify.returncode == 0, verify
    _assert_verified(verify, rows=4)


# ---- refusals -----------------------------------------------------------------------------------


def _refusal(server: TlsServer, case: str, tmp_path: Path) -> str:
    pki, ca = server.pki, server.pki.ca_cert
    if case == "wrong_ca":
        return server.dsn("postgres", sslmode="verify-full", sslrootcert=pki.other_ca_cert)
    if case == "wrong_host":
        return server.dsn("postgres", host="127.0.0.1", sslmode="verify-full", sslrootcert=ca)
    if case == "missing_root_file":
        return server.dsn("postgres", sslmode="verify-full",
                          sslrootcert=tmp_path / "no-such-ca.crt")
    if case == "client_cert_from_other_ca":
        return server.dsn("postgres", user=CERT_USER, sslmode="verify-full", sslrootcert=ca,
                          sslcert=pki.other_client_cert, sslkey=pki.other_client_key)
    if case == "client_key_readable_by_others":
        key = tmp_path / "open.key"
        key.write_bytes(pki.client_key.read_bytes())
        key.chmod(0o644)
        return server.dsn("postgres", user=CERT_USER, sslmode="verify-full", sslrootcert=ca,
                          sslcert=pki.client_cert, sslkey=key)
    if case == "no_client_cert_for_cert_auth":
        return server.dsn("postgres", user=CERT_USER, sslmode="verify-full", sslrootcert=ca)
    raise AssertionError(case)


# case -> (reason, words in the message, words in the fix)
REFUSALS = {
    "wrong_ca": (Reason.SSL_VERIFY_FAILED, ["not signed by a CA in sslrootcert"],
                 ["sslrootcert", "CA certificate"]),
    "wrong_host": (Reason.SSL_VERIFY_FAILED, ['for "localhost"', 'host "127.0.0.1"'],
                   ["subjectAltName", "host name"]),
    "missing_root_file": (Reason.SSL_VERIFY_FAILED, ["no-such-ca.crt", "sslrootcert"],
                          ["sslrootcert"]),
    "client_cert_from_other_ca": (Reason.SSL_VERIFY_FAILED, ["refused our client certificate"],
                                  ["sslcert", "ssl_ca_file"]),
    "client_key_readable_by_others": (Reason.SSL_VERIFY_FAILED, ["open.key", "sslkey"],
                                      ["chmod 0600"]),
    "no_client_cert_for_cert_auth": (Reason.AUTH_FAILED, ["requires a client certificate"],
                                     ["sslcert", "sslkey"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_certificate_failures_are_refused_with_the_reason_and_fix(
        tls_server: TlsServer, tmp_path: Path, case: str) -> None:
    reason, message_words, fix_words = REFUSALS[case]
    with pytest.raises(CDCError) as info:
        connect(_refusal(tls_server, case, tmp_path))
    err = info.value
    assert err.reason is reason, (err.reason, err.message)
    assert err.retryable is False  # a file or a name to correct: retrying cannot help
    for word in message_words:
        assert word in err.message, err.message
    for word in fix_words:
        assert word in (err.fix or ""), err.fix
    for text in _all_texts(err):
        assert tls_server.password not in text


@pytest.mark.parametrize("case", ["wrong_ca", "wrong_host"])
def test_check_refuses_a_wrong_ca_or_host_name_with_reason_and_fix(
        tls_server: TlsServer, tmp_path: Path, case: str) -> None:
    dsn = _refusal(tls_server, case, tmp_path)
    src = source_for(dsn, tmp_path, ["public.items"], name=f"tls_{case}")
    cfg = daemon_config(tmp_path, src, f"sqlite:///{tmp_path / 'state.db'}", ["public.items"])
    check = run_cli(cfg, "check")
    assert check.returncode == 1, check
    assert "❌ ssl_verify_failed:" in check.stdout, check
    fix = next(line for line in check.stdout.splitlines() if line.strip().startswith("fix:"))
    assert ("sslrootcert" if case == "wrong_ca" else "subjectAltName") in fix, check
    assert_no_secret([check], [tls_server.password])


# ---- check: ⚠️ for a non-local source without encryption ---------------------------------------


def _enc(checks: list[Check]) -> Check:
    found = [c for c in checks if c.name == "encryption"]
    assert len(found) == 1, checks
    return found[0]


def _check(dsn: str, tmp_path: Path, name: str) -> Check:
    src = source_for(dsn, tmp_path, ["public.t"], name=name)
    return _enc(api.check_prerequisites(src, state=f"sqlite:///{tmp_path / (name + '.db')}"))


def test_check_warns_for_a_non_local_source_without_encryption(make_cluster,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    remote = non_loopback_address()
    if remote is None:
        pytest.skip("this machine has no non-loopback IPv4 address to reach a server at as "
                    "if it were remote (`hostname -I` lists none)")
    cluster = make_cluster({"listen_addresses": f"127.0.0.1,{remote}"},
                           hba=["local all all trust",
                                "host all all 127.0.0.1/32 scram-sha-256",
                                f"host all all {remote}/32 scram-sha-256"])
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    local = tls_dsn("127.0.0.1", cluster.port, "postgres", user="postgres",
                    password=cluster.password, sslmode="disable")
    c = _check(local, tmp_path, "plain_local")
    assert c.severity is Severity.OK and "on this machine" in c.message, c

    for mode in ("disable", "prefer"):  # prefer: no SSL at this server, so it fell back
        dsn = tls_dsn(remote, cluster.port, "postgres", user="postgres",
                      password=cluster.password, sslmode=mode)
        c = _check(dsn, tmp_path, f"plain_remote_{mode}")
        assert c.severity is Severity.WARNING, c
        assert "not encrypted" in c.message and remote in c.message, c
        assert "sslmode=verify-full" in c.fix and "sslrootcert" in c.fix, c
        assert cluster.password not in c.message + c.fix

    # the console shows it as ⚠️ and, a warning not being a failure, exits 0
    src = source_for(tls_dsn(remote, cluster.port, "postgres", user="postgres",
                             password=cluster.password, sslmode="disable"),
                     tmp_path, ["public.t"], name="plain_remote")
    cfg = daemon_config(tmp_path, src, f"sqlite:///{tmp_path / 'state.db'}", ["public.t"])
    check = run_cli(cfg, "check")
    assert check.returncode == 0, check
    assert _encryption(check)["symbol"] == "⚠️", check
    assert "sslmode=verify-full" in (_encryption(check)["fix"] or ""), check


def test_check_reports_a_non_local_tls_connection_as_encrypted(tls_server: TlsServer,
                                                               tmp_path: Path) -> None:
    if tls_server.remote_ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address (`hostname -I` lists none)")
    tls_server.new_database("tls_remote")
    with tls_server.admin("tls_remote") as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    ip, ca = tls_server.remote_ip, tls_server.pki.ca_cert
    full = _check(tls_server.dsn("tls_remote", host=ip, sslmode="verify-full", sslrootcert=ca),
                  tmp_path, "tls_remote_full")
    assert full.severity is Severity.OK and "verify-full" in full.message, full
    # sslmode=prefer that ended up encrypted is not warned about either
    prefer = _check(tls_server.dsn("tls_remote", host=ip, sslmode="prefer"), tmp_path,
                    "tls_remote_prefer")
    assert prefer.severity is Severity.OK, prefer
    assert "Encrypted with TLS" in prefer.message and "not verified" in prefer.message, prefer


# ---- a running source whose certificate stops checking out ---------------------------------------


def test_a_source_whose_ca_no_longer_matches_is_paused_with_the_reason(
        tls_server: TlsServer, tmp_path: Path) -> None:
    """Enabled with the right CA, then run with the wrong one (a rotated server certificate, a
    mistyped path): the daemon does not retry a file in a loop; the source is paused with
    `ssl_verify_failed`, and `status` says so without the password."""
    tls_server.new_database("tls_rotated")
    good = tls_server.verified("tls_rotated")
    _table(good, 3)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    src = source_for(good, tmp_path, ["public.items"], name="tls_rotated")
    api.enable_cdc(src, state=state)
    wrong = tls_server.dsn("tls_rotated", sslmode="verify-full",
                           sslrootcert=tls_server.pki.other_ca_cert)
    cfg = daemon_config(tmp_path, source_for(wrong, tmp_path, ["public.items"],
                                             name="tls_rotated"), state, ["public.items"])
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        with logs_on_failure(log):
            wait_for(lambda: "source_waiting" in log.read_text(), timeout=DAEMON_TIMEOUT_S)
            status = run_cli(cfg, "status", "--json")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    waiting = next(line for line in log.read_text().splitlines() if "source_waiting" in line)
    assert "reason=ssl_verify_failed" in waiting and "state=paused" in waiting, waiting
    assert "sslrootcert" in log.read_text()  # the fix is in the log too
    assert status.json()["sources"][0]["error"]["reason"] == "ssl_verify_failed", status
    assert_no_secret([status], [tls_server.password])
    assert tls_server.password not in log.read_text()

    # the CA put right, `resume` and the daemon snapshots as if nothing happened
    cfg = daemon_config(tmp_path, src, state, ["public.items"])
    assert run_cli(cfg, "resume", "--source", src.name).returncode == 0
    proc = start_daemon(cfg, log)
    try:
        with logs_on_failure(log):
            wait_for(lambda: set(live_rows(src, "public.items")) == {1, 2, 3},
                     timeout=DAEMON_TIMEOUT_S)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

"""The host policy (issue 17 item 4) against real servers: the CLI refusing a loopback source at
config load, the adapter resolving, checking and pinning at connect (after DNS), and the SSH
tunnel's bastion checked instead of the database behind it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cdc_util import source_for
from cli_util import run_cli
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sshd import SshServer, fresh_tunnel_pool, sshd_server, tcp_db

from cdcengine.config import EngineConfig
from cdcengine.errors import CDCError
from cdcengine.hostpolicy import HostNotAllowed, HostPolicy
from cdcengine_postgres.connection import connect, connect_source
from cdcengine_postgres.tunnel import POOL

__all__ = ["fresh_tunnel_pool", "sshd_server", "tcp_db"]  # fixtures, imported for pytest
pytestmark = pytest.mark.usefixtures("fresh_tunnel_pool")






def with_host(dsn: str, host: str) -> str:
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v is not None}
    params["host"] = host
    return make_conninfo("", **params)


def test_the_cli_refuses_a_loopback_source_at_config_load(tcp_db, tmp_path: Path) -> None:
    src = source_for(tcp_db.dsn, tmp_path, ["public.items"])
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text(f'[engine]\nallowed_hosts = ["*"]\nstate = "sqlite:///{tmp_path}/s.db"\n\n'
                   f'[[source]]\nname = "{src.name}"\ndsn = "{src.dsn}"\n'
                   f'tables = ["public.items"]\ndestination = "{tmp_path}/lake"\n')
    out = run_cli(cfg, "check")
    assert out.returncode == 2, out
    assert "host_not_allowed" in out.output and "denied network (127.0.0.0/8)" in out.output
    assert "allowed_hosts" in out.output  # the fix
    password = conninfo_to_dict(tcp_db.dsn).get("password")
    assert not password or password not in out.output
    # an address entry makes the exception: the same source checks fine
    cfg.write_text(cfg.read_text().replace('["*"]', '["*", "127.0.0.1"]'))
    tcp_db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    assert run_cli(cfg, "check").returncode == 0


def test_connect_resolves_checks_and_pins_the_addresses(tcp_db, tmp_path: Path) -> None:
    by_name = with_host(tcp_db.dsn, "localhost")
    policy = EngineConfig(allowed_hosts=["localhost", "127.0.0.0/8", "::1"]).host_policy
    src = source_for(by_name, tmp_path, ["public.items"], host_policy=policy)
    with connect_source(src) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # libpq dialled an address the policy checked, the name kept as `host`
        assert conn.info.hostaddr in ("127.0.0.1", "::1")
        assert conn.info.host == "localhost"
    with connect_source(src, replication=True) as repl:  # a walsender connection too
        assert repl.info.hostaddr in ("127.0.0.1", "::1")


def test_a_name_that_resolves_into_a_denied_network_is_refused_at_connect(
        tcp_db, tmp_path: Path) -> None:
    name = socket.gethostname()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, 5432)}
    except OSError:
        pytest.skip(f"this machine's name {name!r} does not resolve")
    # the name passes the static check at load (no allow list; not an address) ...
    policy = HostPolicy.from_config(None, [*(f"{a}/128" if ":" in a else f"{a}/32"
                                             for a in addrs), "private"])
    src = source_for(with_host(tcp_db.dsn, name), tmp_path, ["public.items"],
                     host_policy=policy)
    # ... and is refused once resolved, before anything is dialled
    with pytest.raises(HostNotAllowed) as err:
        connect_source(src)
    assert err.value.reason == "host_not_allowed"
    assert "resolves to" in err.value.message and name in err.value.message


def test_the_tunnel_host_is_checked_not_the_database_behind_it(
        tcp_db, tmp_path: Path, sshd_server: SshServer) -> None:
    db, ssh = tcp_db, sshd_server
    # the bastion on loopback: refused at load, naming the ssh_tunnel key
    with pytest.raises(HostNotAllowed) as err:
        source_for(db.dsn, tmp_path, ["public.items"], ssh_tunnel=ssh.tunnel(),
                   host_policy=EngineConfig(allowed_hosts=["*"]).host_policy)
    assert "key 'ssh_tunnel'" in err.value.message and "SSH tunnel host" in err.value.message
    # the bastion allowed by address: the database behind it (loopback, as the bastion sees
    # it) is the bastion's business, and the connection goes through
    allowed = EngineConfig(allowed_hosts=["*", "127.0.0.1"]).host_policy
    src = source_for(db.dsn, tmp_path, ["public.items"], ssh_tunnel=ssh.tunnel(),
                     host_policy=allowed)
    with connect_source(src) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.port != db.server.port  # through the local forwarder
    POOL.close()
    # checked again when the bastion is dialled (a policy changed since the config loaded)
    before = ssh.log().count("Connection from")
    deny = HostPolicy.from_config(None, ["127.0.0.0/8"])
    with pytest.raises(CDCError) as at_connect:
        connect(db.dsn, tunnel=src.ssh_tunnel, host_policy=deny)
    assert at_connect.value.reason == "host_not_allowed"
    assert "SSH tunnel host" in at_connect.value.message
    assert ssh.log().count("Connection from") == before  # never dialled

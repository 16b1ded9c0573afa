"""`ssh_tunnel` settings: validation, TOML forms, environment overrides per entry, secrets kept
out of every repr and message; and that no adapter call site can bypass the tunnel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cdcengine.config import SourceConfig, load_config
from cdcengine.errors import ConfigError
from cdcengine.ssh_tunnel import SshTunnel

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "postgres"
PASSWORD = "Bastion-Pw-7731"
PASSPHRASE = "Key-Phrase-5510"


def source(**tunnel: object) -> SourceConfig:
    return SourceConfig(name="shop", dsn="postgresql://cdc:db-pw@db.internal:5432/shop",
                        tables=["public.orders"], destination="/tmp/lake", ssh_tunnel=tunnel)


def key_tunnel(**over: object) -> dict[str, object]:
    t: dict[str, object] = {"host": "bastion.example.com", "user": "cdc",
                            "private_key_file": "/keys/id_ed25519", "known_hosts": "/keys/kh"}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def test_a_key_tunnel_is_parsed_with_the_default_port() -> None:
    src = source(**key_tunnel())
    assert src.ssh_tunnel == SshTunnel(host="bastion.example.com", user="cdc", port=22,
                                       private_key_file="/keys/id_ed25519", known_hosts="/keys/kh")
    assert src.ssh_tunnel.describe() == "ssh://cdc@bastion.example.com:22"
    plain = SourceConfig(name="shop", dsn="postgresql://db/shop", tables=["t"],
                         destination="/tmp/lake")
    assert plain.ssh_tunnel is None


@pytest.mark.parametrize(("tunnel", "key", "says"), [
    (key_tunnel(host=None), "ssh_tunnel.host", "is required"),
    (key_tunnel(host="bad host;rm"), "ssh_tunnel.host", "host name or address"),
    (key_tunnel(user=None), "ssh_tunnel.user", "is required"),
    (key_tunnel(known_hosts=None), "ssh_tunnel.known_hosts", "ssh-keyscan"),
    (key_tunnel(port=0), "ssh_tunnel.port", "1-65535"),
    (key_tunnel(port="22"), "ssh_tunnel.port", "1-65535"),
    (key_tunnel(port=True), "ssh_tunnel.port", "1-65535"),
    (key_tunnel(private_key_file=None), "ssh_tunnel", "exactly one way to log in"),
    (key_tunnel(password=PASSWORD), "ssh_tunnel", "not both"),
    (key_tunnel(private_key_file=None, password=PASSWORD, private_key_passphrase=PASSPHRASE),
     "ssh_tunnel.private_key_passphrase", "only applies with private_key_file"),
    (key_tunnel(password=""), "ssh_tunnel.password", "non-empty"),
    (key_tunnel(enabled=True), "ssh_tunnel.enabled", "unknown key; allowed: host, port"),
])
def test_bad_tunnels_are_refused_naming_the_key(tunnel: dict[str, object], key: str,
                                                says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        source(**tunnel)
    assert f"key {key!r}" in exc.value.message
    assert says in exc.value.message
    assert PASSWORD not in exc.value.message
    assert PASSPHRASE not in exc.value.message


def test_a_tunnel_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a table"):
        SourceConfig(name="shop", dsn="postgresql://db/shop", tables=["t"],
                     destination="/tmp/lake", ssh_tunnel="bastion.example.com")  # type: ignore[arg-type]


def test_secrets_never_show_in_repr_dict_or_errors() -> None:
    src = source(**key_tunnel(private_key_passphrase=PASSPHRASE))
    pw = source(**key_tunnel(private_key_file=None, password=PASSWORD))
    assert PASSPHRASE in src.secrets()
    assert PASSWORD in pw.secrets()
    for text in (repr(src), repr(pw), str(src.ssh_tunnel), repr(pw.ssh_tunnel),
                 str(src.ssh_tunnel.to_dict()), str(pw.ssh_tunnel.to_dict())):
        assert PASSPHRASE not in text
        assert PASSWORD not in text
    assert pw.ssh_tunnel.to_dict()["password"] == "***"
    # an error raised about another key still scrubs the tunnel's secrets
    with pytest.raises(ConfigError) as exc:
        SourceConfig(name="shop", dsn="postgresql://db/shop", tables=[f"a.b.{PASSWORD}"],
                     destination="/tmp/lake",
                     ssh_tunnel=key_tunnel(private_key_file=None, password=PASSWORD))
    assert PASSWORD not in str(exc.value)


def test_toml_sub_table_and_inline_table_resolve_paths_from_the_config_folder(
        tmp_path: Path) -> None:
    (tmp_path / "sub.toml").write_text(
        '[[source]]\nname = "shop"\ndsn = "postgresql://db.internal/shop"\n'
        'tables = ["orders"]\ndestination = "lake"\n'
        '[source.ssh_tunnel]\nhost = "bastion"\nport = 2222\nuser = "cdc"\n'
        'private_key_file = "keys/id"\nknown_hosts = "~/kh"\n')
    (tmp_path / "inline.toml").write_text(
        '[[source]]\nname = "shop"\ndsn = "postgresql://db.internal/shop"\n'
        'tables = ["orders"]\ndestination = "lake"\n'
        'ssh_tunnel = { host = "bastion", port = 2222, user = "cdc", '
        'private_key_file = "keys/id", known_hosts = "~/kh" }\n')
    sub = load_config(tmp_path / "sub.toml", environ={}).sources[0].ssh_tunnel
    inline = load_config(tmp_path / "inline.toml", environ={}).sources[0].ssh_tunnel
    assert sub == inline
    assert sub is not None
    assert sub.private_key_file == str(tmp_path / "keys" / "id")
    assert sub.known_hosts == str(Path("~/kh").expanduser())
    assert sub.port == 2222


def test_environment_sets_single_entries_and_names_itself_in_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[source]]\nname = "shop"\ndsn = "postgresql://db.internal/shop"\n'
                   'tables = ["orders"]\ndestination = "lake"\n'
                   '[source.ssh_tunnel]\nhost = "bastion"\nuser = "cdc"\n'
                   'private_key_file = "/k/id"\nknown_hosts = "/k/kh"\n')
    env = {"CDCENGINE__SHOP__SSH_TUNNEL__PRIVATE_KEY_PASSPHRASE": PASSPHRASE,
           "CDCENGINE__SHOP__SSH_TUNNEL__PORT": "2200"}
    t = load_config(cfg, environ=env).sources[0].ssh_tunnel
    assert t is not None
    assert (t.host, t.port, t.private_key_passphrase) == ("bastion", 2200, PASSPHRASE)
    with pytest.raises(ConfigError) as bad:
        load_config(cfg, environ={"CDCENGINE__SHOP__SSH_TUNNEL__PORT": "70000"})
    assert "CDCENGINE__SHOP__SSH_TUNNEL__PORT" in bad.value.message
    assert "'ssh_tunnel.port'" in bad.value.message
    with pytest.raises(ConfigError, match="unknown ssh_tunnel key 'pasword'"):
        load_config(cfg, environ={"CDCENGINE__SHOP__SSH_TUNNEL__PASWORD": "x"})
    # a whole table as JSON, then an entry on top of it
    env_only = {"CDCENGINE__SHOP__SSH_TUNNEL": '{"host": "b2", "user": "u", "password": "p1", '
                                               '"known_hosts": "/k/kh"}',
                "CDCENGINE__SHOP__SSH_TUNNEL__PASSWORD": PASSWORD}
    t2 = load_config(cfg, environ=env_only).sources[0].ssh_tunnel
    assert t2 is not None
    assert (t2.host, t2.password, t2.private_key_file) == ("b2", PASSWORD, None)


def test_a_source_name_with_double_underscores_still_reaches_its_own_keys(
        tmp_path: Path) -> None:
    env = {"CDCENGINE__A__B__DSN": "postgresql://db/x", "CDCENGINE__A__B__TABLES": '["t"]',
           "CDCENGINE__A__B__DESTINATION": str(tmp_path / "lake")}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    (src,) = load_config(empty, environ=env).sources
    assert src.name == "a__b"
    assert src.ssh_tunnel is None


def _dsn_connects(tree: ast.AST) -> list[int]:
    """Lines calling `connect(<expr>.dsn, ...)`: a source connection that skips its tunnel."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "connect" and node.args \
                and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "dsn":
            bad.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "ReplicationStream" and node.args \
                and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "dsn" \
                and not any(k.arg == "tunnel" for k in node.keywords):
            bad.append(node.lineno)
    return bad


def test_no_adapter_module_opens_a_source_connection_without_its_tunnel() -> None:
    """Every source connection goes through `connect_source` (or passes `tunnel=`): the
    connection module itself and the throwaway/bench helpers (their own dsns) are exempt."""
    offenders = []
    for path in ADAPTER.rglob("*.py"):
        rel = path.relative_to(ADAPTER)
        if rel.parts[0] in ("testing", "bench") or rel.name == "connection.py":
            continue
        offenders += [f"{rel}:{line}" for line in _dsn_connects(ast.parse(path.read_text()))]
    assert offenders == [], "use connect_source(source, ...): " + ", ".join(offenders)
    # the check itself catches both shapes
    assert _dsn_connects(ast.parse("connect(self.source.dsn, secrets=s)")) == [1]
    assert _dsn_connects(ast.parse("ReplicationStream(source.dsn, slot='s')")) == [1]
    assert _dsn_connects(ast.parse("ReplicationStream(source.dsn, tunnel=t)")) == []

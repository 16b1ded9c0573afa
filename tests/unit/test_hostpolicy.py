"""The host policy (issue 17 item 4): parsing, static checks at config load, resolved checks and
address pinning at connect. Pure code: names resolve through the machine's resolver (localhost
only), no server."""

from __future__ import annotations

import pytest

from cdcengine.config import EngineConfig, SourceConfig, load_config
from cdcengine.errors import ConfigError, Reason, SourceUnreachable
from cdcengine.hostpolicy import HostNotAllowed, HostPolicy, dsn_hosts
from cdcengine_postgres.host_guard import pin_hosts


def source(dsn: str, policy: HostPolicy) -> SourceConfig:
    return SourceConfig(name="shop", dsn=dsn, tables=["public.t"], destination="/tmp/lake",
                        host_policy=policy)


def test_off_by_default_allows_everything() -> None:
    policy = EngineConfig().host_policy
    assert not policy.enabled
    source("postgresql://u:pw@127.0.0.1/db", policy)
    source("postgresql:///db", policy)
    params = {"host": "localhost", "port": "5432"}
    assert pin_hosts(dict(params), policy) == params


@pytest.mark.parametrize("dsn", [
    "postgresql://u:pw@10.0.0.5:5432/db",
    "postgresql://u:pw@169.254.169.254/db",  # the cloud metadata endpoint
    "postgresql://u:pw@[::1]:5432/db",
    "postgresql://u:pw@[::ffff:10.1.1.1]/db",  # IPv4-mapped
    "host=localhost dbname=x",
    "host=db.localhost dbname=x",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql://u:pw@db.example.com,192.168.1.4:5433/db",  # any host of a list
    "host=db.example.com hostaddr=172.16.0.9 dbname=x",  # hostaddr is what libpq dials
])
def test_enabled_default_denies_local_and_private(dsn: str) -> None:
    policy = EngineConfig(allowed_hosts=["*"]).host_policy
    with pytest.raises(HostNotAllowed) as err:
        source(dsn, policy)
    assert err.value.reason == Reason.HOST_NOT_ALLOWED
    assert isinstance(err.value, ConfigError)  # the CLI reports it like any bad config
    assert "pw" not in str(err.value)
    assert "key 'dsn'" in err.value.message and "allowed_hosts" in err.value.fix


@pytest.mark.parametrize("dsn", ["postgresql://u:pw@db.example.com/db",
                                 "postgresql://u:pw@203.0.113.7:6432/db"])
def test_enabled_allows_public(dsn: str) -> None:
    source(dsn, EngineConfig(allowed_hosts=["*"]).host_policy)


def test_allow_list_names_wildcards_and_address_exceptions() -> None:
    policy = EngineConfig(allowed_hosts=["*.corp.example", "db.example.com", "10.1.2.0/24",
                                         "/run/pg"]).host_policy
    source("postgresql://u@a.corp.example/db", policy)
    source("postgresql://u@DB.example.com./db", policy)  # case and a trailing dot
    source("postgresql://u@10.1.2.7/db", policy)  # an address entry overrides the deny list
    source("host=/run/pg dbname=x", policy)
    for dsn in ("postgresql://u@corp.example.evil/db", "postgresql://u@other.example.com/db",
                "postgresql://u@10.1.3.1/db", "postgresql://u@8.8.8.8/db"):
        with pytest.raises(HostNotAllowed, match="not in \\[engine\\] allowed_hosts"):
            source(dsn, policy)
    # a name on the allow list is still refused when it resolves into a denied network
    with pytest.raises(HostNotAllowed, match="denied network"):
        policy.check_address("10.9.9.9", host="a.corp.example")
    policy.check_address("10.1.2.200", host="a.corp.example")


def test_denied_networks_only_and_extension_of_the_builtin_list() -> None:
    policy = EngineConfig(denied_networks=["private", "203.0.113.0/24"]).host_policy
    source("postgresql://u@db.example.com/db", policy)
    for dsn in ("postgresql://u@203.0.113.9/db", "postgresql://u@127.0.0.1/db"):
        with pytest.raises(HostNotAllowed, match="denied network"):
            source(dsn, policy)
    only = EngineConfig(denied_networks=["203.0.113.0/24"]).host_policy
    source("postgresql://u@127.0.0.1/db", only)  # an explicit list replaces the built-in one


@pytest.mark.parametrize(("key", "value", "text"), [
    ("allowed_hosts", ["db example"], "is not a host name"),
    ("denied_networks", ["10.0.0.0/33"], "is not a network"),
    ("allowed_hosts", "db.example.com", "must be a list of strings"),
])
def test_bad_policy_entries_are_config_errors(key: str, value: object, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as err:
        EngineConfig(**{key: value})  # type: ignore[arg-type]
    assert f"key {key!r}" in err.value.message


def test_load_config_applies_the_engine_policy_to_sources(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text('[engine]\nallowed_hosts = ["*"]\n\n[[source]]\nname = "shop"\n'
                   'dsn = "postgresql://u:secretpw@192.168.7.7/db"\ntables = ["public.t"]\n'
                   'destination = "./lake"\n')
    with pytest.raises(HostNotAllowed) as err:
        load_config(cfg, environ={})
    assert "secretpw" not in str(err.value) and "192.168.7.7" in err.value.message
    # the same policy switched on from the environment, on a file without it
    cfg.write_text('[[source]]\nname = "shop"\ndsn = "postgresql://u@192.168.7.7/db"\n'
                   'tables = ["public.t"]\ndestination = "./lake"\n')
    assert load_config(cfg, environ={}).sources[0].host_policy.enabled is False
    with pytest.raises(HostNotAllowed):
        load_config(cfg, environ={"CDCENGINE__ENGINE__DENIED_NETWORKS": '["private"]'})


def test_pin_hosts_resolves_checks_and_pins() -> None:
    allow_loopback = HostPolicy.from_config(["127.0.0.0/8", "::1"], None)
    pinned = pin_hosts({"host": "localhost", "port": 5499, "dbname": "x"}, allow_loopback)
    hosts = pinned["host"].split(",")  # type: ignore[union-attr]
    addrs = pinned["hostaddr"].split(",")  # type: ignore[union-attr]
    assert set(hosts) == {"localhost"} and "127.0.0.1" in addrs
    assert len(hosts) == len(addrs) == len(str(pinned["port"]).split(","))
    assert pinned["dbname"] == "x"
    with pytest.raises(HostNotAllowed, match="resolves to"):
        pin_hosts({"host": "localhost"}, HostPolicy.from_config(["*"], None))
    # a hostaddr given in the dsn is what libpq dials: it is the one checked
    with pytest.raises(HostNotAllowed):
        pin_hosts({"host": "db.example.com", "hostaddr": "10.0.0.1"},
                  HostPolicy.from_config(["*"], None))
    with pytest.raises(SourceUnreachable) as err:
        pin_hosts({"host": "no-such-host.invalid"}, HostPolicy.from_config(["*"], None))
    assert err.value.reason == Reason.HOST_UNREACHABLE


def test_dsn_hosts_parses_both_forms() -> None:
    assert dsn_hosts("postgresql://u:p@h1:5432,[::1]:5433,h3/db?hostaddr=1.2.3.4") == [
        "h1", "::1", "h3", "1.2.3.4"]
    assert dsn_hosts("host='a b' hostaddr=5.6.7.8 password='x y'") == ["a b", "5.6.7.8"]
    assert dsn_hosts("postgresql:///db?host=%2Fvar%2Frun") == ["/var/run"]
    assert dsn_hosts("dbname=x", default="/sock") == ["/sock"]

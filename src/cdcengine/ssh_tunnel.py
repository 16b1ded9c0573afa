"""A source's `ssh_tunnel` settings: what they accept, and their secrets (issue 17).

The fields are the seed API's tunnel fields: the bastion's `host` and `port` (default 22), the
`user` to log in as, and exactly one way to authenticate, `private_key_file` (with an optional
`private_key_passphrase`) or `password`; plus `known_hosts`, the file holding the bastion's host
key. In TOML either an inline table or a sub-table of the source:

    [[source]]
    name = "shop"
    dsn = "postgresql://cdc:pw@db.internal:5432/shop"   # the database as the bastion sees it
    ...
    [source.ssh_tunnel]
    host = "bastion.example.com"
    user = "cdc"
    private_key_file = "keys/cdc_ed25519"
    known_hosts = "keys/known_hosts"

`known_hosts` is required: a tunnel whose bastion key is not known in advance is refused, never
trusted on first use -- the bastion sees every byte of the replication stream, so a host that
merely answers on the right address must not be taken for it. Relative file names are resolved
from the config file's folder (the loader calls `resolve_paths`); that the files exist and are
readable is checked when the tunnel opens, where the error can name the file and the fix.

This module is engine-neutral and imports no SSH library: the tunnel itself is opened by the
adapter (`cdcengine_postgres.tunnel`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from cdcengine.errors import ConfigError

__all__ = ["SSH_TUNNEL_KEYS", "SshTunnel", "parse_ssh_tunnel", "resolve_paths", "tunnel_secrets"]

#: The keys of an `ssh_tunnel` table, each with the kind its environment variable is parsed as
#: (`CDCENGINE__<SOURCE>__SSH_TUNNEL__<KEY>`).
SSH_TUNNEL_KEYS: dict[str, str] = {
    "host": "str", "port": "int", "user": "str", "private_key_file": "str",
    "private_key_passphrase": "str", "password": "str", "known_hosts": "str",
}
_PATH_KEYS = ("private_key_file", "known_hosts")
# a DNS name, an IPv4 address or a bare IPv6 address: nothing a shell or a URL would split
_HOST = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
# POSIX-ish login names (letters, digits, . _ -, optionally a trailing $)
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}\$?$")

Fail = Callable[[str, str], ConfigError]


@dataclass(frozen=True, slots=True, kw_only=True)
class SshTunnel:
    """How to reach a source through an SSH bastion. Validated by `parse_ssh_tunnel`.

    Frozen and hashable: the adapter keeps one SSH connection per distinct value per process.
    The password and the key's passphrase never appear in a repr (`secrets()` lists them for
    scrubbing); `describe()` is the printable form.
    """

    host: str
    user: str
    known_hosts: str
    port: int = 22
    private_key_file: str | None = None
    private_key_passphrase: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.private_key_passphrase) if s)

    def describe(self) -> str:
        """`ssh://user@host:port` (no secret), for logs and messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"

    def to_dict(self) -> dict[str, object]:
        """JSON-safe and secret-free: the secrets are shown as `***` when set."""
        return {f.name: ("***" if f.name in ("password", "private_key_passphrase")
                         and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}


def parse_ssh_tunnel(value: object, fail: Fail) -> SshTunnel | None:
    """`value` (None, an `SshTunnel`, or a table of the keys above) as a checked `SshTunnel`.

    `fail(key, what)` builds the error (the caller adds where the value came from); `key` is
    `ssh_tunnel.<field>`. Messages never quote a password or a passphrase.
    """
    if value is None:
        return None
    if isinstance(value, SshTunnel):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if not isinstance(value, Mapping):
        raise fail("ssh_tunnel", "must be a table such as { host = \"bastion.example.com\", "
                   "user = \"cdc\", private_key_file = \"id_ed25519\", known_hosts = "
                   "\"known_hosts\" }")
    unknown = sorted(str(k) for k in value if k not in SSH_TUNNEL_KEYS)
    if unknown:
        raise fail(f"ssh_tunnel.{unknown[0]}", "unknown key; allowed: "
                   + ", ".join(SSH_TUNNEL_KEYS))
    got = {k: v for k, v in value.items() if v is not None}

    def text(key: str, pattern: re.Pattern[str] | None, what: str, *, required: bool,
             secret: bool = False) -> str | None:
        v = got.get(key)
        if v is None:
            if required:
                raise fail(f"ssh_tunnel.{key}", f"is required: {what}")
            return None
        if not isinstance(v, str) or not v.strip() or "\x00" in v or (
                pattern is not None and not pattern.match(v)):
            shown = "" if secret else f" (got {v!r})"
            raise fail(f"ssh_tunnel.{key}", f"must be {what}{shown}")
        return v

    host = text("host", _HOST, "the bastion's host name or address, such as "
                "bastion.example.com", required=True)
    user = text("user", _USER, "the user name to log in to the bastion as", required=True)
    known = text("known_hosts", None, "a known_hosts file holding the bastion's host key "
                 "(make one with: ssh-keyscan -p PORT HOST > known_hosts, then check the "
                 "fingerprint)", required=True)
    port = got.get("port", 22)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise fail("ssh_tunnel.port", f"must be an integer 1-65535 (got {port!r})")
    key_file = text("private_key_file", None, "the path of a private key file", required=False)
    passphrase = text("private_key_passphrase", None, "a non-empty string", required=False,
                      secret=True)
    password = text("password", None, "a non-empty string", required=False, secret=True)
    if (key_file is None) == (password is None):
        raise fail("ssh_tunnel", "give exactly one way to log in to the bastion: "
                   "private_key_file (recommended) or password"
                   + (", not both" if key_file is not None else ""))
    if passphrase is not None and key_file is None:
        raise fail("ssh_tunnel.private_key_passphrase",
                   "only applies with private_key_file")
    assert host is not None
    assert user is not None
    assert known is not None
    return SshTunnel(host=host, port=port, user=user, known_hosts=known,
                     private_key_file=key_file, private_key_passphrase=passphrase,
                     password=password)


def resolve_paths(value: object, base: Path) -> object:
    """`value` with its relative `private_key_file` / `known_hosts` made absolute from `base`
    (the config file's folder) and `~` expanded; anything else is returned unchanged, for
    `parse_ssh_tunnel` to judge."""
    if not isinstance(value, Mapping):
        return value
    out = dict(value)
    for key in _PATH_KEYS:
        v = out.get(key)
        if isinstance(v, str) and v.strip():
            p = Path(v).expanduser()
            out[key] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def tunnel_secrets(value: object) -> tuple[str, ...]:
    """The password and passphrase of an `SshTunnel` or of a not yet checked table, for
    scrubbing messages (a config error can be raised before the table is parsed)."""
    if isinstance(value, SshTunnel):
        return value.secrets()
    if isinstance(value, Mapping):
        return tuple(v for k in ("password", "private_key_passphrase")
                     if isinstance(v := value.get(k), str) and v)
    return ()

"""Which hosts this engine may connect to: an opt-in policy for services that embed the engine and
let their users register sources (issue 17 item 4).

Without it, a user who may register a source can point the engine at the service's own network
(the metadata endpoint at 169.254.169.254, a database on 10.0.0.5, the engine's state store on
localhost) and read whatever answers. With it, every database host and SSH tunnel host is checked
twice:

- at config load (`SourceConfig`), statically: a literal address against the networks, a name
  against `allowed_hosts`; nothing is resolved there (a config must load without the network);
- at connect (the adapter), after DNS: every address the name resolves to must pass, and the
  connection is then pinned to those addresses (libpq `hostaddr`), so a name that resolves to a
  public address at the check and to a private one a moment later (DNS rebinding) cannot slip
  through.

Rules, in `[engine]`:

- `allowed_hosts`: host names (`db.example.com`), wildcards (`*.example.com`, `*` for any),
  addresses and networks (`203.0.113.7`, `10.1.2.0/24`). When given, a host must match an entry.
  An address or network entry is also an explicit exception to `denied_networks` (that is how a
  service allows its one private database); a *name* never is, because whoever controls the
  name's DNS controls where it points.
- `denied_networks`: networks refused after resolution. `"private"` stands for the built-in list
  (`PRIVATE_NETWORKS`: loopback, link-local, RFC 1918, CGNAT, ULA, unspecified, multicast,
  reserved); it is the default when only `allowed_hosts` is given.

The policy is on when either key is set. A unix-socket host (a path) is local by definition and
refused while the policy is on, unless the path itself is listed in `allowed_hosts`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cdcengine.errors import ConfigError, Reason

__all__ = ["PRIVATE_NETWORKS", "HostNotAllowed", "HostPolicy", "dsn_hosts"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Everything a tenant must not reach on the service's side: loopback, link-local (cloud metadata
# endpoints live there), private ranges, carrier-grade NAT, "this network", multicast, reserved,
# and their IPv6 counterparts. IPv4-mapped IPv6 addresses are unmapped before the check.
PRIVATE_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "64:ff9b:1::/48", "fc00::/7", "fe80::/10", "ff00::/8",
)
PRIVATE = "private"

_NAME = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                   r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?)$")


class HostNotAllowed(ConfigError):
    """A database or tunnel host this engine's host policy refuses (`host_not_allowed`)."""

    default_reason = Reason.HOST_NOT_ALLOWED


def _address(text: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The parsed `[engine] allowed_hosts` / `denied_networks`. `HostPolicy()` allows all."""

    enabled: bool = False
    allowed_names: tuple[str, ...] = ()  # lower-case names and `*.suffix` / `*` patterns
    allowed_networks: tuple[IPNetwork, ...] = ()
    allowed_paths: tuple[str, ...] = ()  # unix-socket directories listed explicitly
    denied_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, allowed_hosts: Sequence[str] | None,
                    denied_networks: Sequence[str] | None) -> HostPolicy:
        """Parse the two keys; raises ValueError naming the bad entry (the caller says where)."""
        if allowed_hosts is None and denied_networks is None:
            return cls()
        names: list[str] = []
        nets: list[IPNetwork] = []
        paths: list[str] = []
        for entry in allowed_hosts or ():
            text = str(entry).strip()
            if text.startswith("/"):
                paths.append(text.rstrip("/") or "/")
            elif (net := _network(text)) is not None:
                nets.append(net)
            elif _NAME.match(text):
                names.append(text.lower().rstrip("."))
            else:
                raise ValueError(f"allowed_hosts entry {entry!r} is not a host name, a "
                                 "*.domain wildcard, an address, a network or a socket path")
        denied: list[IPNetwork] = []
        for entry in denied_networks if denied_networks is not None else (PRIVATE,):
            text = str(entry).strip()
            if text == PRIVATE:
                denied.extend(ipaddress.ip_network(n) for n in PRIVATE_NETWORKS)
            elif (net := _network(text)) is not None:
                denied.append(net)
            else:
                raise ValueError(f"denied_networks entry {entry!r} is not a network such as "
                                 f"10.0.0.0/8, an address, or {PRIVATE!r} (the built-in list)")
        return cls(enabled=True, allowed_names=tuple(names), allowed_networks=tuple(nets),
                   allowed_paths=tuple(paths), denied_networks=tuple(denied))

    # -- checks --------------------------------------------------------------------------

    def check_host(self, host: str, *, what: str = "database host") -> None:
        """The static check of one host as written (config load): raises `HostNotAllowed`."""
        if not self.enabled:
            return
        if host.startswith("/") or host.startswith("@"):
            if (host.rstrip("/") or "/") not in self.allowed_paths:
                raise _refused(what, host, "is a local unix socket")
            return
        addr = _address(host)
        if addr is None and host.lower().rstrip(".").split(".")[-1] == "localhost":
            addr = ipaddress.ip_address("127.0.0.1")  # RFC 6761: always loopback
        if addr is not None:
            self.check_address(addr, host=host, what=what)
            return
        if not self._name_allowed(host):
            raise _refused(what, host, "is not in [engine] allowed_hosts")

    def check_address(self, addr: IPAddress | str, *, host: str,
                      what: str = "database host") -> None:
        """One resolved address of `host`: allowed by an address entry, or outside the denied
        networks (and, with an allow list, `host` itself allowed)."""
        if not self.enabled:
            return
        ip = _address(str(addr)) if isinstance(addr, str) else addr
        if ip is None:
            raise _refused(what, host, f"resolved to {addr!r}, which is not an address")
        if any(ip in net for net in self.allowed_networks if net.version == ip.version):
            return
        literal = _address(host) is not None
        if not self._name_allowed(host, literal=literal):
            raise _refused(what, host, "is not in [engine] allowed_hosts")
        for net in self.denied_networks:
            if net.version == ip.version and ip in net:
                shown = host if literal else f"{host} (resolves to {ip})"
                raise _refused(what, shown, f"is in a denied network ({net})")

    def resolve(self, host: str, port: int | str, *,
                what: str = "database host") -> tuple[str, ...]:
        """The addresses `host` resolves to, every one checked; the caller connects only to
        these (pinning them), never to a second resolution. Raises `HostNotAllowed`, or
        `OSError` when the name does not resolve (the connect attempt reports that as usual)."""
        self.check_host(host, what=what)
        if (literal := _address(host)) is not None:
            return (str(literal),)
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for a in addrs:
            self.check_address(a, host=host, what=what)
        return tuple(addrs)

    @property
    def _has_allow_list(self) -> bool:
        return bool(self.allowed_names or self.allowed_networks or self.allowed_paths)

    def _name_allowed(self, host: str, *, literal: bool = False) -> bool:
        """Whether the allow list admits `host` by name (`*` admits every host, an address
        written literally only through `*` or an address entry)."""
        if not self._has_allow_list or "*" in self.allowed_names:
            return True
        if literal:
            return False
        name = host.lower().rstrip(".")
        for pattern in self.allowed_names:
            if pattern == name:
                return True
            if pattern.startswith("*.") and name.endswith(pattern[1:]):
                return True
        return False


def _network(text: str) -> IPNetwork | None:
    try:
        net = ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        return None
    return net


def _refused(what: str, host: str, why: str) -> HostNotAllowed:
    return HostNotAllowed(
        f"{what} {host!r} is not allowed: it {why}.",
        fix="Use a host this service allows. An operator can allow it in [engine] "
            "allowed_hosts (a name, or an address/network to make an exception to "
            "denied_networks).",
    )


# ---- where a dsn points ---------------------------------------------------------------------

_KV_PAIR = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")


def dsn_hosts(dsn: str, default: str = "") -> list[str]:
    """The hosts (and `hostaddr` addresses) a libpq dsn names, URL or key/value form; the
    `default` (e.g. `$PGHOST` or the unix-socket directory) when it names none. A pure parser
    for config-time checks; the adapter checks libpq's own parse again at connect."""
    params: dict[str, str] = {}
    text = dsn.strip()
    url = re.match(r"postgres(?:ql)?://", text, re.IGNORECASE)
    if url:
        rest = text[url.end():]
        authority, _, tail = rest.partition("/")
        if "?" in authority:
            authority, _, query = authority.partition("?")
            tail = "?" + query
        hostlist = authority.rsplit("@", 1)[-1]
        hosts = []
        for part in _split_url_hosts(hostlist):
            if part:
                hosts.append(urllib.parse.unquote(part))
        if hosts:
            params["host"] = ",".join(hosts)
        query = tail.partition("?")[2]
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if key in ("host", "hostaddr"):
                params[key] = value
    else:
        for m in _KV_PAIR.finditer(text):
            key, value = m.group(1), m.group(2)
            if value.startswith("'") and value.endswith("'") and len(value) >= 2:
                value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
            if key in ("host", "hostaddr"):
                params[key] = value
    out = [h.strip() for key in ("host", "hostaddr") for h in params.get(key, "").split(",")]
    out = [h for h in out if h]
    return out or ([default] if default else [])


def _split_url_hosts(hostlist: str) -> Iterable[str]:
    """`h1:5432,[::1]:5433,h3` → `h1`, `::1`, `h3` (ports dropped)."""
    for part in hostlist.split(","):
        part = part.strip()
        if part.startswith("["):
            yield part[1:part.find("]")] if "]" in part else part[1:]
        else:
            yield part.split(":", 1)[0]

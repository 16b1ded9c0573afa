"""The host policy at connect time: resolve, check every address, pin libpq to them.

`cdcengine.hostpolicy.HostPolicy` decides; this module applies it to libpq's own parse of a dsn
(`conninfo_to_dict`), so what is checked is exactly what libpq would connect to:

- a `hostaddr` the dsn gives is what libpq dials: each one is checked;
- otherwise every host name is resolved here, each address checked, and the connection is pinned
  to those addresses (`host` repeated once per address, `hostaddr` the addresses, `port` aligned):
  libpq never resolves the name a second time, so DNS cannot answer differently after the check
  (rebinding). `host` stays the name, so `sslmode=verify-full` still checks the certificate
  against it;
- a unix-socket host (a path, or no host at all) is checked as written.

With the policy off (the default) the parameters pass through untouched.
"""

from __future__ import annotations

import os

from cdcengine.errors import Reason, SourceUnreachable
from cdcengine.hostpolicy import HostPolicy

__all__ = ["pin_hosts"]

_DEFAULT_SOCKET_DIR = "/var/run/postgresql"


def pin_hosts(params: dict[str, str | int], policy: HostPolicy) -> dict[str, str | int]:
    """`params` (libpq keywords) checked against `policy` and pinned to checked addresses.

    Raises `HostNotAllowed` for a refused host, `SourceUnreachable(host_unreachable)` for a name
    that does not resolve (an unresolved name is never handed to libpq to resolve later)."""
    if not policy.enabled:
        return params
    hosts = _split(params.get("host")) or [os.environ.get("PGHOST") or _DEFAULT_SOCKET_DIR]
    given_addrs = _split(params.get("hostaddr"))
    ports = _split(params.get("port")) or [os.environ.get("PGPORT") or "5432"]
    if len(ports) == 1:
        ports = ports * len(hosts)
    if given_addrs:
        for i, addr in enumerate(given_addrs):
            shown = hosts[i] if i < len(hosts) and hosts[i] else addr
            policy.check_address(addr, host=shown if shown == addr else f"{shown} ({addr})")
        return params
    out_hosts: list[str] = []
    out_addrs: list[str] = []
    out_ports: list[str] = []
    for host, port in zip(hosts, ports, strict=False):
        if host.startswith("/") or host.startswith("@"):
            policy.check_host(host)
            out_hosts.append(host)
            out_addrs.append("")
            out_ports.append(port)
            continue
        try:
            addrs = policy.resolve(host, port)
        except OSError:
            raise SourceUnreachable(
                f"The database host {host!r} does not resolve.",
                reason=Reason.HOST_UNREACHABLE) from None
        out_hosts += [host] * len(addrs)
        out_addrs += list(addrs)
        out_ports += [port] * len(addrs)
    pinned = dict(params)
    pinned["host"] = ",".join(out_hosts)
    pinned["hostaddr"] = ",".join(out_addrs)
    pinned["port"] = ",".join(out_ports)
    return pinned


def _split(value: str | int | None) -> list[str]:
    if value is None or value == "":
        return []
    return [part.strip() for part in str(value).split(",")]

"""Opening connections to the source database.

Every connection the adapter opens goes through `connect`, so that:
- the session settings SPEC §6 fixes for reading data are pinned at connection start through
  libpq's `options` (`-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601
  -c bytea_output=hex -c extra_float_digits=3`). Startup-packet settings apply before the first
  query, on a walsender (replication) connection too, and cost no round trip; a pooler that
  resets sessions (`DISCARD ALL`) keeps them as the session defaults. They come after any
  `options` the dsn already has, so a user's `-c search_path=...` stays and a user's
  `-c TimeZone=...` cannot change how values are rendered (the server applies `-c` switches in
  order; the last one wins).
- every failure is a `CDCError` (`cdcengine_postgres.errors`) whose message is static: libpq
  echoes the offending token of a malformed dsn (`invalid percent-encoded token: "p%zzsecret"`)
  and names host, port and user in connection errors. The dsn's password is passed as a secret, so
  even the chained cause is a scrubbed copy when the driver's text contained it.

- a source with `ssh_tunnel` settings is reached through its bastion (`cdcengine_postgres.tunnel`):
  libpq connects to a local forwarder (`hostaddr=127.0.0.1 port=<local>`) and keeps the dsn's
  `host`, so TLS still verifies the database's name. Call sites pass the source, not its dsn,
  through `connect_source`, so none can forget the tunnel (a unit test checks that no adapter
  module calls `connect(<x>.dsn, ...)`).

The dsn is never logged, printed or put in an exception. Callers must print only the `CDCError`
(`str(err)`, `err.message`, `err.to_dict()`), never the text of its chained cause.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, Reason, SourceUnreachable
from cdcengine.hostpolicy import HostPolicy
from cdcengine.secrets import dsn_password
from cdcengine.ssh_tunnel import SshTunnel
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.host_guard import pin_hosts

if TYPE_CHECKING:  # imported when a tunnel is used: paramiko (and cryptography) load slowly
    from cdcengine_postgres.tunnel import Listener

__all__ = ["PINNED_SETTINGS", "connect", "connect_source", "quote_ident", "server_version",
           "session_options"]

# SPEC §6: how values are rendered in text (COPY, pgoutput text mode, SELECT) must not depend on the
# server's or the role's defaults. extra_float_digits=3 gives shortest-exact floats (PG 12+).
# client_encoding=UTF8: the server converts text from the database's encoding (e.g. LATIN1) to
# UTF-8 in COPY, pgoutput and SELECT alike; left at the database's default, a LATIN1 'é' arrived
# as one invalid UTF-8 byte and Delta got NULL (a SQL_ASCII database converts nothing: its
# invalid bytes are still masked and counted).
PINNED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("client_encoding", "UTF8"),
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "3"),
)


def session_options(existing: str | None = None) -> str:
    """libpq `options` with the pinned settings appended to `existing` (kept first, ours win)."""
    pinned = " ".join(f"-c {name}={value}" for name, value in PINNED_SETTINGS)
    existing = (existing or "").strip()
    return f"{existing} {pinned}" if existing else pinned


def connect(
    dsn: str,
    *,
    replication: bool = False,
    autocommit: bool = True,
    connect_timeout: int = 10,
    application_name: str = "cdcengine",
    secrets: Iterable[str] = (),
    tunnel: SshTunnel | None = None,
    host_policy: HostPolicy | None = None,
) -> psycopg.Connection[TupleRow]:
    """Open a connection with the SPEC §6 session settings pinned.

    `dsn` is a libpq URL or key/value string. `connect_timeout` (seconds) and `application_name`
    apply unless the dsn sets its own (the dsn is the user's word); the pinned settings are
    appended to the dsn's `options` (or to `PGOPTIONS` when the dsn has none). `secrets` are
    extra strings to keep out of error text, besides the dsn's own password.

    `tunnel`: reach the database through this SSH bastion (the dsn's host and port are the
    database's as the bastion sees them); its SSH connection is opened, or opened again after
    it died, here. Source call sites use `connect_source`, which passes the source's own.

    `host_policy` (the engine's `[engine] allowed_hosts / denied_networks`, carried by the
    source): when on, the database host is resolved, checked and pinned (`host_guard`) — or,
    through a tunnel, the bastion is (`tunnel.open_ssh`) — and a refused host raises
    `HostNotAllowed` (`host_not_allowed`) before anything is dialled.

    `replication=True` opens a logical walsender connection (`replication=database`), which
    IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT and START_REPLICATION need. Such a connection accepts
    only the simple query protocol: run statements without parameters (psycopg then uses
    `PQexec`); a parameterised query fails with 08P01 "extended query protocol not supported in a
    replication connection". It is always in autocommit mode (a walsender has no transaction
    blocks for replication commands), so `autocommit=False` is refused with ValueError.

    Raises a `CDCError` (mostly `SourceUnreachable`: `dsn_invalid`, `auth_failed`,
    `connection_failed`, `host_unreachable`, `ssl_required`, `database_missing`; through a
    tunnel also `ssh_tunnel_failed`, `ssh_auth_failed`, `ssh_host_key_mismatch`, or a
    `ConfigError` for a missing key or known_hosts file), never a psycopg exception; its message
    never contains the dsn, its password or a tunnel secret.
    """
    if replication and not autocommit:
        raise ValueError("a replication connection is always in autocommit mode")
    password = dsn_password(dsn)
    hidden = tuple(s for s in (password, *secrets, *(tunnel.secrets() if tunnel else ())) if s)
    with translate_errors(secrets=hidden, context=None):
        params: dict[str, str | int] = {
            key: value for key, value in conninfo_to_dict(dsn).items() if value is not None
        }
        # The parsed password (percent-decoded) is a secret too, e.g. in an auth error.
        parsed_password = params.get("password")
        if isinstance(parsed_password, str) and parsed_password:
            hidden = (*hidden, parsed_password)
    with translate_errors(secrets=hidden, context=None):
        # libpq would ignore PGOPTIONS once `options` is given: keep it as the user's own part.
        existing = params.get("options") or os.environ.get("PGOPTIONS")
        params["options"] = session_options(existing if isinstance(existing, str) else None)
        params.setdefault("connect_timeout", connect_timeout)
        params.setdefault("application_name", application_name)
        if replication:
            params["replication"] = "database"
        else:
            params.pop("replication", None)
        if tunnel is None and host_policy is not None:
            params = pin_hosts(params, host_policy)
        route = (_route(params, tunnel, connect_timeout, host_policy) if tunnel is not None
                 else None)
        started = time.monotonic()
    try:
        with translate_errors(secrets=hidden, context=None):
            return psycopg.connect(make_conninfo("", **params), autocommit=autocommit)
    except CDCError as err:
        # the forwarder accepted libpq's socket but the bastion would not open the channel:
        # say so, rather than "the server closed the connection"
        why = route.failure_since(started) if route is not None else None
        if why is None or tunnel is None:
            raise
        from cdcengine_postgres.tunnel import tunnel_error

        raise tunnel_error(tunnel, why) from err


def connect_source(
    source: SourceConfig,
    *,
    replication: bool = False,
    autocommit: bool = True,
    connect_timeout: int = 10,
    application_name: str = "cdcengine",
) -> psycopg.Connection[TupleRow]:
    """`connect` to `source`: its dsn, through its `ssh_tunnel` when it has one, with its
    secrets kept out of every error. What every adapter call site uses."""
    return connect(source.dsn, replication=replication, autocommit=autocommit,
                   connect_timeout=connect_timeout, application_name=application_name,
                   secrets=source.secrets(), tunnel=source.ssh_tunnel,
                   host_policy=source.host_policy)


def _route(params: dict[str, str | int], tunnel: SshTunnel, timeout_s: int,
           host_policy: HostPolicy | None = None) -> Listener:
    """Point `params` at the local forwarder of the database they name, through `tunnel`.

    The database is the dsn's `hostaddr`, else its `host` (else PGHOST), at its `port` (else
    PGPORT, else 5432), as the bastion resolves it; `host` is kept for TLS name checks. One TCP
    host only: a unix socket or a list of hosts cannot be forwarded.
    """
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    addr = str(params.get("hostaddr") or "") or host
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    if not host or host.startswith("/") or "," in host + addr + port:
        raise SourceUnreachable(
            "with ssh_tunnel the dsn must name one database host (as the bastion sees it), "
            "not a unix socket or a list of hosts", reason=Reason.DSN_INVALID,
            fix="Write the database's host and port as reached from the bastion, e.g. "
                "postgresql://user:password@db.internal:5432/dbname.")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SourceUnreachable("the dsn's port is not a TCP port number",
                                reason=Reason.DSN_INVALID)
    from cdcengine_postgres.tunnel import POOL

    listener = POOL.route(tunnel, (addr, int(port)), timeout_s=timeout_s, policy=host_policy)
    params.update(host=host, hostaddr="127.0.0.1", port=listener.port)
    return listener


def server_version(conn: psycopg.Connection[TupleRow]) -> int:
    """The server's `server_version_num` (e.g. 150018), as libpq reported it at startup."""
    return conn.info.server_version


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier, for messages that show a statement to run.

    Statements we execute compose identifiers with `psycopg.sql.Identifier` directly; this is for
    fix texts such as `ALTER ROLE "cdc" WITH REPLICATION`.
    """
    return sql.Identifier(name).as_string(None)

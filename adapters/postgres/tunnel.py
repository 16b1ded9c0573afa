"""SSH tunnels to a source: every connection to it reaches the database through a bastion.

How a connection is tunneled (`route`, called by `connection.connect` for every connection of a
source with `ssh_tunnel` settings):

- One SSH connection (a paramiko `Transport`) per distinct `SshTunnel` per process, opened on
  first use by `open_ssh` and shared by all of that source's connections: the control
  connection, the replication stream, the catch-up reader, every snapshot worker, `verify`,
  `check`, the health probe and the slot monitor. One login per process, not one per
  connection, keeps a bastion's `MaxStartups` / `MaxSessions` and its auth log quiet.
- For each database address behind it, a listener on 127.0.0.1 (an ephemeral port); each socket
  it accepts is forwarded through its own `direct-tcpip` channel to the database's host and port
  *as the bastion sees them* (the dsn's `hostaddr`, else its `host`), by a pump thread.
- libpq is pointed at the listener with `hostaddr=127.0.0.1 port=<local>` while `host` stays
  the dsn's: TLS `verify-full` still checks the database's real name, and `pg_hba.conf` sees the
  bastion's address.
- A dead SSH connection (bastion restarted, network cut, the session killed) is noticed at the
  next connect and opened again there; the connections that ran through it see end-of-file and
  fail as `connection_failed`, and the engine's reconnect logic resumes from the slot as after
  any dropped connection. A channel the bastion refuses (forwarding forbidden, database down)
  turns that connect's failure into `ssh_tunnel_failed` with the reason.

Why the tunnel travels with the source and not with each call site: `connection.connect_source`
(every adapter call site) and `ReplicationStream(..., tunnel=...)` take it from the
`SourceConfig`, and `tests/unit/test_ssh_tunnel_config.py` fails when an adapter module calls
`connect(<something>.dsn, ...)` directly, so a new call site cannot forget it.

Host keys: the bastion's key must be in the `known_hosts` file named by the settings; an unknown
key and a changed key are both refused (`ssh_host_key_mismatch`), never added. Auth: the private
key file (with its passphrase, if encrypted) or the password; no agent, no `~/.ssh` keys, so the
engine logs in exactly as configured. Messages name the bastion as `ssh://user@host:port` and
never hold the password, the passphrase or the key.

The pool is process state on purpose (module `POOL`): sharing the SSH connection across
threads and calls is the point. It holds no secret beyond the settings it was given.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path

import paramiko
import structlog

from cdcengine.errors import ConfigError, Reason, SourceUnreachable
from cdcengine.hostpolicy import HostPolicy
from cdcengine.ssh_tunnel import SshTunnel

__all__ = ["POOL", "Listener", "TunnelPool", "open_ssh", "tunnel_error"]

log = structlog.get_logger("cdcengine.tunnel")

_BUFFER = 256 * 1024
_KEEPALIVE_S = 15  # an SSH keepalive request this often keeps NAT and firewall state alive


class _UnknownHostKey(paramiko.SSHException):
    """The bastion offered a key the known_hosts file does not hold for it."""


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, raising a class of our own (not a message to match)."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        raise _UnknownHostKey(f"no {key.get_name()} key for {hostname} in known_hosts")


def _unreachable(tunnel: SshTunnel, reason: Reason, detail: str) -> SourceUnreachable:
    """The error for `reason`, its message naming the bastion (never a secret), its fix the
    reason's own (`cdcengine.errors.POLICY`)."""
    return SourceUnreachable(f"{tunnel.describe()}: {detail}", reason=reason)


def tunnel_error(tunnel: SshTunnel, detail: str) -> SourceUnreachable:
    """`ssh_tunnel_failed` (retryable) with `detail`: what `connection.connect` raises when a
    connection failed because the bastion could not forward it."""
    return _unreachable(tunnel, Reason.SSH_TUNNEL_FAILED, detail)


def _load_key(tunnel: SshTunnel) -> paramiko.PKey | None:
    if tunnel.private_key_file is None:
        return None
    path = Path(tunnel.private_key_file)
    where = f"ssh_tunnel.private_key_file {path}"
    # bytes: paramiko hands it to cryptography as is (its `str` annotation notwithstanding)
    passphrase = tunnel.private_key_passphrase.encode() if tunnel.private_key_passphrase else None
    try:
        return paramiko.PKey.from_path(path, passphrase)
    except (paramiko.PasswordRequiredException, TypeError):
        # cryptography raises TypeError ("Key is password-protected, but password was not
        # provided") for an encrypted OpenSSH key loaded without a passphrase
        raise ConfigError(f"{where}: the key is encrypted: set ssh_tunnel."
                          "private_key_passphrase (e.g. through CDCENGINE__<SOURCE>__SSH_TUNNEL__"
                          "PRIVATE_KEY_PASSPHRASE)") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the key file ({exc.strerror or 'unreadable'}); "
                          "check the path and that this user may read it") from None
    except (paramiko.SSHException, ValueError):
        raise ConfigError(f"{where}: not a private key this engine can read, or the passphrase "
                          "is wrong; use an OpenSSH or PEM key (ed25519, ecdsa or rsa)") from None


def open_ssh(tunnel: SshTunnel, *, timeout_s: float,
             policy: HostPolicy | None = None) -> paramiko.SSHClient:
    """Open and authenticate the SSH connection to the bastion (`tunnel.host`, `tunnel.port`).

    The one place the engine dials a bastion. With a host `policy` on, the bastion's name is
    resolved here, every address checked (`HostNotAllowed`) and the SSH connection made to a
    checked address (its socket handed to paramiko; known_hosts still matches the name), so DNS
    cannot point it elsewhere after the check. The host key must be in `tunnel.known_hosts`;
    nothing is ever written to that file.
    Raises `ConfigError` (known_hosts or key file missing or unreadable) or `SourceUnreachable`
    with reason `ssh_host_key_mismatch`, `ssh_auth_failed` or `ssh_tunnel_failed` (retryable:
    refused, timed out, dropped); the message names the bastion, never a secret.
    """
    known = Path(tunnel.known_hosts)
    if not known.is_file():
        raise ConfigError(f"ssh_tunnel.known_hosts {known}: no such file; create it with "
                          f"`ssh-keyscan -p {tunnel.port} {tunnel.host} >> {known}` and check the "
                          "fingerprint with the bastion's administrator")
    pkey = _load_key(tunnel)
    sock = _policed_socket(tunnel, policy, timeout_s) if policy and policy.enabled else None
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys(str(known))  # read-only: never saved back
    except (OSError, paramiko.SSHException, ValueError):
        client.close()
        raise ConfigError(f"ssh_tunnel.known_hosts {known}: cannot read it as a known_hosts "
                          "file; check its permissions and format (ssh-keyscan output)") from None
    client.set_missing_host_key_policy(_RefuseUnknown())
    try:
        client.connect(tunnel.host, port=tunnel.port, username=tunnel.user, pkey=pkey, sock=sock,
                       password=tunnel.password, timeout=timeout_s, banner_timeout=timeout_s,
                       auth_timeout=timeout_s, channel_timeout=timeout_s,
                       allow_agent=False, look_for_keys=False)
    except paramiko.BadHostKeyException:
        client.close()
        raise _unreachable(tunnel, Reason.SSH_HOST_KEY_MISMATCH,
                           f"the bastion's host key CHANGED: it is not the key {known} holds; "
                           "refused, since it may not be the real bastion") from None
    except _UnknownHostKey:
        client.close()
        raise _unreachable(tunnel, Reason.SSH_HOST_KEY_MISMATCH,
                           f"the bastion's host key is not in {known}; refused (host keys are "
                           "never trusted on first use)") from None
    except paramiko.AuthenticationException:
        client.close()
        raise _unreachable(tunnel, Reason.SSH_AUTH_FAILED,
                           "the bastion rejected the login "
                           f"({'key' if pkey is not None else 'password'} authentication)"
                           ) from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        what = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else \
            "refused or dropped the connection"
        raise _unreachable(tunnel, Reason.SSH_TUNNEL_FAILED,
                           f"could not open the SSH connection to the bastion ({what})") from None
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(_KEEPALIVE_S)
    return client


class Listener:
    """127.0.0.1:<ephemeral> → one `direct-tcpip` channel per accepted socket → `target` (the
    database as the bastion sees it). libpq connects to `hostaddr=127.0.0.1 port=<port>`."""

    def __init__(self, bastion: _Bastion, target: tuple[str, int]) -> None:
        self.bastion, self.target = bastion, target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.failed_at = 0.0  # monotonic time of the last channel the bastion refused
        self.failure = ""
        threading.Thread(target=self._accept, name=f"ssh-listen-{self.port}",
                         daemon=True).start()

    def failure_since(self, started: float) -> str | None:
        """Why the bastion could not forward a connection accepted after `started` (a
        `time.monotonic()` value), or None: how a connect tells a refused channel from a
        database that hung up."""
        return self.failure if self.failed_at >= started else None

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._forward, args=(conn, peer),
                             name=f"ssh-fwd-{self.port}", daemon=True).start()

    def _forward(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            chan = self.bastion.open_channel(self.target, peer)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            refused = isinstance(exc, paramiko.ChannelException)
            self.failure = ("the bastion refused to forward to the database (forwarding not "
                            "allowed, or the database is down)" if refused else
                            "the SSH connection failed while opening a channel")
            self.failed_at = time.monotonic()
            log.warning("ssh_channel_failed", tunnel=self.bastion.tunnel.describe(),
                        reason="channel_refused" if refused else "transport_failed")
            conn.close()
            return
        _pump(conn, chan)


def _pump(conn: socket.socket, chan: paramiko.Channel) -> None:
    """Copy bytes both ways until either side ends; then close both (libpq sees end-of-file
    when the channel or the SSH connection under it goes)."""
    try:
        while True:
            ready, _, _ = select.select([conn, chan], [], [])
            if conn in ready:
                data = conn.recv(_BUFFER)
                if not data:
                    break
                chan.sendall(data)
            if chan in ready:
                data = chan.recv(_BUFFER)
                if not data:
                    break
                conn.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass  # either side gone: closing both below is all there is to do
    finally:
        chan.close()
        conn.close()


def _policed_socket(tunnel: SshTunnel, policy: HostPolicy, timeout_s: float) -> socket.socket:
    """A TCP connection to the bastion at an address the host policy checked."""
    try:
        addrs = policy.resolve(tunnel.host, tunnel.port, what="SSH tunnel host")
    except OSError:
        raise _unreachable(tunnel, Reason.SSH_TUNNEL_FAILED,
                           "the bastion's host name does not resolve") from None
    last: OSError | None = None
    for addr in addrs:
        try:
            return socket.create_connection((addr, tunnel.port), timeout=timeout_s)
        except OSError as exc:
            last = exc
    raise _unreachable(tunnel, Reason.SSH_TUNNEL_FAILED,
                       f"cannot connect to the bastion ({type(last).__name__})") from None


class _Bastion:
    """One SSH connection to a bastion (opened again when it died) and its listeners."""

    def __init__(self, tunnel: SshTunnel, policy: HostPolicy | None = None) -> None:
        self.tunnel = tunnel
        self.policy = policy
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._listeners: dict[tuple[str, int], Listener] = {}
        self.opened = 0  # how many SSH connections this process opened to it (tests, logs)

    def _transport(self, timeout_s: float) -> paramiko.Transport:
        """The live transport, opened (again) if there is none; the caller holds the lock."""
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is not None and transport.is_active():
            return transport
        if client is not None:
            client.close()
            self._client = None
            log.warning("ssh_tunnel_lost", tunnel=self.tunnel.describe())
        started = time.monotonic()
        self._client = open_ssh(self.tunnel, timeout_s=timeout_s, policy=self.policy)
        self.opened += 1
        log.info("ssh_tunnel_opened", tunnel=self.tunnel.describe(), reopened=self.opened > 1,
                 duration_ms=round((time.monotonic() - started) * 1000))
        transport = self._client.get_transport()
        assert transport is not None
        return transport

    def route(self, target: tuple[str, int], timeout_s: float) -> Listener:
        with self._lock:
            self._transport(timeout_s)
            listener = self._listeners.get(target)
            if listener is None:
                listener = self._listeners[target] = Listener(self, target)
            return listener

    def open_channel(self, target: tuple[str, int], peer: tuple[str, int]) -> paramiko.Channel:
        with self._lock:
            transport = self._transport(10.0)
        try:
            return transport.open_channel("direct-tcpip", target, peer, timeout=30.0)
        except paramiko.ChannelException:
            raise  # the bastion answered: it refused this channel; the connection is fine
        except (OSError, EOFError, paramiko.SSHException):
            # no answer: take the SSH connection for dead, so the next connect opens a new one
            transport.close()
            raise

    def close(self) -> None:
        with self._lock:
            for listener in self._listeners.values():
                listener.sock.close()
            self._listeners.clear()
            if self._client is not None:
                self._client.close()
                self._client = None


class TunnelPool:
    """The SSH connections of this process, one per distinct `SshTunnel`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bastions: dict[tuple[SshTunnel, HostPolicy | None], _Bastion] = {}

    def bastion(self, tunnel: SshTunnel, policy: HostPolicy | None = None) -> _Bastion:
        with self._lock:
            found = self._bastions.get((tunnel, policy))
            if found is None:
                found = self._bastions[(tunnel, policy)] = _Bastion(tunnel, policy)
            return found

    def route(self, tunnel: SshTunnel, target: tuple[str, int], *,
              timeout_s: float, policy: HostPolicy | None = None) -> Listener:
        """The local listener forwarding to `target` through `tunnel`, the SSH connection
        open and alive when this returns (opened or re-opened here: raises as `open_ssh`;
        the bastion checked against `policy` each time)."""
        return self.bastion(tunnel, policy).route(target, timeout_s)

    def close(self) -> None:
        """Close every SSH connection and listener (tests; a process exit needs nothing)."""
        with self._lock:
            bastions = list(self._bastions.values())
            self._bastions.clear()
        for b in bastions:
            b.close()


POOL = TunnelPool()

"""A throwaway OpenSSH server on 127.0.0.1 for the SSH tunnel tests (`sshd_server` fixture).

`SshServer` runs the machine's `sshd` (Debian's openssh-server; `scripts/setup.sh` installs it)
in the foreground (`-D -e`) with a config, host key and authorized_keys of its own in a temp
folder, on a free port, as the current user (root included: the throwaway config permits it).
Key and password logins are allowed; TCP forwarding is allowed. Tests skip with the reason
when sshd or ssh-keygen is missing.

What tests use: `port`, `user`, `known_hosts` (the host key, as ssh-keyscan would write it),
`client_key` (an ed25519 key without passphrase), `client_key_encrypted` (same key type,
passphrase `passphrase`), `other_known_hosts` (another server's key: a mismatch),
`tunnel(**overrides)` (an `ssh_tunnel` table for the config), `session_pids()` (the per-login
sshd processes), `kill_sessions()` (drops every SSH connection while sshd keeps listening),
`log()` (sshd's own log).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

__all__ = ["SshServer", "find_sshd", "sshd_server"]

PASSPHRASE = "passphrase-Zq81"


def find_sshd() -> str | None:
    for candidate in ("/usr/sbin/sshd", shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, passphrase: str = "") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "cdcengine-test",
                    "-f", str(path)], check=True, capture_output=True, timeout=30)
    return Path(f"{path}.pub").read_text().strip()


class SshServer:
    def __init__(self, sshd: str, workdir: Path) -> None:
        self.sshd, self.dir = sshd, workdir
        self.user = getpass.getuser()
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        host_pub = _keygen(workdir / "host_ed25519")
        self.client_key = workdir / "client_ed25519"
        self.client_key_encrypted = workdir / "client_enc_ed25519"
        keys = [_keygen(self.client_key), _keygen(self.client_key_encrypted, PASSPHRASE)]
        (workdir / "authorized_keys").write_text("\n".join(keys) + "\n")
        self.known_hosts = workdir / "known_hosts"
        kind, blob = host_pub.split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {kind} {blob}\n")
        other_pub = _keygen(workdir / "other_host_ed25519")
        self.other_known_hosts = workdir / "other_known_hosts"
        self.other_known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {' '.join(other_pub.split()[:2])}\n")
        self.config = workdir / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1",
            f"HostKey {workdir / 'host_ed25519'}", f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PermitRootLogin yes", "PasswordAuthentication yes",
            "PubkeyAuthentication yes", "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes", "LogLevel VERBOSE", "MaxStartups 50", "MaxSessions 50",
        ]) + "\n")
        self._log = workdir / "sshd.log"

    def start(self) -> SshServer:
        if os.geteuid() == 0:
            # sshd as root needs its privilege separation folder (the distribution's service
            # creates it at boot; a container without that service has none)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=self._log.open("ab"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port}: {self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        for pid in self.session_pids():
            self._kill(pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def tunnel(self, **overrides: object) -> dict[str, object]:
        """An `ssh_tunnel` table logging in with the unencrypted key (`overrides` win; a None
        value removes the key)."""
        table: dict[str, object] = {"host": "127.0.0.1", "port": self.port, "user": self.user,
                                    "private_key_file": str(self.client_key),
                                    "known_hosts": str(self.known_hosts)}
        table.update(overrides)
        return {k: v for k, v in table.items() if v is not None}

    def session_pids(self) -> list[int]:
        """The sshd processes serving logins (children of the listening one)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def forwarded_ports(self) -> set[int]:
        """Local ports of the TCP connections the sshd session processes opened (to the
        database): a backend whose `client_port` is one of them came through the tunnel."""
        ports: set[int] = set()
        for pid in self.session_pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            ports |= {c.laddr.port for c in conns if c.raddr and c.raddr.port != self.port
                      and c.laddr.port != self.port}
        return ports

    def kill_sessions(self) -> int:
        """SIGKILL every login's sshd process: the engine's SSH connections drop at once, as
        with a bastion that crashed; sshd keeps listening for the reconnect."""
        pids = self.session_pids()
        for pid in pids:
            self._kill(pid)
        return len(pids)

    @staticmethod
    def _kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sshd_server(tmp_path: Path) -> Iterator[SshServer]:
    """A running `SshServer` for this test (skipped with the reason when sshd is missing)."""
    sshd = find_sshd()
    if sshd is None:
        pytest.skip("needs OpenSSH's sshd (Debian: apt-get install openssh-server; "
                    "scripts/setup.sh installs it)")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-keygen (Debian: apt-get install openssh-client)")
    server = SshServer(sshd, tmp_path / "sshd")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def fresh_tunnel_pool() -> Iterator[None]:
    """In-process connections share the module's SSH connections: none outlives its test."""
    from cdcengine_postgres.tunnel import POOL

    yield
    POOL.close()


@pytest.fixture
def tcp_db(db):  # type: ignore[no-untyped-def]
    """The test database, reached over TCP (a tunnel forwards TCP, not a unix socket)."""
    if db.server.host.startswith("/"):
        pytest.skip("the test server is reached over a unix socket; a tunnel forwards TCP")
    return db

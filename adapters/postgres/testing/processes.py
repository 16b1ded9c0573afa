"""The operating-system side of a throwaway cluster: ports, a clean environment, the
unprivileged user the server runs as when we are root, the postmaster process, and the watchdog
that stops an orphaned server.

* **Root.** initdb and postgres refuse to run as root, so when this process is root every
  server-side command runs as an unprivileged OS user (`nobody`, or env `CDCENGINE_PG_USER`)
  via ``subprocess.run(user=..., group=...)``. The cluster's directory is chowned to that user
  and its ancestors must be traversable (checked up front, with a clear error).
* **Ports.** A free port is found by binding port 0 (`free_port`); the cluster retries on a new
  one if another process grabs it before the postmaster binds.
* **No orphans.** A tiny watchdog shell process per running server holds the read end of a pipe
  whose write end only this process owns. When this process dies for any reason -- even SIGKILL
  or a pytest-timeout abort -- the pipe closes, and the watchdog stops the server immediately
  and deletes its directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Final

from cdcengine_postgres.testing.binaries import ClusterError

__all__ = ["HOST", "RunAs", "Watchdog", "check_traversable", "clean_env", "free_port",
           "kill_postmaster", "read_log_from", "run_command", "server_alive", "server_user",
           "tail_text"]

HOST: Final = "127.0.0.1"

#: (uid, gid) of the OS user server-side commands run as, or None to run them as ourselves.
RunAs = tuple[int, int] | None

# Runs as the server's OS user: waits for EOF on stdin. A line before EOF means the owner stopped
# the server itself; bare EOF means the owner died, so stop the server and remove its directory.
_WATCHDOG_SH: Final = (
    "if IFS= read -r _line; then exit 0; fi; "
    '"$1" -D "$2" -m immediate -w -t 30 stop >/dev/null 2>&1; '
    'rm -rf "$3"'
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    """The caller's environment minus libpq/PG variables (PGDATA, PGPORT, PGHOST, ...).

    They would silently redirect pg_ctl/pg_basebackup to some other server or directory.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_MESSAGES"] = "C"  # log/error text we grep (e.g. "could not bind") stays English
    return env


def server_user() -> RunAs:
    """Who runs initdb and postgres: when we are root, the unprivileged `CDCENGINE_PG_USER`
    (default `nobody`); otherwise ourselves (None)."""
    if os.geteuid() != 0:
        return None
    user = os.environ.get("CDCENGINE_PG_USER") or "nobody"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ClusterError(
            f"running as root, and OS user {user!r} (for initdb/postgres, which refuse "
            "root) does not exist; create it or set CDCENGINE_PG_USER"
        ) from None
    if pw.pw_uid == 0:
        raise ClusterError(f"CDCENGINE_PG_USER={user!r} is root; initdb refuses root")
    return pw.pw_uid, pw.pw_gid


def check_traversable(directory: Path) -> None:
    """Every ancestor must let 'other' search it, or the server user cannot reach data/."""
    for d in [directory, *directory.parents]:
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise ClusterError(
                f"{d} is not traversable by other users (mode {oct(mode & 0o777)}); the "
                "server runs as an unprivileged user when started by root. Use a base_dir "
                "under /tmp or chmod o+x that directory"
            )


def _credentials(run_as: RunAs) -> tuple[int | None, int | None, list[int] | None]:
    """subprocess user/group/extra_groups: the server user when root (dropping root's
    supplementary groups too), else unchanged."""
    if run_as is None:
        return None, None, None
    return run_as[0], run_as[1], []


def run_command(
    args: list[str],
    *,
    cwd: Path,
    run_as: RunAs,
    env: Mapping[str, str] | None,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """Run a server-side command as the server's OS user, output captured (stderr merged)."""
    user, group, extra_groups = _credentials(run_as)
    return subprocess.run(
        args,
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
        user=user,
        group=group,
        extra_groups=extra_groups,
    )


def read_log_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def tail_text(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def server_alive(data_dir: Path) -> bool:
    """Whether the postmaster named in `data_dir`/postmaster.pid still exists."""
    pid = _postmaster_pid(data_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_postmaster(data_dir: Path) -> None:
    """Last resort: SIGKILL the postmaster; its children exit when they notice it gone."""
    pid = _postmaster_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server_alive(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)


class Watchdog:
    """The shell process that stops a running server (and deletes `root`) if this process dies
    without stopping it; `release()` after a normal stop lets it exit quietly."""

    def __init__(self, pg_ctl: str, data_dir: Path, root: Path, run_as: RunAs) -> None:
        user, group, extra_groups = _credentials(run_as)
        # Own session: a Ctrl-C aimed at the test run must not kill the watchdog before it acts.
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                _WATCHDOG_SH,
                "cdcengine-pg-watchdog",
                pg_ctl,
                str(data_dir),
                str(root),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=clean_env(),
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )

    def release(self) -> None:
        """Tell the watchdog the server was stopped on purpose, and wait for it to exit."""
        watchdog, self._proc = self._proc, None
        if watchdog is None:
            return
        stdin: IO[bytes] | None = watchdog.stdin
        with contextlib.suppress(OSError):
            if stdin is not None:
                stdin.write(b"stopped\n")
                stdin.close()
        try:
            watchdog.wait(timeout=5)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()

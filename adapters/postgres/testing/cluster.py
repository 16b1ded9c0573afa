"""A throwaway PostgreSQL server built from the machine's own server binaries.

Used by the test harness (one session cluster plus per-test extras) and by `cdcengine demo`,
so that neither needs Docker or an existing server. The cost is about one second
(initdb --no-sync ~0.6 s, pg_ctl start ~0.1 s; see research/limits-and-pitfalls.md §2).

Design points, each there for a reason:

* **Root.** initdb and postgres refuse to run as root, so when this process is root every
  server-side command runs as an unprivileged OS user (`nobody`, or env `CDCENGINE_PG_USER`)
  via ``subprocess.run(user=..., group=...)``. The temporary directory is chowned to that user
  and its ancestors must be traversable (checked up front, with a clear error).
* **Real authentication.** The superuser `postgres` gets a random password and TCP uses
  scram-sha-256, so a wrong password really fails -- tests of auth errors are meaningful.
  Local (unix socket) connections are trusted; the socket lives in our own directory so the
  system cluster's /var/run/postgresql is never touched.
* **Ports.** A free port is found by binding port 0; if another process grabs it before the
  postmaster binds, start is retried on a new port.
* **No orphans.** Three layers: `stop()`/`cleanup()` (fast, then immediate, then SIGKILL);
  an `atexit` hook for clusters the caller forgot; and a tiny watchdog shell process per
  running server that holds the read end of a pipe whose write end only this process owns.
  When this process dies for any reason -- even SIGKILL or a pytest-timeout abort -- the pipe
  closes, and the watchdog stops the server immediately and deletes the directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Literal, Self
from urllib.parse import quote

__all__ = ["DEFAULT_SETTINGS", "ClusterError", "TempCluster", "find_bindir"]

INSTALL_HINT: Final = (
    "install the PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`), "
    "or point env CDCENGINE_PG_BINDIR at the directory holding initdb/pg_ctl/postgres"
)

#: Server settings every TempCluster starts with; constructor settings override them.
#: fsync/full_page_writes are off because the data is disposable; synchronous_commit stays on
#: because with it off logical decoding sees commits 70-200 ms late (pitfall 10), which makes
#: tests slow and flaky.
DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": "127.0.0.1",
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
}

_SUPERUSER: Final = "postgres"
_HOST: Final = "127.0.0.1"
_MIN_MAJOR: Final = 13  # DROP DATABASE ... WITH (FORCE), pg_basebackup -R writing auto.conf
_START_ATTEMPTS: Final = 5
_PG_CTL_TIMEOUT_S: Final = 60

# Runs as the server's OS user: waits for EOF on stdin. A line before EOF means the owner stopped
# the server itself; bare EOF means the owner died, so stop the server and remove its directory.
_WATCHDOG_SH: Final = (
    "if IFS= read -r _line; then exit 0; fi; "
    '"$1" -D "$2" -m immediate -w -t 30 stop >/dev/null 2>&1; '
    'rm -rf "$3"'
)


class ClusterError(RuntimeError):
    """A throwaway cluster could not be found, created, started or stopped.

    The message says what to do (install hint, offending directory, tail of the server log).
    """


def _has_initdb(bindir: Path) -> bool:
    return os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "pg_ctl", os.X_OK)


def _major_of_bindir(path: Path) -> int:
    # /usr/lib/postgresql/<N>/bin
    try:
        return int(path.parent.name)
    except ValueError:
        return -1


def find_bindir() -> Path:
    """Locate the PostgreSQL server binaries (initdb, pg_ctl, postgres).

    Order: env CDCENGINE_PG_BINDIR (must be right if set: a wrong explicit setting is an error,
    not something to silently route around), `pg_config --bindir` if it holds initdb, initdb on
    PATH, then the highest Debian-style /usr/lib/postgresql/<N>/bin with N >= 13.
    """
    explicit = os.environ.get("CDCENGINE_PG_BINDIR")
    if explicit:
        path = Path(explicit)
        if _has_initdb(path):
            return path
        raise ClusterError(
            f"CDCENGINE_PG_BINDIR={explicit!r} holds no executable initdb/pg_ctl; {INSTALL_HINT}"
        )

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_initdb(Path(out)):
                return Path(out)

    initdb = shutil.which("initdb")
    if initdb:
        path = Path(initdb).resolve().parent
        if _has_initdb(path):
            return path

    candidates = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if _major_of_bindir(p) >= _MIN_MAJOR and _has_initdb(p)
    ]
    if candidates:
        return max(candidates, key=_major_of_bindir)
    raise ClusterError(f"no PostgreSQL server binaries (initdb) found; {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _format_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _clean_env() -> dict[str, str]:
    """The caller's environment minus libpq/PG variables (PGDATA, PGPORT, PGHOST, ...).

    They would silently redirect pg_ctl/pg_basebackup to some other server or directory.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_MESSAGES"] = "C"  # log/error text we grep (e.g. "could not bind") stays English
    return env


_LIVE: set[TempCluster] = set()


@atexit.register
def _cleanup_forgotten() -> None:
    """Stop and delete every cluster still registered when the interpreter exits."""
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.cleanup()


class TempCluster:
    """A private PostgreSQL server in a temporary directory, listening on 127.0.0.1.

    ``settings`` override `DEFAULT_SETTINGS` (e.g. ``{"wal_level": "replica"}`` or
    ``{"max_replication_slots": 2}``); ``timezone`` is a shortcut for the `timezone` setting.
    ``base_dir`` is where the temporary directory is created (default: the system temp dir).

    Use as a context manager, or call `start()` and later `cleanup()`. Nothing is created until
    `start()`.
    """

    def __init__(
        self,
        settings: Mapping[str, str | int] | None = None,
        *,
        base_dir: Path | None = None,
        timezone: str | None = None,
    ) -> None:
        self._settings: dict[str, str] = dict(DEFAULT_SETTINGS)
        for key, value in (settings or {}).items():
            self._settings[key] = _format_value(value)
        if timezone is not None:
            self._settings["timezone"] = timezone
        self._base_dir = base_dir
        self._bindir: Path | None = None
        self._root: Path | None = None
        self._port: int | None = None
        self._password = secrets.token_urlsafe(18)
        self._version: int | None = None
        self._running = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._standbys: list[TempCluster] = []
        self._run_as: tuple[int, int] | None = None  # (uid, gid) when we must drop root

    # ------------------------------------------------------------------ properties

    @property
    def bindir(self) -> Path:
        """Directory of initdb/pg_ctl/postgres (resolved lazily, see `find_bindir`)."""
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def root(self) -> Path:
        """The temporary directory holding data/, sock/ and the log."""
        if self._root is None:
            raise ClusterError("cluster not started")
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        """The server log (pg_ctl -l); read it when a test needs to know what the server said."""
        return self.root / "postgres.log"

    @property
    def host(self) -> str:
        return _HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("cluster not started")
        return self._port

    @property
    def superuser(self) -> str:
        return _SUPERUSER

    @property
    def password(self) -> str:
        """The superuser's password (random per cluster; TCP auth is scram-sha-256)."""
        return self._password

    @property
    def version(self) -> int:
        """server_version_num of the running server, e.g. 150018."""
        if self._version is None:
            raise ClusterError("cluster not started")
        return self._version

    @property
    def running(self) -> bool:
        return self._running

    @property
    def settings(self) -> Mapping[str, str]:
        """The effective -c settings (defaults merged with the constructor's)."""
        return dict(self._settings)

    @property
    def admin_dsn(self) -> str:
        """Superuser URL DSN to the `postgres` database."""
        return self.dsn()

    def dsn(
        self, dbname: str = "postgres", user: str = _SUPERUSER, password: str | None = None
    ) -> str:
        """URL DSN ``postgresql://user:pw@127.0.0.1:port/db`` (user, password and db are
        percent-encoded). ``password=None`` means the superuser password for the superuser and
        no password for other users."""
        if password is None and user == _SUPERUSER:
            password = self._password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{_HOST}:{self.port}/{quote(dbname, safe='')}"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> Self:
        """Create the cluster (first time only) and start the server; returns self.

        After `stop()` this restarts the same cluster, on the same port when it is still free
        (so DSNs stay valid across a simulated crash). A failed first start deletes everything;
        a failed restart keeps the directory for inspection (see `log_path`).
        """
        if self._running:
            return self
        first = self._root is None
        try:
            if first:
                self._prepare_root()
                self._initdb()
            self._start_server()
        except BaseException:
            if first:
                self.cleanup()
            raise
        return self

    def stop(self, *, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server: fast shutdown, then immediate, then SIGKILL as a last resort.

        ``mode="immediate"`` skips the clean shutdown -- a crash as far as the server can tell
        (no shutdown checkpoint; it runs crash recovery on the next `start()`).
        Standbys made from this cluster are stopped first (a fast shutdown of a primary waits
        for its walsenders). The directory is kept; see `cleanup`.
        """
        for standby in self._standbys:
            standby.stop(mode=mode)
        if not self._running:
            return
        modes = ("fast", "immediate") if mode == "fast" else ("immediate",)
        for pg_mode in modes:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(
                    [
                        self._bin("pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-m",
                        pg_mode,
                        "-w",
                        "-t",
                        "30",
                        "stop",
                    ],
                    timeout=40,
                )
            if not self._server_alive():
                break
        else:
            self._kill_postmaster()
        self._running = False
        self._release_watchdog()

    def cleanup(self) -> None:
        """Stop the server (and its standbys) and delete the temporary directory."""
        for standby in self._standbys:
            standby.cleanup()
        self._standbys.clear()
        try:
            self.stop()
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
            _LIVE.discard(self)

    def make_standby(self) -> TempCluster:
        """Start a streaming physical standby of this (running) cluster and return it.

        Made with ``pg_basebackup -R`` over TCP as the superuser (password via PGPASSWORD, so it
        is not visible in ps), run as the same OS user, started on its own free port with the
        same settings. It is stopped/cleaned with this cluster, or earlier by the caller.
        """
        if not self._running:
            raise ClusterError("make_standby() needs a running primary")
        standby = TempCluster(self._settings, base_dir=self._base_dir)
        standby._bindir = self.bindir
        standby._password = self._password  # roles are copied by the base backup
        standby._prepare_root()
        env = _clean_env() | {"PGPASSWORD": self._password}
        try:
            proc = standby._run(
                [
                    standby._bin("pg_basebackup"),
                    "-D",
                    str(standby.data_dir),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                    "-h",
                    _HOST,
                    "-p",
                    str(self.port),
                    "-U",
                    _SUPERUSER,
                    "-w",
                ],
                env=env,
                timeout=120,
            )
            if proc.returncode != 0:
                raise ClusterError(f"pg_basebackup failed:\n{proc.stdout}")
            standby._start_server()
        except BaseException:
            standby.cleanup()
            raise
        self._standbys.append(standby)
        return standby

    # ------------------------------------------------------------------ internals

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _prepare_root(self) -> None:
        """Create the temp dir, owned by the server's OS user and traversable by it."""
        bindir = self.bindir  # fail early with the install hint
        major = self._bindir_major(bindir)
        if 0 <= major < _MIN_MAJOR:
            raise ClusterError(f"PostgreSQL {major} in {bindir} is too old; need >= {_MIN_MAJOR}")
        if os.geteuid() == 0:
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
            self._run_as = (pw.pw_uid, pw.pw_gid)
        parent = self._base_dir if self._base_dir is not None else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="cdcengine-pg-", dir=parent))
        self._root = root
        _LIVE.add(self)
        root.chmod(0o755)
        if self._run_as is not None:
            self._check_traversable(root.parent)
            os.chown(root, *self._run_as)
        self.socket_dir.mkdir(mode=0o755)
        if self._run_as is not None:
            os.chown(self.socket_dir, *self._run_as)

    @staticmethod
    def _bindir_major(bindir: Path) -> int:
        version_file = bindir.parent / "PG_VERSION"  # not always present; Debian layout below
        if version_file.exists():
            with contextlib.suppress(ValueError, OSError):
                return int(version_file.read_text().split(".")[0])
        return _major_of_bindir(bindir)

    def _check_traversable(self, directory: Path) -> None:
        """Every ancestor must let 'other' search it, or the server user cannot reach data/."""
        for d in [directory, *directory.parents]:
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise ClusterError(
                    f"{d} is not traversable by other users (mode {oct(mode & 0o777)}); the "
                    "server runs as an unprivileged user when started by root. Use a base_dir "
                    "under /tmp or chmod o+x that directory"
                )

    def _credentials(self) -> tuple[int | None, int | None, list[int] | None]:
        """subprocess user/group/extra_groups: the server user when root (dropping root's
        supplementary groups too), else unchanged."""
        if self._run_as is None:
            return None, None, None
        return self._run_as[0], self._run_as[1], []

    def _run(
        self,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = _PG_CTL_TIMEOUT_S + 10,
    ) -> subprocess.CompletedProcess[str]:
        """Run a server-side command as the server's OS user, output captured (stderr merged)."""
        user, group, extra_groups = self._credentials()
        return subprocess.run(
            args,
            cwd=self.root,
            env=dict(env) if env is not None else _clean_env(),
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

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        if self._run_as is not None:
            os.chown(pwfile, *self._run_as)
        try:
            output = ""
            for locale in ("C.UTF-8", "C"):
                shutil.rmtree(self.data_dir, ignore_errors=True)
                proc = self._run(
                    [
                        self._bin("initdb"),
                        "-D",
                        str(self.data_dir),
                        "-U",
                        _SUPERUSER,
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "-E",
                        "UTF8",
                        f"--locale={locale}",
                        "--no-sync",
                    ],
                    timeout=120,
                )
                if proc.returncode == 0:
                    return
                output = proc.stdout
                if "locale" not in output.lower():
                    break  # not a locale problem; retrying with C would not help
            raise ClusterError(f"initdb failed in {self.data_dir}:\n{output}")
        finally:
            pwfile.unlink(missing_ok=True)

    def _server_options(self, port: int) -> str:
        settings = self._settings | {
            "port": str(port),
            "unix_socket_directories": str(self.socket_dir),
        }
        # pg_ctl hands -o to /bin/sh, so each option is shell-quoted.
        return " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())

    def _start_server(self) -> None:
        last_error = ""
        for attempt in range(_START_ATTEMPTS):
            # A restart keeps its port if it can; a taken port fails to bind and we move on.
            port = self._port if attempt == 0 and self._port is not None else _free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self._run(
                [
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(_PG_CTL_TIMEOUT_S),
                    "-o",
                    self._server_options(port),
                    "start",
                ],
            )
            if proc.returncode == 0:
                self._port = port
                self._running = True
                self._start_watchdog()
                self._version = self._query_version()
                return
            new_log = self._read_log_from(log_offset)
            last_error = f"{proc.stdout}\n--- tail of {self.log_path} ---\n{_tail_text(new_log)}"
            if self._server_alive():  # pg_ctl timed out but the server is up: don't leak it
                self._running = True
                self.stop()
            if not re.search(
                r"could not bind|address already in use|could not create any "
                r"TCP/IP sockets",
                new_log,
                re.IGNORECASE,
            ):
                break
        raise ClusterError(f"PostgreSQL failed to start ({self.data_dir}):\n{last_error}")

    def _read_log_from(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _query_version(self) -> int:
        proc = self._run([self._bin("postgres"), "--version"], timeout=30)
        # "postgres (PostgreSQL) 15.18 (Debian 15.18-1.pgdg120+1)" -> 150018
        match = re.search(r"\)\s+(\d+)(?:\.(\d+))?", proc.stdout)
        if match is None:
            raise ClusterError(f"cannot parse `postgres --version`: {proc.stdout!r}")
        major, minor = int(match.group(1)), int(match.group(2) or 0)
        return major * 10000 + minor

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _server_alive(self) -> bool:
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _kill_postmaster(self) -> None:
        """Last resort: SIGKILL the postmaster; its children exit when they notice it gone."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._server_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _start_watchdog(self) -> None:
        user, group, extra_groups = self._credentials()
        # Own session: a Ctrl-C aimed at the test run must not kill the watchdog before it acts.
        self._watchdog = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                _WATCHDOG_SH,
                "cdcengine-pg-watchdog",
                self._bin("pg_ctl"),
                str(self.data_dir),
                str(self.root),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=_clean_env(),
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )

    def _release_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
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


def _tail_text(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"

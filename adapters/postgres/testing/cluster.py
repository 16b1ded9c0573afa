"""A throwaway PostgreSQL server built from the machine's own server binaries.

Used by the test harness (one session cluster plus per-test extras) and by `cdcengine demo`,
so that neither needs Docker or an existing server. The cost is about one second
(initdb --no-sync ~0.6 s, pg_ctl start ~0.1 s; see research/limits-and-pitfalls.md §2).

Design points, each there for a reason (the OS side -- running as an unprivileged user when
root, free ports, the orphan watchdog -- is in `processes`; finding the binaries in `binaries`):

* **Real authentication.** The superuser `postgres` gets a random password and TCP uses
  scram-sha-256, so a wrong password really fails -- tests of auth errors are meaningful.
  Local (unix socket) connections are trusted; the socket lives in our own directory so the
  system cluster's /var/run/postgresql is never touched.
* **Ports.** A free port is found by binding port 0; if another process grabs it before the
  postmaster binds, start is retried on a new port.
* **No orphans.** Three layers: `stop()`/`cleanup()` (fast, then immediate, then SIGKILL);
  an `atexit` hook for clusters the caller forgot; and a watchdog process per running server
  that stops it and deletes the directory when this process dies for any reason
  (`processes.Watchdog`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self
from urllib.parse import quote

from cdcengine_postgres.testing.binaries import MIN_MAJOR, ClusterError, bindir_major, find_bindir
from cdcengine_postgres.testing.processes import (
    HOST,
    RunAs,
    Watchdog,
    check_traversable,
    clean_env,
    free_port,
    kill_postmaster,
    read_log_from,
    run_command,
    server_alive,
    server_user,
    tail_text,
)

__all__ = ["DEFAULT_SETTINGS", "ClusterError", "TempCluster", "find_bindir"]

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
_START_ATTEMPTS: Final = 5
_PG_CTL_TIMEOUT_S: Final = 60


def _format_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


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
    ``hba`` replaces the pg_hba.conf initdb wrote (one entry per line), and ``files`` are
    written into the data directory before the first start, owned by the server's OS user with
    mode 0600 -- what a TLS server needs for ``ssl_cert_file``/``ssl_key_file``/``ssl_ca_file``
    (relative paths in those settings resolve against the data directory).

    Use as a context manager, or call `start()` and later `cleanup()`. Nothing is created until
    `start()`.
    """

    def __init__(
        self,
        settings: Mapping[str, str | int] | None = None,
        *,
        base_dir: Path | None = None,
        timezone: str | None = None,
        hba: Sequence[str] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._hba = list(hba) if hba is not None else None
        self._files = dict(files or {})
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
        self._watchdog: Watchdog | None = None
        self._standbys: list[TempCluster] = []
        self._run_as: RunAs = None  # (uid, gid) when we must drop root

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
        return HOST

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
        return f"postgresql://{auth}@{HOST}:{self.port}/{quote(dbname, safe='')}"

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
                self._install_files()
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
            if not server_alive(self.data_dir):
                break
        else:
            kill_postmaster(self.data_dir)
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
        env = clean_env() | {"PGPASSWORD": self._password}
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
                    HOST,
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
        major = bindir_major(bindir)
        if 0 <= major < MIN_MAJOR:
            raise ClusterError(f"PostgreSQL {major} in {bindir} is too old; need >= {MIN_MAJOR}")
        self._run_as = server_user()
        parent = self._base_dir if self._base_dir is not None else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="cdcengine-pg-", dir=parent))
        self._root = root
        _LIVE.add(self)
        root.chmod(0o755)
        if self._run_as is not None:
            check_traversable(root.parent)
            os.chown(root, *self._run_as)
        self.socket_dir.mkdir(mode=0o755)
        if self._run_as is not None:
            os.chown(self.socket_dir, *self._run_as)

    def _run(
        self,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = _PG_CTL_TIMEOUT_S + 10,
    ) -> subprocess.CompletedProcess[str]:
        """Run a server-side command as the server's OS user, output captured (stderr merged)."""
        return run_command(args, cwd=self.root, run_as=self._run_as, env=env, timeout=timeout)

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

    def _install_files(self) -> None:
        """Write ``files`` and ``hba`` into the fresh data directory, as the server's user."""
        files = dict(self._files)
        if self._hba is not None:
            files["pg_hba.conf"] = ("\n".join(self._hba) + "\n").encode()
        for name, content in files.items():
            path = self.data_dir / name
            path.write_bytes(content)
            path.chmod(0o600)  # the server refuses a key file others can read
            if self._run_as is not None:
                os.chown(path, *self._run_as)

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
            port = self._port if attempt == 0 and self._port is not None else free_port()
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
                self._watchdog = Watchdog(self._bin("pg_ctl"), self.data_dir, self.root,
                                          self._run_as)
                self._version = self._query_version()
                return
            new_log = read_log_from(self.log_path, log_offset)
            last_error = f"{proc.stdout}\n--- tail of {self.log_path} ---\n{tail_text(new_log)}"
            if server_alive(self.data_dir):  # pg_ctl timed out but the server is up: don't leak it
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

    def _query_version(self) -> int:
        proc = self._run([self._bin("postgres"), "--version"], timeout=30)
        # "postgres (PostgreSQL) 15.18 (Debian 15.18-1.pgdg120+1)" -> 150018
        match = re.search(r"\)\s+(\d+)(?:\.(\d+))?", proc.stdout)
        if match is None:
            raise ClusterError(f"cannot parse `postgres --version`: {proc.stdout!r}")
        major, minor = int(match.group(1)), int(match.group(2) or 0)
        return major * 10000 + minor

    def _release_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.release()


def start_with_database(cluster: TempCluster, database: str, *, application_name: str,
                        say: Callable[[str], None], starting: str, instead: str) -> str:
    """Start `cluster` and create `database` in it for a front-end (the demo, the bench); its
    dsn. On failure the cluster is removed and the error says how to do without it: `instead`
    completes "…, or <instead>" (e.g. "run the demo against a server with --dsn URL")."""
    from psycopg import sql

    from cdcengine.errors import CDCError, Reason
    from cdcengine_postgres.connection import connect

    try:
        say(f"starting a throwaway PostgreSQL server from {cluster.bindir} ({starting}) ...")
        cluster.start()
        with connect(cluster.admin_dsn, application_name=application_name) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    except ClusterError as exc:
        cluster.cleanup()
        raise CDCError(f"could not start a throwaway PostgreSQL server: {exc}",
                       reason=Reason.UNKNOWN,
                       fix="Install the PostgreSQL server package (`bash scripts/setup.sh` "
                           f"does), or {instead}.") from None
    except BaseException:
        cluster.cleanup()
        raise
    return cluster.dsn(database)

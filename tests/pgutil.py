"""Helpers behind the pytest fixtures in conftest.py: the test server and per-test databases.

Kept in a plain module (not conftest) so tests, benchmarks and ad-hoc scripts can import them
(``from pgutil import ...``; pytest puts tests/ on sys.path for the rootdir conftest).

Isolation model: one server per session (about 1 s to start), one fresh database per test,
roles created on demand with unique names. Everything a test creates on the shared server that
outlives a connection -- replication slots, the database, roles -- is removed by
`ScratchDatabase.drop`, so a failing test cannot leak WAL-retaining slots into the next one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import quote, urlencode

import psycopg
from psycopg import errors, sql
from psycopg.abc import Params, QueryNoTemplate
from psycopg.conninfo import conninfo_to_dict

from cdcengine_postgres.testing.cluster import TempCluster

#: Settings the session server must have, whatever its source.
SERVER_SETTINGS: Final = {
    "wal_level": "logical",
    "max_replication_slots": 20,
    "max_wal_senders": 20,
}
DOCKER_IMAGE: Final = "postgres:15"

_CONN_KEYS: Final = frozenset({"host", "hostaddr", "port", "user", "password", "dbname"})
_DROP_TIMEOUT_S: Final = 30.0


class MakeCluster(Protocol):
    """Type of the ``make_cluster`` fixture."""

    def __call__(
        self, settings: Mapping[str, str | int] | None = None, *, timezone: str | None = None,
        hba: Sequence[str] | None = None, files: Mapping[str, bytes] | None = None,
    ) -> TempCluster: ...


def unique_name(prefix: str) -> str:
    """``<prefix>_<12 hex>``: unique across tests, sessions and parallel workers."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def url_dsn(
    host: str,
    port: int,
    dbname: str,
    user: str,
    password: str | None = None,
    params: dict[str, str] | None = None,
) -> str:
    """Build a ``postgresql://`` URL, percent-encoding every part (a unix-socket host too)."""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc = quote(host, safe="") if host.startswith("/") else host
    url = f"postgresql://{auth}@{netloc}:{port}/{quote(dbname, safe='')}"
    if params:
        url += "?" + urlencode(params)
    return url


@dataclass(frozen=True)
class PgServer:
    """The server the integration tests run against.

    ``source`` is "dsn" (env CDCENGINE_TEST_DSN), "docker" (testcontainers) or "temp"
    (a `TempCluster`, available as ``cluster``). ``params`` are extra libpq parameters of an
    external DSN (sslmode, ...) carried into every DSN built by `dsn`.
    """

    admin_dsn: str
    host: str
    port: int
    version: int
    superuser: str
    password: str | None
    source: str
    params: dict[str, str] = field(default_factory=dict)
    cluster: TempCluster | None = None

    def dsn(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        """URL DSN for ``dbname``. ``user=None`` means the superuser; ``password=None`` means
        the superuser's password for the superuser and none for other users."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        return url_dsn(self.host, self.port, dbname, user, password, self.params)

    @classmethod
    def introspect(
        cls, admin_dsn: str, source: str, cluster: TempCluster | None = None
    ) -> PgServer:
        """Connect once and read what the DSN really resolves to (env vars and .pgpass
        included), so later DSNs built from the parts reach the same server as the same user."""
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT current_user, rolsuper, current_setting('server_version_num')::int"
                " FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            assert row is not None
            user, is_super, version = row
            info = conn.info
            host, port, password = info.host, info.port, info.password
        if not is_super:
            raise RuntimeError(
                f"the test server DSN must connect as a superuser (it connects as {user!r}): "
                "the harness creates databases and roles and drops replication slots"
            )
        params = {k: str(v) for k, v in conninfo_to_dict(admin_dsn).items() if k not in _CONN_KEYS}
        return cls(
            admin_dsn=admin_dsn,
            host=host,
            port=int(port),
            version=int(version),
            superuser=str(user),
            password=password or None,
            source=source,
            params=params,
            cluster=cluster,
        )


def docker_reachable() -> bool:
    """True when the docker SDK is installed and an engine answers a ping within 5 s."""
    try:
        # importlib: optional dependency without type stubs, only needed when Docker is asked for
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure (no SDK, no socket, refused) means "no"
        return False


@contextlib.contextmanager
def _docker_server() -> Iterator[PgServer]:
    """A postgres:15 container with logical decoding enabled (testcontainers)."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.13 keeps it at the old path
        from testcontainers.postgres import PostgresContainer

    password = secrets.token_urlsafe(18)
    command: list[str] = []
    for key, value in SERVER_SETTINGS.items():
        command += ["-c", f"{key}={value}"]
    container = PostgresContainer(
        DOCKER_IMAGE, username="postgres", password=password, dbname="postgres", driver=None
    ).with_command(command)
    container.start()
    try:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(5432))
        yield PgServer.introspect(url_dsn(host, port, "postgres", "postgres", password), "docker")
    finally:
        container.stop()


@contextlib.contextmanager
def open_test_server() -> Iterator[PgServer]:
    """The session server, in order of preference:

    1. env CDCENGINE_TEST_DSN: an existing server (used as the admin DSN; must be a superuser);
    2. env CDCENGINE_TEST_DOCKER=1 and a reachable Docker engine: a testcontainers postgres:15;
    3. a `TempCluster` from the machine's binaries (stopped and deleted on exit).

    Raises `cdcengine_postgres.testing.cluster.ClusterError` (with the install hint) when it
    comes to 3 and there are no server binaries.
    """
    dsn = os.environ.get("CDCENGINE_TEST_DSN")
    if dsn:
        yield PgServer.introspect(dsn, "dsn")
        return
    if os.environ.get("CDCENGINE_TEST_DOCKER") == "1" and docker_reachable():
        with _docker_server() as server:
            yield server
        return
    with TempCluster() as cluster:
        yield PgServer.introspect(cluster.admin_dsn, "temp", cluster)


class ScratchDatabase:
    """A uniquely named database for one test, plus the roles the test creates.

    ``dsn`` connects as the superuser. `execute` runs one statement (or a parameterless
    script) in autocommit on a fresh connection each time, so a test that terminates backends
    cannot break the helper. `drop` removes everything; the ``db`` fixture calls it.
    """

    def __init__(self, server: PgServer, name: str | None = None) -> None:
        self.server = server
        self.name = name or unique_name("t")
        self.dsn = server.dsn(self.name)
        self._roles: list[str] = []

    def create(self) -> ScratchDatabase:
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        return self

    def execute(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> list[tuple[Any, ...]]:
        """Run ``query`` as the superuser in this database; returns the rows of the last
        result, or [] for statements that return none. Several ``;``-separated statements
        work only without ``params`` (the server refuses them in a prepared statement)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            rows: list[tuple[Any, ...]] = []
            while True:  # a parameterless script yields one result per statement
                rows = cur.fetchall() if cur.description is not None else []
                if not cur.nextset():
                    return rows

    def create_role(
        self,
        name: str | None = None,
        *,
        password: str | None = None,
        replication: bool = False,
        superuser: bool = False,
        login: bool = True,
    ) -> tuple[str, str]:
        """Create a role and return ``(rolename, dsn)`` for it on this database.

        ``name=None`` picks a unique ``r_<hex>`` name (roles are cluster-wide, so fixed names
        collide across tests and with leftovers); a given name is used verbatim.
        ``password=None`` picks a random one -- TCP auth is scram, so a role needs one to log
        in -- and the DSN carries it. The role is dropped after the database.
        """
        role = name or unique_name("r")
        if password is None:
            password = secrets.token_urlsafe(12)
        options = [
            "LOGIN" if login else "NOLOGIN",
            "REPLICATION" if replication else "NOREPLICATION",
            "SUPERUSER" if superuser else "NOSUPERUSER",
        ]
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH {} PASSWORD {}").format(
                    sql.Identifier(role), sql.SQL(" ".join(options)), sql.Literal(password)
                )
            )
        self._roles.append(role)
        return role, self.server.dsn(self.name, user=role, password=password)

    def drop(self) -> None:
        """Terminate sessions and walsenders, drop the database's replication slots (a
        database with logical slots cannot be dropped), drop the database, then the roles."""
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            self._drop_slots(conn)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )
            for role in reversed(self._roles):
                _drop_role(conn, role)
        self._roles.clear()

    def _drop_slots(self, conn: psycopg.Connection[Any]) -> None:
        deadline = time.monotonic() + _DROP_TIMEOUT_S
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [self.name],
            )
            slots = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [self.name]
            ).fetchall()
            if not slots:
                return
            for (slot,) in slots:
                # Still active while the terminated walsender exits; dropped on a later pass.
                with contextlib.suppress(errors.ObjectInUse, errors.UndefinedObject):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            if time.monotonic() > deadline:
                names = ", ".join(s for (s,) in slots)
                raise RuntimeError(f"replication slots of {self.name} still active: {names}")
            time.sleep(0.05)


def _drop_role(conn: psycopg.Connection[Any], role: str) -> None:
    """Drop a test role; if it still owns or was granted something in the admin database,
    drop that first (DROP OWNED only reaches the current database, the test's one is gone)."""
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
    )
    ident = sql.Identifier(role)
    try:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
    except errors.DependentObjectsStillExist:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))

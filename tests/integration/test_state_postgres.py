"""The PostgreSQL state store against a real server: the shared store contract
(tests/state_contract.py) and run history (tests/run_history_contract.py), each test in a schema
of its own, plus what is PostgreSQL's own: the schema, URL parameters, the advisory write lock,
reconnection, and connection errors that never show the password."""

from __future__ import annotations

import socket
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote

import psycopg
import pytest
from pgutil import PgServer, ScratchDatabase, unique_name

pytest.register_assert_rewrite("state_contract", "run_history_contract")

from run_history_contract import *  # noqa: E402, F403 - the shared tests run against this store
from state_contract import *  # noqa: E402, F403
from state_contract import OpenStore, enable  # noqa: E402

import cdcengine_postgres.state_store as pgstore  # noqa: E402
from cdcengine.errors import Reason, StateStoreError, iter_chain  # noqa: E402
from cdcengine.secrets import dsn_password, mask_dsn  # noqa: E402
from cdcengine.state import LATEST_VERSION, MIGRATIONS, SourceState, open_state  # noqa: E402
from cdcengine_postgres.state_store import PostgresStateStore, split_schema  # noqa: E402


def with_params(dsn: str, **params: str) -> str:
    for key, value in params.items():
        dsn += ("&" if "?" in dsn else "?") + f"{key}={quote(value, safe='')}"
    return dsn


@pytest.fixture(scope="module")
def state_db(pg_server: PgServer) -> Iterator[ScratchDatabase]:
    """One database for the module; every test gets a schema of its own in it."""
    scratch = ScratchDatabase(pg_server).create()
    try:
        yield scratch
    finally:
        scratch.drop()


@pytest.fixture
def state_url(state_db: ScratchDatabase) -> str:
    return with_params(state_db.dsn, schema=unique_name("s"))


@pytest.fixture
def open_store(state_url: str) -> Iterator[OpenStore]:
    opened: list[PostgresStateStore] = []

    def make(clock: Callable[[], float] | None = None) -> PostgresStateStore:
        opened.append(PostgresStateStore(state_url, clock=clock or time.time))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


def store_backends(db: ScratchDatabase) -> list[int]:
    return [
        int(pid)
        for (pid,) in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            [db.name, pgstore.APPLICATION_NAME],
        )
    ]


# schema and URL -------------------------------------------------------------------------------


def test_default_schema_is_created_and_migrated(db: ScratchDatabase) -> None:
    with open_state(db.dsn) as s:
        assert isinstance(s, PostgresStateStore)
        assert s.schema == "cdcengine"
        enable(s)
    tables = {
        name
        for (name,) in db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'cdcengine'"
        )
    }
    assert {"sources", "source_tables", "leases", "runs", "run_batches"} <= tables
    assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    versions = db.execute("SELECT version FROM cdcengine.schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]
    assert versions[-1] == (LATEST_VERSION,)


def test_reopen_keeps_data_and_schemas_are_separate_stores(
    state_url: str, state_db: ScratchDatabase
) -> None:
    with PostgresStateStore(state_url) as s:
        first = s.install_id()
        enable(s)
        schema = s.schema
    for _ in range(2):
        with PostgresStateStore(state_url) as s:
            assert s.install_id() == first
            assert s.get_source("shop") is not None
    count = state_db.execute(f'SELECT count(*) FROM "{schema}".schema_migrations')
    assert count == [(len(MIGRATIONS),)]
    with PostgresStateStore(state_url, schema=unique_name("other")) as other:
        assert other.install_id() != first
        assert other.get_source("shop") is None


def test_newer_schema_is_refused(state_url: str, state_db: ScratchDatabase) -> None:
    with PostgresStateStore(state_url) as s:
        schema = s.schema
    state_db.execute(
        f"INSERT INTO \"{schema}\".schema_migrations VALUES (%s, 'from the future', 0)",
        [LATEST_VERSION + 1],
    )
    with pytest.raises(StateStoreError, match="newer cdcengine") as info:
        PostgresStateStore(state_url)
    assert info.value.retryable is False


def test_schema_parameter_leaves_libpq_parameters_alone(state_db: ScratchDatabase) -> None:
    schema = unique_name("Mixed Case")
    url = with_params(state_db.dsn, connect_timeout="5", schema=schema, application_name="mine")
    with PostgresStateStore(url) as s:
        assert s.schema == schema
        assert "schema=" in s.url
        enable(s)
        apps = state_db.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = %s", [state_db.name]
        )
        assert ("mine",) in apps  # the URL's own parameters win over our defaults
    assert state_db.execute(f'SELECT name FROM "{schema}".sources') == [("shop",)]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", ("postgresql://u@h/db", None)),
        ("postgresql://u@h/db?schema=st", ("postgresql://u@h/db", "st")),
        (
            "postgres://u:p?w@h/db?sslmode=require&schema=a%20b&connect_timeout=3",
            ("postgres://u:p?w@h/db?sslmode=require&connect_timeout=3", "a b"),
        ),
        ("postgresql:///db?host=/tmp&schema=", ("postgresql:///db?host=/tmp", "")),
    ],
)
def test_split_schema(url: str, expected: tuple[str, str | None]) -> None:
    assert split_schema(url) == expected


def test_an_empty_schema_is_refused() -> None:
    with pytest.raises(StateStoreError, match="schema name") as info:
        PostgresStateStore("postgresql://u:hunter2@127.0.0.1:1/db?schema=")
    assert info.value.reason is Reason.CONFIG_INVALID
    assert "hunter2" not in str(info.value)


# connections ----------------------------------------------------------------------------------


def assert_no_secret(err: BaseException, secret: str) -> None:
    for exc in iter_chain(err):
        assert secret not in str(exc)
        assert secret not in repr(exc)
    assert secret not in "".join(traceback.format_exception(err))
    if isinstance(err, StateStoreError):
        assert secret not in err.fix


def test_wrong_password_is_refused_without_showing_it(state_db: ScratchDatabase) -> None:
    role, _ = state_db.create_role()
    secret = "Wr0ng-pa$$word-xyz"
    url = state_db.server.dsn(state_db.name, user=role, password=secret)
    with pytest.raises(StateStoreError) as info:
        PostgresStateStore(url)
    err = info.value
    assert err.reason is Reason.STATE_STORE_FAILED
    assert err.retryable is False
    assert "cannot connect to the PostgreSQL state store postgresql://" in err.message
    assert "***" in err.message
    assert "[engine] state URL" in err.fix
    assert_no_secret(err, secret)
    assert_no_secret(err, quote(secret, safe=""))


def test_an_unreachable_server_is_retryable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    secret = f"pw-{uuid.uuid4().hex}"  # built at run time: tracebacks quote the test's source
    url = f"postgresql://u:{secret}@127.0.0.1:{port}/db?connect_timeout=3"
    with pytest.raises(StateStoreError, match="cannot connect") as info:
        PostgresStateStore(url)
    assert info.value.retryable is True
    assert_no_secret(info.value, secret)


def test_a_user_without_create_rights_is_told_what_to_grant(state_db: ScratchDatabase) -> None:
    role, url = state_db.create_role()
    schema = unique_name("granted")
    with pytest.raises(StateStoreError) as info:
        PostgresStateStore(with_params(url, schema=schema))
    assert info.value.retryable is False
    assert "CREATE SCHEMA" in info.value.fix
    password = dsn_password(url)
    assert password
    assert_no_secret(info.value, password)
    # an operator creates the schema for it once; from then on the store needs no more rights
    state_db.execute(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{role}"')
    with PostgresStateStore(with_params(url, schema=schema)) as s:
        enable(s)
        assert s.get_source("shop") is not None


def test_a_lost_connection_is_reopened(open_store: OpenStore, state_db: ScratchDatabase) -> None:
    s = open_store()
    enable(s)

    def drop_session() -> int:
        (pid,) = store_backends(state_db)
        state_db.execute("SELECT pg_terminate_backend(%s)", [pid])
        time.sleep(0.1)
        return pid

    gone = drop_session()
    assert s.get_source("shop") is not None  # a read runs again on a new session
    assert store_backends(state_db) not in ([], [gone])
    gone = drop_session()
    assert s.upsert_table("shop", "public.more", "append").name == "public.more"  # and a write
    assert store_backends(state_db) not in ([], [gone])
    assert [t.name for t in s.list_tables("shop")].count("public.more") == 1
    s.close()
    with pytest.raises(StateStoreError, match="closed"):
        s.list_sources()


def test_writes_wait_for_the_advisory_lock(
    open_store: OpenStore, state_db: ScratchDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgstore, "LOCK_TIMEOUT_MS", 300)
    s = open_store()
    assert isinstance(s, PostgresStateStore)
    enable(s)
    keys = [pgstore._LOCK_NAMESPACE, pgstore._lock_key(s.schema)]
    with psycopg.connect(state_db.dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s::int4, %s::int4)", keys)
        assert s.get_source("shop") is not None  # reads take no write lock
        start = time.monotonic()
        with pytest.raises(StateStoreError, match="LockNotAvailable") as info:
            s.set_source_state("shop", SourceState.STREAMING)
        assert 0.25 < time.monotonic() - start < 5
        assert info.value.retryable is True
        other.execute("SELECT pg_advisory_unlock(%s::int4, %s::int4)", keys)
    assert s.set_source_state("shop", SourceState.STREAMING).state is SourceState.STREAMING


def test_open_state_gives_the_postgres_store(state_url: str) -> None:
    with open_state(state_url) as s:
        assert isinstance(s, PostgresStateStore)
        assert s.url == mask_dsn(state_url)

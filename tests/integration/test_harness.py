"""Tests of the test harness itself (conftest.py, pgutil.py, cdcengine_postgres.testing.cluster).

Every other integration test trusts these properties: the server can decode logically,
authentication is real, each test is isolated in its own database, cleanup really removes
slots held by live walsenders, and extra clusters get exactly the settings asked for.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from pgutil import MakeCluster, PgServer, ScratchDatabase

from cdcengine_postgres.testing.cluster import ClusterError, find_bindir

_seen_databases: set[str] = set()


def _one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_session_server_decodes_logically(pg_server: PgServer) -> None:
    assert _one(pg_server.admin_dsn, "SHOW wal_level") == "logical"
    assert pg_server.version >= 130000
    assert _one(pg_server.admin_dsn, "SHOW server_version_num") == str(pg_server.version)


def test_wrong_password_fails_over_tcp(pg_server: PgServer) -> None:
    if pg_server.source == "dsn" and pg_server.host.startswith("/"):
        pytest.skip("CDCENGINE_TEST_DSN uses a unix socket; its auth method is unknown")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_server.dsn("postgres", password="not-the-password"), connect_timeout=10)
    # ... while the right one works, over the same TCP endpoint.
    assert _one(pg_server.dsn("postgres"), "SELECT current_user") == pg_server.superuser


@pytest.mark.parametrize("round_", [1, 2])
def test_each_test_gets_its_own_database(db: ScratchDatabase, round_: int) -> None:
    assert db.name.startswith("t_")
    assert db.name not in _seen_databases
    _seen_databases.add(db.name)
    assert db.execute("SELECT current_database()") == [(db.name,)]
    # A table left over from the other round would make this fail.
    assert db.execute("SELECT to_regclass('public.marker')") == [(None,)]
    db.execute("CREATE TABLE marker (round int)")
    db.execute("INSERT INTO marker VALUES (%s)", [round_])
    assert db.execute("SELECT round FROM marker") == [(round_,)]


def test_execute_returns_last_result_of_script(db: ScratchDatabase) -> None:
    rows = db.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2); SELECT sum(x) FROM t")
    assert rows == [(3,)]
    assert db.execute("INSERT INTO t VALUES (3)") == []


def test_created_role_can_log_in(db: ScratchDatabase) -> None:
    role, dsn = db.create_role(replication=True)
    assert role.startswith("r_")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), rolreplication, rolsuper"
            " FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == (role, db.name, True, False)
    # A replication-capable role can open a logical replication connection.
    with psycopg.connect(dsn, replication="database", autocommit=True) as conn:
        system = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert system is not None
    assert system[3] == db.name


def test_role_with_odd_name_and_password(db: ScratchDatabase) -> None:
    role, dsn = db.create_role(f'Odd "role" {db.name}', password="p@ss:/w?rd%")
    assert _one(dsn, "SELECT current_user") == role
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(db.server.dsn(db.name, user=role, password="wrong"), connect_timeout=10)


def test_nologin_role_cannot_log_in(db: ScratchDatabase) -> None:
    _, dsn = db.create_role(login=False)
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        psycopg.connect(dsn, connect_timeout=10)


def test_drop_removes_database_active_slot_and_roles(pg_server: PgServer) -> None:
    """The `db` finalizer: a slot held by a live walsender and a role's open session must not
    stop the database and role from being dropped."""
    scratch = ScratchDatabase(pg_server).create()
    role, role_dsn = scratch.create_role(replication=True)
    slot = f"s_{scratch.name}"
    walsender = psycopg.connect(role_dsn, replication="database", autocommit=True)
    try:
        walsender.execute(f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput")
        scratch.execute("CREATE PUBLICATION p FOR ALL TABLES")
        walsender.execute(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', publication_names 'p')"
        )
        assert _one(
            pg_server.admin_dsn,
            f"SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'",
        )
        scratch.drop()
    finally:
        walsender.close()
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = %(d)s),"
            " (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %(s)s),"
            " (SELECT count(*) FROM pg_roles WHERE rolname = %(r)s)",
            {"d": scratch.name, "s": slot, "r": role},
        ).fetchone()
    assert left == (0, 0, 0)


def test_make_cluster_applies_settings(make_cluster: MakeCluster) -> None:
    cluster = make_cluster({"wal_level": "replica", "max_replication_slots": 2}, timezone="UTC")
    row = _one(
        cluster.admin_dsn,
        "SELECT current_setting('wal_level') || ',' || current_setting('max_replication_slots')"
        " || ',' || current_setting('TimeZone')",
    )
    assert row == "replica,2,UTC"
    assert cluster.log_path.is_file()


@pytest.mark.slow
def test_standby_is_in_recovery(make_cluster: MakeCluster) -> None:
    primary = make_cluster()
    standby = primary.make_standby()
    assert standby.port != primary.port
    assert _one(standby.admin_dsn, "SELECT pg_is_in_recovery()") is True
    assert _one(primary.admin_dsn, "SELECT pg_is_in_recovery()") is False
    assert _one(primary.admin_dsn, "SELECT count(*) FROM pg_stat_replication") == 1


def test_restart_after_immediate_stop_keeps_port_and_data(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    port, dsn = cluster.port, cluster.admin_dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor AS SELECT 42 AS x")
    cluster.stop(mode="immediate")
    assert not cluster.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5)
    cluster.start()
    assert cluster.port == port
    assert _one(dsn, "SELECT x FROM survivor") == 42


def test_cleanup_stops_server_and_removes_directory(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    root, dsn = cluster.root, cluster.admin_dsn
    cluster.cleanup()
    assert not root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5)


def test_wrong_bindir_setting_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDCENGINE_PG_BINDIR", str(tmp_path))
    with pytest.raises(ClusterError, match="apt-get install postgresql"):
        find_bindir()

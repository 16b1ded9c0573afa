"""`check_prerequisites` against real servers: every check's pass and fail path."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from cdc_util import by_name, errors, one, source_for, store

from cdcengine import api
from cdcengine.errors import CDCError, Reason
from cdcengine.source.adapter import Severity

SERVER_CHECKS = {"server_version", "not_standby", "wal_level", "replication_privilege",
                 "create_privilege", "replication_slots", "wal_senders",
                 "replication_connection", "slot", "publication", "lag_thresholds"}


def test_all_checks_pass_for_a_good_table(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(12,2), note text)")
    src = source_for(db.dsn, tmp_path, ["public.orders"])
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert errors(checks) == set(), [c for c in checks if not c.ok]
    assert SERVER_CHECKS <= {c.name for c in checks}
    for name in ("table_readable", "primary_key", "replica_identity", "column_names",
                 "table_owner"):
        assert one(checks, name, "public.orders").severity is Severity.OK
    assert all(c.ok == (c.severity is not Severity.ERROR) for c in checks)
    assert "streaming of large transactions" in one(checks, "server_version").message


def test_wal_level_replica_is_refused(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster({"wal_level": "replica"})
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    src = source_for(cluster.admin_dsn, tmp_path, ["t"], name="walrep")
    checks = api.check_prerequisites(src, state=store(tmp_path))
    c = one(checks, "wal_level")
    assert c.severity is Severity.ERROR
    assert "'replica'" in c.message and "wal_level = logical" in c.fix
    # the other checks still ran and were reported
    assert {"server_version", "replication_slots", "primary_key"} <= {x.name for x in checks}


def test_role_without_replication_create_or_ownership(db, tmp_path: Path) -> None:
    db.execute('CREATE TABLE "Orders" (id int PRIMARY KEY)')
    role, dsn = db.create_role("Cdc User " + db.name[-6:])
    db.execute(f'GRANT SELECT ON "Orders" TO "{role}"')
    src = source_for(dsn, tmp_path, ["public.Orders"])
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert {"replication_privilege", "replication_connection", "create_privilege",
            "table_owner"} <= errors(checks)
    priv = one(checks, "replication_privilege")
    assert f'ALTER ROLE "{role}" WITH REPLICATION;' in priv.fix
    owner = one(checks, "table_owner", "public.Orders")
    assert f'ALTER TABLE "public"."Orders" OWNER TO "{role}";' in owner.fix
    assert f'GRANT CREATE ON DATABASE "{db.name}" TO "{role}";' in \
        one(checks, "create_privilege").fix
    assert one(checks, "table_readable", "public.Orders").ok


def test_replication_role_that_owns_its_table_passes(db, tmp_path: Path) -> None:
    role, dsn = db.create_role(replication=True)
    db.execute(f'GRANT CREATE ON DATABASE "{db.name}" TO "{role}"')
    db.execute(f'CREATE TABLE items (id int PRIMARY KEY); ALTER TABLE items OWNER TO "{role}"')
    checks = api.check_prerequisites(source_for(dsn, tmp_path, ["items"]), state=store(tmp_path))
    assert errors(checks) == set(), [c for c in checks if not c.ok]


def test_unreadable_table(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE secret (id int PRIMARY KEY)")
    role, dsn = db.create_role(replication=True)
    src = source_for(dsn, tmp_path, ["secret"], management_mode="self_managed")
    c = one(api.check_prerequisites(src, state=store(tmp_path)), "table_readable",
            "public.secret")
    assert c.severity is Severity.ERROR
    assert c.fix == f'GRANT SELECT ON "public"."secret" TO "{role}";'


def test_table_without_primary_key(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE events (id int NOT NULL, kind text)")
    checks = api.check_prerequisites(source_for(db.dsn, tmp_path, ["events"]),
                                     state=store(tmp_path))
    pk = one(checks, "primary_key", "public.events")
    ident = one(checks, "replica_identity", "public.events")
    assert pk.severity is Severity.ERROR and ident.severity is Severity.ERROR
    assert "REPLICA IDENTITY" in pk.fix and "UPDATE and DELETE" in ident.message


def test_declared_key_needs_the_unique_index_as_identity(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE events (id int NOT NULL, kind text);"
               "CREATE UNIQUE INDEX events_id ON events (id)")
    override = {"table": {"events": {"primary_key": ["id"]}}}
    src = source_for(db.dsn, tmp_path, ["events"], **override)
    c = one(api.check_prerequisites(src, state=store(tmp_path)), "primary_key", "public.events")
    assert c.severity is Severity.ERROR
    assert c.fix == 'ALTER TABLE "public"."events" REPLICA IDENTITY USING INDEX "events_id";'
    db.execute("ALTER TABLE events REPLICA IDENTITY USING INDEX events_id")
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert errors(checks) == set(), [c for c in checks if not c.ok]


def test_replica_identity_full_with_declared_key(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE logs (id int, msg text); ALTER TABLE logs REPLICA IDENTITY FULL")
    bare = source_for(db.dsn, tmp_path, ["logs"])
    assert "primary_key" in errors(api.check_prerequisites(bare, state=store(tmp_path)))
    src = source_for(db.dsn, tmp_path, ["logs"], table={"logs": {"primary_key": ["id"]}})
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert errors(checks) == set(), [c for c in checks if not c.ok]
    assert "FULL" in one(checks, "primary_key", "public.logs").message


def test_missing_table_suggests_the_right_case(db, tmp_path: Path) -> None:
    db.execute('CREATE TABLE "Customers" (id int PRIMARY KEY)')
    checks = api.check_prerequisites(source_for(db.dsn, tmp_path, ["customers", "nothere"]),
                                     state=store(tmp_path))
    missing = by_name(checks, "table_exists")
    assert {c.table for c in missing} == {"public.customers", "public.nothere"}
    assert all(c.severity is Severity.ERROR for c in missing)
    assert "public.Customers" in one(checks, "table_exists", "public.customers").message


def test_refused_column_names(db, tmp_path: Path) -> None:
    db.execute('CREATE TABLE t (id int PRIMARY KEY, _cdc_lsn int, "Name" text, name text)')
    checks = api.check_prerequisites(source_for(db.dsn, tmp_path, ["t"]), state=store(tmp_path))
    found = [c for c in by_name(checks, "column_names", "public.t") if not c.ok]
    text = " ".join(c.message for c in found)
    assert "_cdc_lsn" in text and "Name/name" in text
    # selecting columns that avoid the clash makes the table acceptable
    ok = source_for(db.dsn, tmp_path, ["t"], table={"t": {"columns": ["id", "name"]}})
    assert errors(api.check_prerequisites(ok, state=store(tmp_path))) == set()


def test_slots_and_wal_senders_exhausted(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster({"max_replication_slots": 2, "max_wal_senders": 1})
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("SELECT pg_create_logical_replication_slot('other', 'pgoutput')")
    checks = api.check_prerequisites(source_for(cluster.admin_dsn, tmp_path, ["t"], name="ex"),
                                     state=store(tmp_path))
    slots = one(checks, "replication_slots")
    assert slots.severity is Severity.ERROR
    assert "1 of 2" in slots.message and "max_replication_slots" in slots.fix
    assert one(checks, "wal_senders").severity is Severity.ERROR


@pytest.mark.slow
def test_standby_is_refused(pg_server, tmp_path: Path) -> None:
    if pg_server.cluster is None:
        pytest.skip("needs a local TempCluster to clone a standby from")
    standby = pg_server.cluster.make_standby()
    try:
        src = source_for(standby.admin_dsn, tmp_path, ["t"], name="stby")
        c = one(api.check_prerequisites(src, state=store(tmp_path)), "not_standby")
        assert c.severity is Severity.ERROR and "primary" in c.fix
    finally:
        standby.cleanup()


def test_foreign_publication_and_slot_are_reported(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    src = source_for(db.dsn, tmp_path, ["t"])
    db.execute(f'CREATE PUBLICATION "{src.publication_name}" FOR TABLE t')
    db.execute(f"SELECT pg_create_logical_replication_slot('{src.slot_name}', 'pgoutput')")
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert {"publication", "slot"} <= errors(checks)
    assert "not created by this install" in one(checks, "publication").message


def test_self_managed_publication_problems(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY, x text); CREATE TABLE b (id int PRIMARY KEY);"
               "CREATE TABLE p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);"
               "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    src = source_for(db.dsn, tmp_path, ["a", "b", "p"], management_mode="self_managed",
                     publication_name="user_pub")
    missing = one(api.check_prerequisites(src, state=store(tmp_path)), "publication")
    assert missing.severity is Severity.ERROR
    assert missing.fix.startswith('CREATE PUBLICATION "user_pub" FOR TABLE "public"."a", '
                                  '"public"."b", "public"."p" WITH (publish_via_partition_root')
    db.execute("CREATE PUBLICATION user_pub FOR TABLE a (id), p WITH (publish = 'insert')")
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert one(checks, "publication_tables").fix == \
        'ALTER PUBLICATION "user_pub" ADD TABLE "public"."b";'
    assert "update, delete, truncate" in one(checks, "publication_operations").message
    assert one(checks, "publication_partition_root").severity is Severity.ERROR
    cols = one(checks, "publication_columns", "public.a")
    assert cols.severity is Severity.ERROR and "x" in cols.message
    # fixing the publication as told makes every check pass
    db.execute("ALTER PUBLICATION user_pub ADD TABLE b;"
               "ALTER PUBLICATION user_pub SET (publish = 'insert, update, delete, truncate',"
               " publish_via_partition_root = true);"
               "ALTER PUBLICATION user_pub DROP TABLE a; ALTER PUBLICATION user_pub ADD TABLE a")
    checks = api.check_prerequisites(src, state=store(tmp_path))
    assert errors(checks) == set(), [c for c in checks if not c.ok]
    assert one(checks, "partitioned_table", "public.p").severity is Severity.WARNING


def test_self_managed_column_list_and_row_filter_that_break_updates(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY, x text, y int);"
               "CREATE TABLE f (id int, x text); ALTER TABLE f REPLICA IDENTITY FULL;"
               "CREATE PUBLICATION up FOR TABLE a (x, y) WHERE (y > 0), f (id) "
               "WITH (publish_via_partition_root = true)")
    src = source_for(db.dsn, tmp_path, ["a", "f"], management_mode="self_managed",
                     publication_name="up", table={"f": {"primary_key": ["id"]}})
    checks = api.check_prerequisites(src, state=store(tmp_path))
    a_ident = [c for c in by_name(checks, "replica_identity", "public.a") if not c.ok]
    assert any("misses replica identity column(s) id" in c.message for c in a_ident)
    assert any("row filter" in c.message and "y" in c.message for c in a_ident)
    assert one(checks, "row_filter", "public.a").severity is Severity.WARNING
    f_ident = one(checks, "replica_identity", "public.f")
    assert f_ident.severity is Severity.ERROR and "FULL" in f_ident.message


def test_max_slot_wal_keep_size_lowers_the_critical_threshold(make_cluster, tmp_path) -> None:
    cluster = make_cluster({"max_slot_wal_keep_size": "600MB"})
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    src = source_for(cluster.admin_dsn, tmp_path, ["t"], name="cap")
    c = one(api.check_prerequisites(src, state=store(tmp_path)), "lag_thresholds")
    assert c.severity is Severity.WARNING  # 80 % of 600 = 480 <= warning 512
    assert "480 MB" in c.message
    lower = source_for(cluster.admin_dsn, tmp_path, ["t"], name="cap",
                       lag_warning_threshold_mb=100)
    c = one(api.check_prerequisites(lower, state=store(tmp_path)), "lag_thresholds")
    assert c.severity is Severity.OK and "lowered from 2048 MB" in c.message
    # a `settings` override in the state store wins over the file for the check too
    st = store(tmp_path)
    api.enable_cdc(src, state=st)
    api.update_cdc_settings(src, state=st, lag_warning_threshold_mb=100)
    c = one(api.check_prerequisites(src, state=st), "lag_thresholds")
    assert c.severity is Severity.OK and "warning at 100 MB" in c.message
    api.disable_cdc(src, state=st)


def test_unreachable_source_raises_a_classified_error(db, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = source_for(db.dsn, tmp_path, ["t"]).__class__(
        name="gone", dsn=f"postgresql://u:pw-Unreach-991@127.0.0.1:{port}/x", tables=["t"],
        destination=str(tmp_path))
    with pytest.raises(CDCError) as info:
        api.check_prerequisites(src, state=store(tmp_path))
    assert info.value.reason is Reason.CONNECTION_FAILED and info.value.retryable
    assert "Unreach" not in str(info.value)


def test_partition_leaf_is_captured_through_its_root(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE m (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k);"
               "CREATE TABLE m1 PARTITION OF m FOR VALUES IN (1)")
    checks = api.check_prerequisites(source_for(db.dsn, tmp_path, ["m1"]), state=store(tmp_path))
    c = one(checks, "table_kind", "public.m1")
    assert c.severity is Severity.ERROR and c.fix == "Capture public.m instead."
    root = api.check_prerequisites(source_for(db.dsn, tmp_path, ["m"]), state=store(tmp_path))
    assert errors(root) == set(), [c for c in root if not c.ok]

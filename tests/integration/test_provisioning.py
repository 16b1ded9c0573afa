"""enable_cdc / disable_cdc against a real server: create, adopt, refuse, roll back, tear down."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import psycopg
import pytest
from cdc_util import publication_exists, query, slot_exists, source_for, store

from cdcengine import api
from cdcengine.errors import CDCError, LeaseHeld, PrerequisitesFailed, Reason
from cdcengine.source.registry import adapter_for
from cdcengine.state.base import SourceState, TableState, new_holder_id


@pytest.fixture
def orders(db):
    db.execute("CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(12,2), note text);"
               "CREATE TABLE customers (id int PRIMARY KEY, name text)")
    return db


def test_enable_managed_creates_marked_publication_and_slot(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders", "public.customers"])
    res = api.enable_cdc(src, state=st)
    assert res.slot_created and res.publication_created and not res.already_enabled
    assert res.consistent_point and "/" in res.consistent_point
    slot = query(orders.dsn, "SELECT plugin, slot_type, database FROM pg_replication_slots "
                             "WHERE slot_name = %s", [src.slot_name])
    assert slot == [("pgoutput", "logical", orders.name)]
    pub = query(orders.dsn, "SELECT pubviaroot, pubinsert AND pubupdate AND pubdelete AND "
                            "pubtruncate, obj_description(oid, 'pg_publication') "
                            "FROM pg_publication WHERE pubname = %s", [src.publication_name])
    assert pub[0][0] is True and pub[0][1] is True
    assert pub[0][2] == (f"cdcengine install={st.install_id()} source={src.name} "
                         f"slot={src.slot_name}")
    tables = query(orders.dsn, "SELECT schemaname || '.' || tablename FROM pg_publication_tables"
                               " WHERE pubname = %s ORDER BY 1", [src.publication_name])
    assert tables == [("public.customers",), ("public.orders",)]
    rec = st.get_source(src.name)
    assert rec is not None and rec.enabled and rec.state is SourceState.SNAPSHOTTING
    sysid = query(orders.dsn, "SELECT system_identifier::text FROM pg_control_system()")[0][0]
    assert rec.system_identifier == sysid and rec.timeline == 1
    assert {t.name: t.state for t in st.list_tables(src.name)} == {
        "public.orders": TableState.PENDING, "public.customers": TableState.PENDING}
    # status shows it all, with ownership proven by the mark
    status = api.cdc_status(src, state=st)
    assert status.enabled and status.slot.exists and status.publication.owned is True
    assert status.consistent_point == res.consistent_point


def test_enable_is_idempotent_and_picks_up_added_tables(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    first = api.enable_cdc(src, state=st)
    wider = dataclasses.replace(src, tables=("orders", "customers"))
    again = api.enable_cdc(wider, state=st)
    assert again.already_enabled and again.slot_adopted and again.publication_adopted
    assert not again.slot_created and again.consistent_point is None
    published = query(orders.dsn, "SELECT tablename FROM pg_publication_tables WHERE pubname = %s"
                                  " ORDER BY 1", [src.publication_name])
    assert published == [("customers",), ("orders",)]
    assert {t.name for t in st.list_tables(src.name)} == {"public.orders", "public.customers"}
    rec = st.get_source(src.name)
    assert rec is not None and rec.consistent_point is not None
    assert first.consistent_point is not None


def test_enable_with_column_lists_on_pg15(orders, tmp_path: Path) -> None:
    src = source_for(orders.dsn, tmp_path, ["orders"],
                     table={"orders": {"columns": ["total"]}})
    api.enable_cdc(src, state=store(tmp_path))
    cols = query(orders.dsn, "SELECT attnames FROM pg_publication_tables WHERE pubname = %s",
                 [src.publication_name])[0][0]
    if orders.server.version >= 150000:
        assert sorted(cols) == ["id", "total"]  # the key always travels
    else:
        assert sorted(cols) == ["id", "note", "total"]


def test_enable_refuses_on_failed_checks_and_changes_nothing(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE nokey (a int)")
    src = source_for(db.dsn, tmp_path, ["nokey"])
    with pytest.raises(PrerequisitesFailed) as info:
        api.enable_cdc(src, state=store(tmp_path))
    assert info.value.reason is Reason.PREREQUISITES_FAILED and not info.value.retryable
    assert "primary_key (public.nokey)" in info.value.message
    assert any(c.name == "primary_key" and not c.ok for c in info.value.checks)
    assert not slot_exists(db.dsn, src.slot_name)
    assert not publication_exists(db.dsn, src.publication_name)


def test_adopts_own_leftovers_after_a_lost_state_record(orders, tmp_path: Path) -> None:
    """enable crashed after provisioning, before the state store recorded it: adopt, not fail."""
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    adapter_for(src).provision(src, install_id=st.install_id())
    assert st.get_source(src.name) is None
    res = api.enable_cdc(src, state=st)
    assert res.slot_adopted and res.publication_adopted
    assert not res.slot_created and not res.publication_created


def test_refuses_what_another_install_created(orders, tmp_path: Path) -> None:
    src = source_for(orders.dsn, tmp_path, ["orders"])
    api.enable_cdc(src, state=store(tmp_path, "first.db"))
    other = store(tmp_path, "second.db")
    with pytest.raises(PrerequisitesFailed) as info:
        api.enable_cdc(src, state=other)
    failed = {c.name for c in info.value.checks if not c.ok}
    assert {"publication", "slot"} <= failed
    # the adapter refuses on its own too, with a stated reason and without touching anything
    with pytest.raises(CDCError) as direct:
        adapter_for(src).provision(src, install_id=other.install_id())
    assert direct.value.reason is Reason.PUBLICATION_EXISTS
    # disable from the other install leaves both alone and says so
    res = api.disable_cdc(src, state=other)
    assert not res.slot_dropped and not res.publication_dropped and len(res.notes) == 2
    assert slot_exists(orders.dsn, src.slot_name)
    assert publication_exists(orders.dsn, src.publication_name)


def test_refuses_foreign_slot_and_leaves_it(orders, tmp_path: Path) -> None:
    src = source_for(orders.dsn, tmp_path, ["orders"])
    orders.execute(f"SELECT pg_create_logical_replication_slot('{src.slot_name}', 'pgoutput')")
    with pytest.raises(CDCError) as info:
        adapter_for(src).provision(src, install_id=store(tmp_path).install_id())
    assert info.value.reason is Reason.SLOT_EXISTS
    assert slot_exists(orders.dsn, src.slot_name)
    assert not publication_exists(orders.dsn, src.publication_name)  # refused before creating


def test_blocking_transaction_times_out_names_blocker_and_rolls_back(orders, tmp_path) -> None:
    src = source_for(orders.dsn, tmp_path, ["orders"])
    with psycopg.connect(orders.dsn) as blocker:  # a transaction holding an xid
        blocker.execute("INSERT INTO customers VALUES (1, 'x')")
        blocker_pid = blocker.info.backend_pid
        with pytest.raises(CDCError) as info:
            api.enable_cdc(src, state=store(tmp_path), slot_wait_s=1.0)
        blocker.rollback()
    assert info.value.reason is Reason.SLOT_CREATION_BLOCKED and info.value.retryable
    assert f"pid {blocker_pid}" in info.value.message
    assert "transaction open" in info.value.message
    # exactly what this call created (the publication) was dropped again; no slot remains
    assert not publication_exists(orders.dsn, src.publication_name)
    assert not slot_exists(orders.dsn, src.slot_name)
    st = store(tmp_path)
    assert st.get_source(src.name) is None
    # once the transaction is gone, enable succeeds
    assert api.enable_cdc(src, state=st).slot_created


def test_self_managed_creates_and_drops_only_the_slot(orders, tmp_path: Path) -> None:
    orders.execute("CREATE PUBLICATION mine FOR TABLE orders")
    src = source_for(orders.dsn, tmp_path, ["orders"], management_mode="self_managed",
                     publication_name="mine")
    st = store(tmp_path)
    res = api.enable_cdc(src, state=st)
    assert res.slot_created and not res.publication_created and not res.publication_adopted
    assert query(orders.dsn, "SELECT obj_description(oid, 'pg_publication') FROM pg_publication"
                             " WHERE pubname = 'mine'") == [(None,)]  # never altered
    off = api.disable_cdc(src, state=st)
    assert off.slot_dropped and not off.publication_dropped
    assert publication_exists(orders.dsn, "mine")
    assert not slot_exists(orders.dsn, src.slot_name)


def test_self_managed_without_publication_is_refused(orders, tmp_path: Path) -> None:
    src = source_for(orders.dsn, tmp_path, ["orders"], management_mode="self_managed")
    with pytest.raises(PrerequisitesFailed) as info:
        api.enable_cdc(src, state=store(tmp_path))
    pub = next(c for c in info.value.checks if c.name == "publication")
    assert pub.fix.startswith(f'CREATE PUBLICATION "{src.publication_name}" FOR TABLE')
    assert not slot_exists(orders.dsn, src.slot_name)


def test_disable_twice_and_state(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    api.enable_cdc(src, state=st)
    first = api.disable_cdc(src, state=st)
    assert first.slot_dropped and first.publication_dropped and not first.already_disabled
    second = api.disable_cdc(src, state=st)
    assert second.already_disabled and not second.slot_dropped and not second.publication_dropped
    rec = st.get_source(src.name)
    assert rec is not None and not rec.enabled and rec.state is SourceState.DISABLED
    assert not slot_exists(orders.dsn, src.slot_name)
    assert not publication_exists(orders.dsn, src.publication_name)


def test_disable_terminates_a_consumer_holding_the_slot(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    api.enable_cdc(src, state=st)
    consumer = psycopg.connect(orders.dsn, autocommit=True, replication="database")
    consumer.execute(f"START_REPLICATION SLOT {src.slot_name} LOGICAL 0/0 "
                     f"(proto_version '1', publication_names '{src.publication_name}')")
    holder = consumer.info.backend_pid
    assert query(orders.dsn, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                 [src.slot_name]) == [(holder,)]
    status = api.cdc_status(src, state=st)
    assert status.slot.active and status.slot.active_pid == holder
    try:
        res = api.disable_cdc(src, state=st, wait_s=10)
    finally:
        consumer.close()
    assert res.slot_dropped and res.terminated_pids == (holder,)
    assert not slot_exists(orders.dsn, src.slot_name)


def test_enabled_settings_are_immutable(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    api.enable_cdc(src, state=st)
    for change in ({"slot_name": "other_slot"}, {"publication_name": "other_pub"},
                   {"management_mode": "self_managed"}):
        with pytest.raises(CDCError) as info:
            api.enable_cdc(dataclasses.replace(src, **change), state=st)
        assert info.value.reason is Reason.IMMUTABLE_SETTING
        assert next(iter(change)) in info.value.message
    # disable uses the recorded names even when the config changed
    res = api.disable_cdc(dataclasses.replace(src, slot_name="other_slot"), state=st)
    assert res.slot_dropped and not slot_exists(orders.dsn, src.slot_name)


def test_enabled_source_whose_slot_vanished_needs_repair(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    api.enable_cdc(src, state=st)
    orders.execute(f"SELECT pg_drop_replication_slot('{src.slot_name}')")
    with pytest.raises(CDCError) as info:
        api.enable_cdc(src, state=st)
    assert info.value.reason is Reason.SLOT_MISSING and "repair" in info.value.fix
    assert not slot_exists(orders.dsn, src.slot_name)  # never silently recreated with a gap


def test_lease_blocks_a_second_actor(orders, tmp_path: Path) -> None:
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    lease = st.acquire_lease(src.name, holder=new_holder_id(), purpose="daemon", ttl_s=60)
    with pytest.raises(LeaseHeld) as info:
        api.enable_cdc(src, state=store(tmp_path))
    assert info.value.retryable and "'daemon'" in info.value.message
    with pytest.raises(LeaseHeld):
        api.disable_cdc(src, state=store(tmp_path))
    assert not slot_exists(orders.dsn, src.slot_name)
    st.release_lease(lease)
    assert api.enable_cdc(src, state=st).slot_created


def test_concurrent_enables_one_wins(orders, tmp_path: Path) -> None:
    src = source_for(orders.dsn, tmp_path, ["orders"])
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(api.enable_cdc(src, state="sqlite:///" + str(tmp_path / "s.db")))
        except CDCError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [o for o in outcomes if isinstance(o, api.EnableResult) and o.slot_created]
    assert len(created) == 1, outcomes
    assert len(query(orders.dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                     [src.slot_name])) == 1


def test_reenable_while_the_own_slot_streams(orders, tmp_path: Path) -> None:
    """Adding a table to a source whose daemon holds the slot must not fail as slot_in_use."""
    st = store(tmp_path)
    src = source_for(orders.dsn, tmp_path, ["orders"])
    api.enable_cdc(src, state=st)
    consumer = psycopg.connect(orders.dsn, autocommit=True, replication="database")
    try:
        consumer.execute(f"START_REPLICATION SLOT {src.slot_name} LOGICAL 0/0 "
                         f"(proto_version '1', publication_names '{src.publication_name}')")
        res = api.enable_cdc(dataclasses.replace(src, tables=("orders", "customers")), state=st)
        assert res.already_enabled and res.slot_adopted
        # someone else's install may not adopt a busy slot, even with a matching name
        with pytest.raises(PrerequisitesFailed):
            api.enable_cdc(src, state=store(tmp_path, "other.db"))
    finally:
        consumer.close()

"""Slot health against the real server (SPEC §7, issue 6): retained-WAL thresholds, auto-drop,
self-managed, max_slot_wal_keep_size, invalidation, repair/resume, sweep --prune."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import psycopg
import pytest
from cdc_util import publication_exists, query, slot_exists, source_for
from cli_util import run_cli
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api
from cdcengine.api.recovery import repair_cdc, resume_cdc
from cdcengine.config import SourceConfig
from cdcengine.control.health import sweep
from cdcengine.errors import CDCError, PrerequisitesFailed, Reason
from cdcengine.pipeline.pipeline import Pipeline
from cdcengine.source.registry import adapter_for
from cdcengine.state import open_state

MB = 1024 * 1024


def retained_mb(dsn: str, slot: str) -> float:
    rows = query(dsn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)"
                      " FROM pg_replication_slots WHERE slot_name = %s", [slot])
    return float(rows[0][0] or 0) / MB if rows else 0.0


def run_sql(dsn: str, sql: str, params: list[object] | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql, params)  # type: ignore[arg-type]


def grow_wal(dsn: str, slot: str, target_mb: float) -> None:
    """Write uncaptured rows until the slot retains at least `target_mb` of WAL."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (id bigserial PRIMARY KEY, pad text)")
        while retained_mb(dsn, slot) < target_mb:
            conn.execute("INSERT INTO filler (pad) SELECT repeat(md5(g::text), 16)"
                         " FROM generate_series(1, 1000) g")


def setup(db, tmp_path: Path, *, state: str | None = None, **kw: object
          ) -> tuple[SourceConfig, str]:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g")
    state = state or "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["items"], flush_interval_ms=100, **kw)
    api.enable_cdc(src, state=state)
    return src, state


def source_rows(dsn: str) -> dict[object, dict[str, object]]:
    return {r[0]: {"id": r[0], "v": r[1]} for r in query(dsn, "SELECT id, v FROM items")}


def same_as_source(src: SourceConfig) -> bool:
    want = source_rows(src.dsn)
    got = {k: {"id": r["id"], "v": r["v"]} for k, r in live_rows(src, "items").items()}
    return got == want


def test_stalled_slot_warns_then_sweep_auto_drops_it(db, tmp_path: Path) -> None:
    src, state = setup(db, tmp_path, lag_warning_threshold_mb=2, lag_critical_threshold_mb=5)
    grow_wal(db.dsn, src.slot_name, 2.5)
    r = sweep([src], state=state).reports[0]
    assert (r.action, r.level, r.state) == ("warning", "warning", "streaming" if False
                                            else "warning"), r
    assert r.retained_wal_bytes >= 2 * MB and not r.dropped
    assert slot_exists(db.dsn, src.slot_name)

    grow_wal(db.dsn, src.slot_name, 5.5)
    result = sweep([src], state=state)
    r = result.reports[0]
    assert result.exit_code == 0
    assert (r.action, r.state, r.dropped) == ("auto_drop", "broken", True), r
    assert not slot_exists(db.dsn, src.slot_name)
    assert not publication_exists(db.dsn, src.publication_name)
    st = api.cdc_status(src, state=state)
    assert st.state == "broken" and st.broken is not None
    assert st.broken.reason == "auto_dropped_critical_lag"
    assert "critical threshold 5 MB" in st.broken.message and "repair" in st.broken.message

    # nothing left to act on: a later pass only says so; a pipeline refuses to stream
    again = sweep([src], state=state).reports[0]
    assert again.action == "none" and "repair" in again.message
    with pytest.raises(CDCError) as err:
        Pipeline(src, state=state).run()
    assert err.value.reason is Reason.AUTO_DROPPED_CRITICAL_LAG


def test_without_auto_drop_critical_is_error_and_nothing_is_dropped(db, tmp_path: Path) -> None:
    src, state = setup(db, tmp_path, lag_warning_threshold_mb=1, lag_critical_threshold_mb=3,
                       auto_drop_slot=False)
    grow_wal(db.dsn, src.slot_name, 3.5)
    r = sweep([src], state=state).reports[0]
    assert (r.action, r.state, r.dropped) == ("error", "error", False), r
    assert slot_exists(db.dsn, src.slot_name)
    assert publication_exists(db.dsn, src.publication_name)
    # the settings change reaches the next pass: auto-drop on → dropped
    api.update_cdc_settings(src, state=state, auto_drop_slot=True)
    r = sweep([src], state=state).reports[0]
    assert (r.action, r.state, r.dropped) == ("auto_drop", "broken", True), r
    assert not slot_exists(db.dsn, src.slot_name)


def _consume_until_below(src: SourceConfig, state: str, mb: float) -> None:
    """Stream until the slot's restart_lsn moves up (a checkpoint logs the running-xacts
    record decoding needs to advance it)."""
    with Running(src, state):
        deadline = time.monotonic() + 60
        while retained_mb(src.dsn, src.slot_name) >= mb:
            assert time.monotonic() < deadline, "restart_lsn did not advance"
            run_sql(src.dsn, "CHECKPOINT")
            run_sql(src.dsn, "UPDATE items SET v = v WHERE id = 1")
            time.sleep(0.5)


def test_self_managed_is_broken_but_streams_and_clears_itself(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;"
               "CREATE PUBLICATION my_pub FOR TABLE items")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["items"], flush_interval_ms=100,
                     management_mode="self_managed", publication_name="my_pub",
                     lag_warning_threshold_mb=1, lag_critical_threshold_mb=2)
    api.enable_cdc(src, state=state)
    grow_wal(db.dsn, src.slot_name, 2.5)
    r = sweep([src], state=state).reports[0]
    assert (r.action, r.state, r.dropped) == ("broken_self_managed", "broken", False), r
    assert slot_exists(db.dsn, src.slot_name) and publication_exists(db.dsn, "my_pub")
    st = api.cdc_status(src, state=state)
    assert st.broken is not None and st.broken.reason == "critical_lag_self_managed"

    # streaming continues while broken this way; once retained WAL is below warning the next
    # pass clears it by itself
    db.execute("INSERT INTO items VALUES (51, 'new')")
    _consume_until_below(src, state, 1)
    assert same_as_source(src)
    r = sweep([src], state=state).reports[0]
    assert r.action == "none" and r.state == "streaming", r
    st = api.cdc_status(src, state=state)
    assert st.broken is None and st.state == "streaming"
    assert slot_exists(db.dsn, src.slot_name)


def test_retention_cap_lowers_critical_to_80_percent(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster({"max_slot_wal_keep_size": "10MB"})
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(dsn, tmp_path, ["items"], name="capped")  # warning 512, critical 2048
    api.enable_cdc(src, state=state)
    grow_wal(dsn, src.slot_name, 6)
    r = sweep([src], state=state).reports[0]
    assert r.critical_mb == 8 and r.configured_critical_mb == 2048 and r.retention_cap_mb == 10
    assert r.action == "none" and r.state != "broken", r
    grow_wal(dsn, src.slot_name, 8.2)
    r = sweep([src], state=state).reports[0]
    assert (r.action, r.dropped) == ("auto_drop", True), r
    assert "max_slot_wal_keep_size 10 MB" in r.message
    assert not slot_exists(dsn, src.slot_name)


def test_invalidated_slot_is_broken_and_repair_restores_exact_data(make_cluster,
                                                                   tmp_path: Path) -> None:
    cluster = make_cluster({"max_slot_wal_keep_size": "1MB", "wal_keep_size": 0})
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
                     "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(dsn, tmp_path, ["items"], name="lossy", flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: same_as_source(src), timeout=60)
    # changes while nothing consumes, then PostgreSQL removes the WAL the slot needed
    run_sql(dsn, "UPDATE items SET v = 'lost' WHERE id <= 10; DELETE FROM items WHERE id > 45;"
               "INSERT INTO items VALUES (100, 'new')")
    deadline = time.monotonic() + 60
    while query(dsn, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                [src.slot_name])[0][0] != "lost":
        assert time.monotonic() < deadline, "the slot was not invalidated"
        grow_wal(dsn, src.slot_name, 0)  # (creates filler)
        run_sql(dsn, "INSERT INTO filler (pad) SELECT repeat('x', 1000)"
                   " FROM generate_series(1, 20000); SELECT pg_switch_wal(); CHECKPOINT")

    r = sweep([src], state=state).reports[0]
    assert (r.action, r.state) == ("slot_invalidated", "broken"), r
    st = api.cdc_status(src, state=state)
    assert st.broken is not None and st.broken.reason == "slot_invalidated"
    with pytest.raises(CDCError) as err:
        Pipeline(src, state=state).run()
    assert err.value.reason is Reason.SLOT_INVALIDATED
    with pytest.raises(CDCError) as err:
        resume_cdc(src, state=state)  # a pause it is not: repair is the fix

    res = repair_cdc(src, state=state)
    assert res.was == "slot_invalidated" and res.tables == ("public.items",)
    assert api.cdc_status(src, state=state).broken is None
    with Running(src, state):
        wait_for(lambda: same_as_source(src), timeout=90)
        run_sql(dsn, "INSERT INTO items VALUES (101, 'after repair')")
        wait_for(lambda: same_as_source(src), timeout=60)
    assert live_rows(src, "items")[1]["v"] == "lost" and 46 not in live_rows(src, "items")

    with pytest.raises(CDCError) as err:
        repair_cdc(src, state=state)
    assert err.value.reason is Reason.NOTHING_TO_REPAIR


def test_repair_of_a_slot_dropped_behind_the_engine_and_cli_refusals(db, tmp_path: Path
                                                                       ) -> None:
    src, state = setup(db, tmp_path)
    with Running(src, state):
        wait_for(lambda: same_as_source(src), timeout=60)
    cfg = _config(tmp_path, state, [src])
    refused = run_cli(cfg, "repair", "--source", src.name)
    assert refused.returncode == 1 and "nothing to repair" in refused.stdout, refused
    not_paused = run_cli(cfg, "resume", "--source", src.name)
    assert not_paused.returncode == 1 and "not paused" in not_paused.stdout, not_paused

    run_sql(db.dsn, "SELECT pg_drop_replication_slot(%s)", [src.slot_name])
    db.execute("UPDATE items SET v = 'unseen' WHERE id = 2")
    swept = run_cli(cfg, "sweep")
    assert swept.returncode == 0 and "slot_missing" in swept.stdout, swept
    status = run_cli(cfg, "status", "--json")
    assert '"reason": "slot_missing"' in status.stdout, status
    repaired = run_cli(cfg, "repair", "--source", src.name)
    assert repaired.returncode == 0 and "repaired (slot_missing)" in repaired.stdout, repaired
    assert slot_exists(db.dsn, src.slot_name)
    with Running(src, state):
        wait_for(lambda: same_as_source(src), timeout=60)
    assert live_rows(src, "items")[2]["v"] == "unseen"


def test_resume_clears_a_pause_after_reprobing(db, tmp_path: Path) -> None:
    src, state = setup(db, tmp_path)
    with open_state(state) as store:
        store.set_paused(src.name, "permission_denied", "permission denied for table items")
    with pytest.raises(CDCError):
        repair_cdc(src, state=state)  # nothing broken: a pause is resume's
    res = resume_cdc(src, state=state)
    assert res.was == "permission_denied"
    assert api.cdc_status(src, state=state).paused is None
    # a cause that is not fixed keeps the pause
    with open_state(state) as store:
        store.set_paused(src.name, "permission_denied", "permission denied for table items")
    db.execute("ALTER TABLE items REPLICA IDENTITY NOTHING")
    with pytest.raises(PrerequisitesFailed):
        resume_cdc(src, state=state)
    assert api.cdc_status(src, state=state).paused is not None


def _config(tmp_path: Path, state: str, sources: list[SourceConfig], **extra: object) -> Path:
    lines = [f'[engine]\nstate = "{state}"\nhttp_port = {extra.pop("http_port", 0)}\n']
    for s in sources:
        tables = ", ".join(f'"{t}"' for t in s.tables)
        lines.append(f'[[source]]\nname = "{s.name}"\ndsn = "{s.dsn}"\ntables = [{tables}]\n'
                     f'destination = "{s.destination}"\nflush_interval_ms = 100\n'
                     f'management_mode = "{s.management_mode}"\n'
                     f'slot_name = "{s.slot_name}"\npublication_name = "{s.publication_name}"\n'
                     f"lag_warning_threshold_mb = {s.lag_warning_threshold_mb}\n"
                     f"lag_critical_threshold_mb = {s.lag_critical_threshold_mb}\n"
                     f"lag_check_interval_s = {s.lag_check_interval_s}\n"
                     f"auto_drop_slot = {str(s.auto_drop_slot).lower()}\n")
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text("".join(lines))
    return cfg


def test_sweep_prune_drops_only_what_removed_sources_own(db, tmp_path: Path) -> None:
    src, state = setup(db, tmp_path)
    other = dataclasses.replace(src, name="gone", slot_name="cdcengine_gone_" + src.name[-8:],
                                publication_name="cdcengine_gone_" + src.name[-8:],
                                destination=str(tmp_path / "lake2"))
    api.enable_cdc(other, state=state)
    # an unrelated slot and publication of the same names' kind are never touched
    db.execute("CREATE PUBLICATION not_ours FOR TABLE items")
    cfg = _config(tmp_path, state, [src])  # `gone` left the config
    plain = run_cli(cfg, "sweep")
    assert plain.returncode == 0 and slot_exists(db.dsn, other.slot_name), plain
    pruned = run_cli(cfg, "sweep", "--prune")
    assert pruned.returncode == 0, pruned
    assert "prune gone: dropped slot" in pruned.stdout, pruned.stdout
    assert not slot_exists(db.dsn, other.slot_name)
    assert not publication_exists(db.dsn, other.publication_name)
    assert slot_exists(db.dsn, src.slot_name) and publication_exists(db.dsn, "not_ours")
    with open_state(state) as store:
        rec = store.get_source("gone")
        assert rec is not None and not rec.enabled
    again = run_cli(cfg, "sweep", "--prune", "--json")
    assert again.returncode == 0 and '"pruned": []' in again.stdout, again.stdout


def test_probe_sees_the_engines_temporary_snapshot_slots(db, tmp_path: Path) -> None:
    src, state = setup(db, tmp_path)
    adapter = adapter_for(src)
    with adapter.snapshot(src, src.table_configs[0]):
        grow_wal(db.dsn, src.slot_name, 1.5)
        probe = adapter.probe_health(src)
        assert [s.name.startswith(src.slot_name[:44] + "_snap_") for s in
                probe.temporary_slots] == [True]
        temp = probe.temporary_slots[0]
        assert temp.temporary and temp.retained_wal_bytes >= MB
        st = api.cdc_status(src, state=state)
        assert [t.name for t in st.temporary_slots] == [temp.name]
    assert adapter.probe_health(src).temporary_slots == ()


def test_a_table_removed_from_the_config_is_not_a_lost_publication(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "CREATE TABLE extra (id int PRIMARY KEY, v text);"
               "INSERT INTO items VALUES (1, 'a'); INSERT INTO extra VALUES (1, 'x')")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["items", "extra"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    with Running(src, state):
        wait_for(lambda: set(live_rows(src, "extra")) == {1} and same_as_source(src))
    fewer = dataclasses.replace(src, tables=("public.items",))
    api.enable_cdc(fewer, state=state)  # the managed publication follows the config
    assert api.cdc_status(fewer, state=state).publication.tables == ("public.items",)
    r = sweep([fewer], state=state).reports[0]
    assert r.action == "none" and r.state != "broken", r
    db.execute("INSERT INTO items VALUES (2, 'b'); INSERT INTO extra VALUES (2, 'y')")
    with Running(fewer, state):
        wait_for(lambda: same_as_source(fewer))
    assert set(live_rows(src, "extra")) == {1}  # its Delta table stays as it was, untouched
    with open_state(state) as store:
        assert [t.name for t in store.list_tables(src.name)] == ["public.items"]

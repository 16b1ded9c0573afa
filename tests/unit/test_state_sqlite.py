"""The SQLite state store: schema, sources, tables, settings and leases (across processes too)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path

import pytest

import cdcengine.state
from cdcengine.errors import LeaseHeld, Reason, StateStoreError
from cdcengine.state import (
    LATEST_VERSION,
    MIGRATIONS,
    SourceState,
    SQLiteStateStore,
    StateStore,
    TableState,
    open_state,
)

SRC = Path(cdcengine.state.__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db: Path, clock: FakeClock) -> Iterator[SQLiteStateStore]:
    with SQLiteStateStore(db, clock=clock) as s:
        yield s


def enable(store: StateStore, name: str = "shop", **tables: str) -> None:
    store.record_enabled(
        name,
        management_mode="managed",
        slot_name=f"cdcengine_{name}",
        publication_name=f"cdcengine_{name}",
        consistent_point=0x16B3748,
        system_identifier="7300000000000000001",
        timeline=1,
        tables=tables or {"public.orders": "consolidated", "public.events": "append"},
    )


# schema ---------------------------------------------------------------------------------------


def test_open_uses_wal_and_records_every_migration(store: SQLiteStateStore, db: Path) -> None:
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in raw.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in MIGRATIONS]
    assert versions == sorted(versions)
    assert versions[-1] == LATEST_VERSION


def test_reopen_is_idempotent_and_keeps_data(db: Path) -> None:
    with SQLiteStateStore(db) as s:
        enable(s)
    for _ in range(2):
        with SQLiteStateStore(db) as s:
            assert s.get_source("shop") is not None
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
            MIGRATIONS
        )


def test_newer_schema_is_refused(db: Path) -> None:
    SQLiteStateStore(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (LATEST_VERSION + 1,)
        )
    with pytest.raises(StateStoreError, match="newer cdcengine") as info:
        SQLiteStateStore(db)
    assert info.value.retryable is False


def test_sqlite_errors_are_wrapped_and_chained(tmp_path: Path) -> None:
    with pytest.raises(StateStoreError) as info:
        SQLiteStateStore(tmp_path)  # a folder, not a database file
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert info.value.reason is Reason.STATE_STORE_FAILED


def test_closed_store_refuses_calls(db: Path) -> None:
    s = SQLiteStateStore(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StateStoreError, match="closed"):
        s.list_sources()


def test_install_id_is_stable_across_reopen(db: Path, tmp_path: Path) -> None:
    with SQLiteStateStore(db) as s:
        first = s.install_id()
        assert s.install_id() == first
    assert len(first) == 32
    int(first, 16)
    with SQLiteStateStore(db) as s:
        assert s.install_id() == first
    with SQLiteStateStore(tmp_path / "other.db") as other:
        assert other.install_id() != first


# sources --------------------------------------------------------------------------------------


def test_record_enabled_stores_what_was_provisioned(store: SQLiteStateStore) -> None:
    assert store.get_source("shop") is None
    enable(store)
    src = store.get_source("shop")
    assert src is not None
    assert (src.state, src.enabled, src.slot_name, src.consistent_point, src.timeline) == (
        SourceState.SNAPSHOTTING,
        True,
        "cdcengine_shop",
        0x16B3748,
        1,
    )
    assert src.system_identifier == "7300000000000000001"
    assert src.enabled_at is not None
    assert src.enabled_at.tzinfo is UTC
    assert src.broken is None
    assert src.paused is None
    tables = store.list_tables("shop")
    assert [(t.name, t.mode, t.state) for t in tables] == [
        ("public.events", "append", TableState.PENDING),
        ("public.orders", "consolidated", TableState.PENDING),
    ]
    assert [s.name for s in store.list_sources()] == ["shop"]


def test_invalid_lsn_is_refused(store: SQLiteStateStore) -> None:
    with pytest.raises(StateStoreError, match="not a valid LSN"):
        store.record_enabled(
            "shop",
            management_mode="managed",
            slot_name="s",
            publication_name="p",
            consistent_point=2**64 - 1,
            system_identifier=None,
            timeline=None,
            tables={},
        )


def test_markers_and_state_transitions(store: SQLiteStateStore, clock: FakeClock) -> None:
    enable(store, **{"public.orders": "consolidated"})
    assert store.set_source_state("shop", SourceState.WARNING).state is SourceState.WARNING

    clock.now += 5
    broken = store.set_broken("shop", "slot_missing", "slot was dropped")
    assert broken.state is SourceState.BROKEN
    assert broken.broken is not None
    assert broken.broken.reason == "slot_missing"
    assert broken.broken.at.timestamp() == clock.now
    with pytest.raises(StateStoreError, match="clear that first"):
        store.set_source_state("shop", SourceState.STREAMING)

    # broken wins over paused; the pause is remembered
    both = store.set_paused("shop", "auth_failed", "password rejected")
    assert both.state is SourceState.BROKEN
    assert both.paused is not None
    paused = store.clear_broken("shop")
    assert paused.state is SourceState.PAUSED
    assert paused.broken is None
    assert store.clear_broken("shop") == paused  # no-op when not broken

    # resuming goes back to snapshotting while a table still needs its snapshot ...
    resumed = store.clear_paused("shop")
    assert resumed.state is SourceState.SNAPSHOTTING
    assert resumed.paused is None
    # ... and to streaming once every table streams
    store.set_table_state("shop", "public.orders", TableState.STREAMING)
    store.set_paused("shop", "permission_denied", "no SELECT")
    assert store.clear_paused("shop").state is SourceState.STREAMING

    # a new enable clears markers and resets tables
    store.set_broken("shop", "source_changed", "restored from backup")
    enable(store, **{"public.orders": "consolidated"})
    again = store.get_source("shop")
    assert again is not None
    assert again.broken is None
    assert again.state is SourceState.SNAPSHOTTING
    assert [t.state for t in store.list_tables("shop")] == [TableState.PENDING]


@pytest.mark.parametrize("state", [SourceState.BROKEN, SourceState.PAUSED, SourceState.DISABLED])
def test_marker_states_are_not_set_directly(store: SQLiteStateStore, state: SourceState) -> None:
    enable(store)
    with pytest.raises(StateStoreError):
        store.set_source_state("shop", state)


def test_record_disabled_starts_clean(store: SQLiteStateStore) -> None:
    enable(store)
    store.set_setting("shop", "lag_warning_threshold_mb", 100)
    store.set_broken("shop", "slot_missing", "gone")
    src = store.record_disabled("shop")
    assert (src.state, src.enabled, src.broken, src.paused) == (
        SourceState.DISABLED,
        False,
        None,
        None,
    )
    assert src.slot_name == "cdcengine_shop"  # the row stays
    assert store.list_tables("shop") == []
    assert store.get_settings("shop") == {}
    with pytest.raises(StateStoreError) as info:
        store.set_source_state("shop", SourceState.STREAMING)
    assert info.value.reason is Reason.NOT_ENABLED


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_source_state("nope", SourceState.STREAMING),
        lambda s: s.set_broken("nope", "r", "m"),
        lambda s: s.set_paused("nope", "r", "m"),
        lambda s: s.clear_broken("nope"),
        lambda s: s.clear_paused("nope"),
        lambda s: s.record_disabled("nope"),
        lambda s: s.upsert_table("nope", "public.t", "append"),
    ],
)
def test_unknown_source_is_refused(
    store: SQLiteStateStore, call: Callable[[SQLiteStateStore], object]
) -> None:
    with pytest.raises(StateStoreError) as info:
        call(store)
    assert info.value.reason is Reason.UNKNOWN_SOURCE
    assert store.get_source("nope") is None


# tables ---------------------------------------------------------------------------------------


def test_table_lifecycle(store: SQLiteStateStore) -> None:
    enable(store, **{"public.orders": "consolidated"})
    store.set_table_state("shop", "public.orders", TableState.STREAMING)
    changed = store.upsert_table("shop", "public.orders", "both")
    assert (changed.mode, changed.state) == ("both", TableState.STREAMING)
    assert store.upsert_table("shop", "public.items", "append").state is TableState.PENDING

    stopped = store.set_table_state(
        "shop", "public.orders", TableState.STOPPED, reason="type changed", remedy="resync"
    )
    assert (stopped.state, stopped.reason, stopped.remedy) == (
        TableState.STOPPED,
        "type changed",
        "resync",
    )
    restarted = store.set_table_state("shop", "public.orders", TableState.SNAPSHOTTING)
    assert restarted.reason is None
    assert restarted.remedy is None
    with pytest.raises(StateStoreError, match="needs a reason"):
        store.set_table_state("shop", "public.orders", TableState.STOPPED)
    with pytest.raises(StateStoreError, match="not recorded"):
        store.set_table_state("shop", "public.ghost", TableState.STREAMING)

    store.remove_table("shop", "public.items")
    store.remove_table("shop", "public.items")
    assert [t.name for t in store.list_tables("shop")] == ["public.orders"]


def test_one_store_shared_by_threads(store: SQLiteStateStore) -> None:
    enable(store, **{"public.t0": "append"})
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                store.upsert_table("shop", f"public.t{n}_{i}", "append")
                store.list_tables("shop")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_tables("shop")) == 1 + 8 * 20


# settings -------------------------------------------------------------------------------------


def test_settings_round_trip_types(db: Path) -> None:
    with SQLiteStateStore(db) as s:
        s.set_setting("shop", "auto_drop_slot", False)  # before enable: recorded as disabled
        s.set_setting("shop", "lag_warning_threshold_mb", 1)
        s.set_setting("shop", "lag_critical_threshold_mb", 4096)
        s.set_setting("shop", "lag_critical_threshold_mb", 8192)
        src = s.get_source("shop")
        assert src is not None
        assert src.state is SourceState.DISABLED
    with SQLiteStateStore(db) as s:
        settings = s.get_settings("shop")
        assert settings["auto_drop_slot"].value is False
        assert type(settings["lag_warning_threshold_mb"].value) is int
        assert settings["lag_warning_threshold_mb"].value == 1
        assert settings["lag_critical_threshold_mb"].value == 8192
        assert settings["auto_drop_slot"].updated_at.tzinfo is UTC
        s.clear_setting("shop", "auto_drop_slot")
        s.clear_setting("shop", "auto_drop_slot")
        assert set(s.get_settings("shop")) == {
            "lag_warning_threshold_mb",
            "lag_critical_threshold_mb",
        }
        assert s.get_settings("other") == {}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("slot_name", 1),
        ("auto_drop_slot", 1),
        ("lag_warning_threshold_mb", True),
        ("lag_warning_threshold_mb", "512"),
    ],
)
def test_settings_are_validated(store: SQLiteStateStore, key: str, value: object) -> None:
    with pytest.raises(StateStoreError) as info:
        store.set_setting("shop", key, value)  # type: ignore[arg-type]
    assert info.value.reason is Reason.CONFIG_INVALID
    assert store.get_settings("shop") == {}


# leases within one process (fake clock) -------------------------------------------------------


def test_lease_expiry_renew_and_release(store: SQLiteStateStore, clock: FakeClock) -> None:
    a = store.acquire_lease("shop", holder="a", purpose="daemon", ttl_s=10)
    assert store.get_lease("shop") == a
    with pytest.raises(LeaseHeld, match=r"'daemon' \(host .*, pid \d+\) since"):
        store.acquire_lease("shop", holder="b", purpose="cli", ttl_s=10)

    clock.now += 5
    again = store.acquire_lease("shop", holder="a", purpose="daemon", ttl_s=10)
    assert again.acquired_at == a.acquired_at
    assert again.expires_at > a.expires_at
    clock.now += 5
    renewed = store.renew_lease(again, 10)
    assert renewed.expires_at.timestamp() == clock.now + 10

    clock.now += 10.5  # expired: gone for readers, free for others
    assert store.get_lease("shop") is None
    b = store.acquire_lease("shop", holder="b", purpose="cli", ttl_s=10)
    with pytest.raises(LeaseHeld, match="'cli'"):
        store.renew_lease(renewed, 10)
    store.release_lease(renewed)  # not ours any more: leaves b alone
    assert store.get_lease("shop") == b
    store.release_lease(b)
    store.release_lease(b)
    assert store.get_lease("shop") is None
    with pytest.raises(LeaseHeld, match="lost"):
        store.renew_lease(b, 10)


def test_lease_context_manager(store: SQLiteStateStore) -> None:
    with store.lease("shop", purpose="enable") as held:
        assert held.holder.startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert store.get_lease("shop") == held
    assert store.get_lease("shop") is None

    with pytest.raises(RuntimeError), store.lease("shop", purpose="enable"):
        raise RuntimeError("boom")
    assert store.get_lease("shop") is None


def test_lease_waits_for_release(db: Path) -> None:
    with SQLiteStateStore(db) as s:
        other = s.acquire_lease("shop", holder="daemon", purpose="run", ttl_s=30)
        with pytest.raises(LeaseHeld), s.lease("shop", purpose="cli", wait_s=0.2):
            pass
        timer = threading.Timer(0.3, s.release_lease, args=(other,))
        timer.start()
        start = time.monotonic()
        with s.lease("shop", purpose="cli", wait_s=5) as held:
            assert held.purpose == "cli"
        assert 0.2 < time.monotonic() - start < 5
        timer.join()


# leases across processes ----------------------------------------------------------------------

CHILD = """
import os, sys, time
from cdcengine.errors import LeaseHeld
from cdcengine.state import SQLiteStateStore

store = SQLiteStateStore(sys.argv[1])
lease = None
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "acquire":  # acquire TTL [START_AT]
            if len(args) > 1:
                time.sleep(max(0.0, float(args[1]) - time.time()))
            lease = store.acquire_lease(
                "shop", holder=f"child-{os.getpid()}", purpose="cli enable", ttl_s=float(args[0])
            )
            reply = "ok"
        elif cmd == "release":
            store.release_lease(lease)
            reply = "ok"
        elif cmd == "crash":
            os._exit(3)
    except LeaseHeld as exc:
        reply = "held " + exc.message
    print(reply, flush=True)
"""


class Child:
    def __init__(self, db: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def reply(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, cmd: str) -> str:
        self.send(cmd)
        return self.reply()


@pytest.fixture
def spawn(db: Path) -> Iterator[Callable[[], Child]]:
    SQLiteStateStore(db).close()  # migrate once, before the children race
    children: list[Child] = []

    def make() -> Child:
        children.append(Child(db))
        return children[-1]

    yield make
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait()


def test_lease_is_exclusive_across_processes(db: Path, spawn: Callable[[], Child]) -> None:
    child = spawn()
    assert child.ask("acquire 30") == "ok"
    with SQLiteStateStore(db) as s:
        held = s.get_lease("shop")
        assert held is not None
        assert (held.pid, held.purpose) == (child.pid, "cli enable")
        with pytest.raises(LeaseHeld, match=rf"'cli enable' \(host .*, pid {child.pid}\) since"):
            s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30)

        assert child.ask("release") == "ok"
        mine = s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30)
        reply = child.ask("acquire 30")
        assert reply.startswith("held ")
        assert f"pid {os.getpid()}" in reply
        assert "'daemon'" in reply
        s.release_lease(mine)
        assert child.ask("acquire 30") == "ok"


def test_crashed_holder_expires_and_is_taken_over(db: Path, spawn: Callable[[], Child]) -> None:
    child = spawn()
    assert child.ask("acquire 0.5") == "ok"
    child.send("crash")
    assert child.proc.wait() == 3
    with SQLiteStateStore(db) as s:
        time.sleep(0.6)
        assert s.get_lease("shop") is None
        assert s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30).pid == (
            os.getpid()
        )


def test_a_killed_local_holder_is_taken_over_at_once(db: Path, spawn: Callable[[], Child]) -> None:
    # kill -9 leaves no chance to release; on the same host the dead pid gives it away
    alive, dead = spawn(), spawn()
    assert dead.ask("acquire 300") == "ok"
    assert alive.ask("acquire 300").startswith("held ")
    dead.send("crash")
    assert dead.proc.wait() == 3
    assert alive.ask("acquire 300") == "ok"
    with SQLiteStateStore(db) as s:
        held = s.get_lease("shop")
        assert held is not None and held.pid == alive.pid
        with pytest.raises(LeaseHeld, match=rf"pid {alive.pid}"):
            s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30)


def test_renew_fails_once_another_process_took_over(db: Path, spawn: Callable[[], Child]) -> None:
    child = spawn()
    with SQLiteStateStore(db) as s:
        # a TTL long enough for the child to answer on a loaded machine, then let it lapse
        mine = s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=3.0)
        assert child.ask("acquire 30").startswith("held ")
        time.sleep(max(0.0, mine.expires_at.timestamp() - time.time()) + 0.2)
        assert child.ask("acquire 30") == "ok"
        with pytest.raises(LeaseHeld, match=rf"pid {child.pid}"):
            s.renew_lease(mine, 30)
        s.release_lease(mine)
        held = s.get_lease("shop")
        assert held is not None
        assert held.pid == child.pid


def test_racing_processes_get_exactly_one_lease(db: Path, spawn: Callable[[], Child]) -> None:
    children = [spawn() for _ in range(6)]
    start_at = time.time() + 1.5  # all children started and waiting by then
    for child in children:
        child.send(f"acquire 30 {start_at}")
    replies = [child.reply() for child in children]
    assert sorted(r.split()[0] for r in replies) == ["held"] * 5 + ["ok"]
    winner = children[replies.index("ok")]
    with SQLiteStateStore(db) as s:
        held = s.get_lease("shop")
        assert held is not None
        assert held.pid == winner.pid


# open_state -----------------------------------------------------------------------------------


def test_open_state_sqlite_urls(tmp_path: Path) -> None:
    with open_state("sqlite:///.cdcengine/state.db", base_dir=tmp_path) as s:
        assert isinstance(s, SQLiteStateStore)
        assert Path(s.path) == tmp_path / ".cdcengine" / "state.db"
    assert (tmp_path / ".cdcengine" / "state.db").is_file()
    absolute = tmp_path / "abs" / "deep" / "s.db"
    with open_state(f"sqlite:///{absolute}") as s:
        assert isinstance(s, SQLiteStateStore)
        assert Path(s.path) == absolute
    with open_state("sqlite://:memory:") as s:
        enable(s)
        assert s.get_source("shop") is not None


@pytest.mark.parametrize("url", ["mysql://u:hunter2@h/db", "sqlite://", "sqlite:///", "state.db"])
def test_open_state_refuses_other_urls(url: str) -> None:
    with pytest.raises(StateStoreError, match="sqlite:///") as info:
        open_state(url)
    assert info.value.reason is Reason.CONFIG_INVALID
    assert "hunter2" not in str(info.value)


def test_open_state_postgres_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://cdc:hunter2@db:5432/state"
    monkeypatch.setitem(sys.modules, "cdcengine_postgres.state_store", None)
    with pytest.raises(StateStoreError, match="not available in this version") as info:
        open_state(url)
    assert info.value.reason is Reason.CONFIG_INVALID
    assert "hunter2" not in str(info.value)

    seen: list[str] = []

    def fake_store(u: str) -> str:
        seen.append(u)
        return "pg-store"

    fake = types.ModuleType("cdcengine_postgres.state_store")
    fake.PostgresStateStore = fake_store  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cdcengine_postgres.state_store", fake)
    opened: object = open_state(url)
    assert opened == "pg-store"
    assert seen == [url]

"""The state store contract: behaviour every `StateStore` implementation shares.

Imported by the test module of each implementation (tests/unit/test_state_sqlite.py,
tests/integration/test_state_postgres.py), which provides two fixtures:

* ``open_store`` -- an `OpenStore`: ``open_store(clock=None)`` opens another store object on the
  same backing database (closed after the test);
* ``state_url`` -- the `[engine] state` URL of that database, for child processes.

The tests here use only the public `StateStore` API, a `FakeClock` where time must move, and
real OS processes (``python -c``) for everything that must hold across processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest

import cdcengine.state
from cdcengine.errors import LeaseHeld, Reason, StateStoreError
from cdcengine.state import SourceState, StateStore, TableState
from cdcengine.state.base import (
    STALL_REFRESH_S,
    Stall,
    StuckWork,
    TableOptions,
    ThreadInfo,
    live_stall,
    shown_state,
)

SRC = Path(cdcengine.state.__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class OpenStore(Protocol):
    """Type of the ``open_store`` fixture."""

    def __call__(self, clock: Callable[[], float] | None = None) -> StateStore: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(open_store: OpenStore, clock: FakeClock) -> StateStore:
    return open_store(clock)


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


# sources --------------------------------------------------------------------------------------


def test_record_enabled_stores_what_was_provisioned(store: StateStore) -> None:
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


def test_invalid_lsn_is_refused(store: StateStore) -> None:
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


def test_markers_and_state_transitions(store: StateStore, clock: FakeClock) -> None:
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
def test_marker_states_are_not_set_directly(store: StateStore, state: SourceState) -> None:
    enable(store)
    with pytest.raises(StateStoreError):
        store.set_source_state("shop", state)


def test_record_disabled_starts_clean(store: StateStore) -> None:
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
    store: StateStore, call: Callable[[StateStore], object]
) -> None:
    with pytest.raises(StateStoreError) as info:
        call(store)
    assert info.value.reason is Reason.UNKNOWN_SOURCE
    assert store.get_source("nope") is None


# tables ---------------------------------------------------------------------------------------


def test_table_options_are_kept_until_replaced(store: StateStore) -> None:
    enable(store, **{"public.orders": "consolidated"})
    assert store.list_tables("shop")[0].columns is None
    opts = TableOptions(columns=("id", "total"), primary_key=("id",))
    rec = store.upsert_table("shop", "public.orders", "both", options=opts)
    assert (rec.mode, rec.columns, rec.primary_key) == ("both", ("id", "total"), ("id",))
    # a mode-only upsert (the pipeline's, a resync request) keeps what enable registered
    rec = store.upsert_table("shop", "public.orders", "append")
    assert (rec.mode, rec.columns, rec.primary_key) == ("append", ("id", "total"), ("id",))
    rec = store.upsert_table("shop", "public.orders", "append", options=TableOptions())
    assert (rec.columns, rec.primary_key) == (None, None)


def test_table_lifecycle(store: StateStore) -> None:
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


def test_one_store_shared_by_threads(store: StateStore) -> None:
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


def test_settings_round_trip_types(open_store: OpenStore) -> None:
    with open_store() as s:
        s.set_setting("shop", "auto_drop_slot", False)  # before enable: recorded as disabled
        s.set_setting("shop", "lag_warning_threshold_mb", 1)
        s.set_setting("shop", "lag_critical_threshold_mb", 4096)
        s.set_setting("shop", "lag_critical_threshold_mb", 8192)
        src = s.get_source("shop")
        assert src is not None
        assert src.state is SourceState.DISABLED
    with open_store() as s:
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
def test_settings_are_validated(store: StateStore, key: str, value: object) -> None:
    with pytest.raises(StateStoreError) as info:
        store.set_setting("shop", key, value)  # type: ignore[arg-type]
    assert info.value.reason is Reason.CONFIG_INVALID
    assert store.get_settings("shop") == {}


# leases within one process (fake clock) -------------------------------------------------------


def test_lease_expiry_renew_and_release(store: StateStore, clock: FakeClock) -> None:
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


def test_lease_context_manager(store: StateStore) -> None:
    with store.lease("shop", purpose="enable") as held:
        assert held.holder.startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert store.get_lease("shop") == held
    assert store.get_lease("shop") is None

    with pytest.raises(RuntimeError), store.lease("shop", purpose="enable"):
        raise RuntimeError("boom")
    assert store.get_lease("shop") is None


def test_lease_waits_for_release(open_store: OpenStore) -> None:
    with open_store() as s:
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
import os, socket, sys, time
from cdcengine.errors import LeaseHeld
from cdcengine.state import open_state

store = open_state(sys.argv[1])
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
        elif cmd == "host":  # pretend to be a process on another machine
            socket.gethostname = lambda name=args[0]: name
            reply = "ok"
        elif cmd == "run":  # run KIND: start a run, reply with its id
            reply = str(store.start_run("shop", kind=args[0], holder=f"child-{os.getpid()}"))
        elif cmd == "crash":
            os._exit(3)
    except LeaseHeld as exc:
        reply = "held " + exc.message
    print(reply, flush=True)
"""


class Child:
    def __init__(self, url: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url],
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


Spawn = Callable[[], Child]
"""Type of the ``spawn`` fixture: starts a child process on the store, killed after the test."""


@pytest.fixture
def spawn(state_url: str, open_store: OpenStore) -> Iterator[Spawn]:
    open_store().close()  # migrate once, before the children race
    children: list[Child] = []

    def make() -> Child:
        children.append(Child(state_url))
        return children[-1]

    yield make
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait()


def test_lease_is_exclusive_across_processes(open_store: OpenStore, spawn: Spawn) -> None:
    child = spawn()
    assert child.ask("acquire 30") == "ok"
    with open_store() as s:
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


def test_crashed_holder_expires_and_is_taken_over(open_store: OpenStore, spawn: Spawn) -> None:
    child = spawn()
    assert child.ask("acquire 0.5") == "ok"
    child.send("crash")
    assert child.proc.wait() == 3
    with open_store() as s:
        time.sleep(0.6)
        assert s.get_lease("shop") is None
        assert s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30).pid == (
            os.getpid()
        )


def test_a_killed_local_holder_is_taken_over_at_once(open_store: OpenStore, spawn: Spawn) -> None:
    # kill -9 leaves no chance to release; on the same host the dead pid gives it away
    alive, dead = spawn(), spawn()
    assert dead.ask("acquire 300") == "ok"
    assert alive.ask("acquire 300").startswith("held ")
    dead.send("crash")
    assert dead.proc.wait() == 3
    assert alive.ask("acquire 300") == "ok"
    with open_store() as s:
        held = s.get_lease("shop")
        assert held is not None and held.pid == alive.pid
        with pytest.raises(LeaseHeld, match=rf"pid {alive.pid}"):
            s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30)


def test_renew_fails_once_another_process_took_over(open_store: OpenStore, spawn: Spawn) -> None:
    child = spawn()
    with open_store() as s:
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


def test_racing_processes_get_exactly_one_lease(open_store: OpenStore, spawn: Spawn) -> None:
    children = [spawn() for _ in range(6)]
    start_at = time.time() + 1.5  # all children started and waiting by then
    for child in children:
        child.send(f"acquire 30 {start_at}")
    replies = [child.reply() for child in children]
    assert sorted(r.split()[0] for r in replies) == ["held"] * 5 + ["ok"]
    winner = children[replies.index("ok")]
    with open_store() as s:
        held = s.get_lease("shop")
        assert held is not None
        assert held.pid == winner.pid


def test_two_processes_one_lease_by_release_then_expiry(spawn: Spawn) -> None:
    first, second = spawn(), spawn()
    assert first.ask("acquire 30") == "ok"
    reply = second.ask("acquire 30")
    assert reply.startswith("held ")
    assert f"pid {first.pid}" in reply
    assert first.ask("release") == "ok"
    assert second.ask("acquire 2") == "ok"
    assert first.ask("acquire 30").startswith("held ")
    time.sleep(2.3)  # the second holder is alive but let its lease lapse: expiry decides
    assert first.ask("acquire 30") == "ok"
    assert second.ask("acquire 30").startswith("held ")


def test_a_dead_holder_on_another_host_is_not_taken_over_early(
    open_store: OpenStore, spawn: Spawn
) -> None:
    # the pid shortcut proves nothing about a process on another machine: wait for expiry
    remote = spawn()
    assert remote.ask("host elsewhere.example") == "ok"
    assert remote.ask("acquire 3") == "ok"
    remote.send("crash")
    assert remote.proc.wait() == 3
    with open_store() as s:
        held = s.get_lease("shop")
        assert held is not None
        assert (held.host, held.pid) == ("elsewhere.example", remote.pid)
        with pytest.raises(LeaseHeld, match=r"host elsewhere\.example"):
            s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30)
        time.sleep(max(0.0, held.expires_at.timestamp() - time.time()) + 0.2)
        assert s.acquire_lease("shop", holder="parent", purpose="daemon", ttl_s=30).pid == (
            os.getpid()
        )


# stalls (the daemon watchdog's record) --------------------------------------------------------


def _stall(pid: int | None = None, **kw: object) -> Stall:
    fields: dict[str, object] = dict(
        since=datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC),
        at=datetime(2026, 1, 1, 12, 5, 0, tzinfo=UTC),
        message="nothing became durable for 300 s",
        work=(StuckWork(lane="stream", what="1 batch(es) at the Delta writer", waited_s=300.0),),
        threads=(ThreadInfo(name="writer-shop", doing="_write (writer.py:1)",
                            stack=("a.py:1 in run", "writer.py:1 in _write")),),
        host=socket.gethostname(), pid=os.getpid() if pid is None else pid)
    fields.update(kw)
    return Stall(**fields)  # type: ignore[arg-type]


def test_a_stall_is_shown_over_the_stored_state_and_cleared(store: StateStore) -> None:
    enable(store)
    store.set_source_state("shop", SourceState.STREAMING)
    stall = _stall()
    rec = store.set_stalled("shop", stall)
    assert rec.stalled == stall  # every field survives the round trip
    assert rec.state is SourceState.STREAMING  # the stored state is left alone
    assert shown_state(rec) is SourceState.STALLED and live_stall(rec) == stall
    # the lag policy may still move the stored state; the stall stays shown over it
    rec = store.set_source_state("shop", SourceState.WARNING)
    assert rec.stalled == stall and shown_state(rec) is SourceState.STALLED
    rec = store.clear_stalled("shop")
    assert rec is not None and rec.stalled is None
    assert shown_state(rec) is SourceState.WARNING
    assert store.clear_stalled("shop") == rec  # idempotent
    assert store.clear_stalled("nobody") is None


def test_a_stall_never_hides_a_broken_source_nor_outlives_its_daemon(store: StateStore) -> None:
    enable(store)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    rec = store.set_stalled("shop", _stall(pid=int(gone.stdout)))
    assert rec.stalled is not None  # recorded, but its daemon is gone: not shown
    assert live_stall(rec) is None and shown_state(rec) is SourceState.SNAPSHOTTING
    # a daemon on another host renews its record while the stall lasts; an old one is stale
    now = datetime.now(UTC)
    rec = store.set_stalled("shop", _stall(host="elsewhere.example", pid=1, at=now))
    assert shown_state(rec) is SourceState.STALLED
    rec = store.set_stalled("shop", _stall(host="elsewhere.example", pid=1,
                                           at=now - timedelta(seconds=STALL_REFRESH_S * 4)))
    assert shown_state(rec) is SourceState.SNAPSHOTTING
    rec = store.set_stalled("shop", _stall())
    assert shown_state(rec) is SourceState.STALLED
    rec = store.set_broken("shop", "slot_missing", "the slot is gone")
    assert shown_state(rec) is SourceState.BROKEN and live_stall(rec) is None
    # enable and disable start clean
    store.record_disabled("shop")
    assert store.get_source("shop").stalled is None  # type: ignore[union-attr]


__all__ = [  # what the implementations' test modules import: the tests and their fixtures
    "Child",
    "FakeClock",
    "OpenStore",
    "Spawn",
    "clock",
    "enable",
    "spawn",
    "store",
    *sorted(name for name in globals() if name.startswith("test_")),
]

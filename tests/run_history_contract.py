"""Run history (`start_run`, `record_batch`, `end_run`, `list_runs`, `list_batches`): behaviour
every `StateStore` implementation shares. Imported by each implementation's test module, which
provides the ``open_store`` and ``state_url`` fixtures (see tests/state_contract.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
from state_contract import FakeClock, OpenStore, Spawn

from cdcengine.errors import Reason, StateStoreError
from cdcengine.state import RunStatus, StateStore, runs


def batch(store: StateStore, run_id: int, lsn: int, **rows: int) -> None:
    store.record_batch(run_id, first_lsn=lsn, last_lsn=lsn + 10, rows=rows, duration_s=0.25)


def test_runs_keep_totals_lsn_range_and_order(store: StateStore, clock: FakeClock) -> None:
    assert store.list_runs("shop") == []
    run = store.start_run("shop", kind="stream", holder="daemon-1")
    clock.now += 1
    store.record_batch(
        run,
        first_lsn=200,
        last_lsn=260,
        rows={"public.orders": 3, "public.items": 7},
        duration_s=0.5,
        commit_latency_s=0.8,
    )
    clock.now += 1
    # a batch that knows only where it ended still widens the range from there
    store.record_batch(run, first_lsn=None, last_lsn=300, rows={"public.orders": 2}, duration_s=1)
    clock.now += 1
    store.record_batch(run, first_lsn=100, last_lsn=150, rows={"public.orders": 1}, duration_s=0)

    (rec,) = store.list_runs("shop")
    assert (rec.id, rec.source, rec.kind, rec.status) == (run, "shop", "stream", RunStatus.RUNNING)
    assert rec.rows == {"public.items": 7, "public.orders": 6}
    assert (rec.batches, rec.first_lsn, rec.last_lsn) == (3, 100, 300)
    assert (rec.host, rec.pid, rec.holder) == (socket.gethostname(), os.getpid(), "daemon-1")
    assert rec.started_at.timestamp() == 1_700_000_000.0
    assert rec.last_batch_at is not None and rec.last_batch_at.timestamp() == clock.now
    assert rec.ended_at is None
    assert rec.duration_s == 3.0  # running: up to now
    assert (rec.error_reason, rec.error_message) == (None, None)

    batches = store.list_batches(run)
    assert [(b.first_lsn, b.last_lsn) for b in batches] == [(100, 150), (None, 300), (200, 260)]
    newest, _, oldest = batches
    assert oldest.rows == {"public.items": 7, "public.orders": 3}
    assert (oldest.duration_s, oldest.commit_latency_s) == (0.5, 0.8)
    assert newest.commit_latency_s is None
    assert newest.at.timestamp() == clock.now
    assert newest.run_id == run
    assert [b.last_lsn for b in store.list_batches(run, limit=1)] == [150]

    clock.now += 2
    store.end_run(run)
    (done,) = store.list_runs("shop")
    assert done.status is RunStatus.OK
    assert done.ended_at is not None and done.ended_at.timestamp() == clock.now
    assert done.duration_s == 5.0


def test_runs_are_listed_newest_first_per_source(store: StateStore, clock: FakeClock) -> None:
    ids = []
    for kind in ("snapshot", "stream", "resync"):
        ids.append(store.start_run("shop", kind=kind, holder="h"))
        clock.now += 1
    other = store.start_run("crm", kind="stream", holder="h")
    assert len({*ids, other}) == 4
    assert [r.id for r in store.list_runs("shop")] == ids[::-1]
    assert [r.kind for r in store.list_runs("shop", limit=2)] == ["resync", "stream"]
    assert [r.id for r in store.list_runs("crm")] == [other]
    batch(store, other, 1, **{"public.t": 1})
    assert store.list_runs("shop")[0].rows == {}
    assert store.list_batches(ids[0]) == []


def test_a_failed_run_keeps_its_error(store: StateStore, clock: FakeClock) -> None:
    run = store.start_run("shop", kind="repair", holder="cli")
    clock.now += 4
    store.end_run(run, error_reason="auth_failed", error_message="password rejected")
    clock.now += 10
    store.end_run(run)  # the first end wins
    (rec,) = store.list_runs("shop")
    assert (rec.status, rec.error_reason, rec.error_message) == (
        RunStatus.FAILED,
        "auth_failed",
        "password rejected",
    )
    assert rec.duration_s == 4.0
    long = store.start_run("shop", kind="repair", holder="cli")
    store.end_run(long, error_message="x" * 10_000)
    message = store.list_runs("shop")[0].error_message
    assert message is not None and len(message) == runs.MAX_ERROR_MESSAGE_CHARS


def test_history_calls_on_unknown_runs_are_no_ops(store: StateStore) -> None:
    batch(store, 12345, 1, **{"public.t": 1})
    store.end_run(12345, error_reason="x")
    assert store.list_batches(12345) == []
    assert store.list_runs("nope") == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s, r: s.record_batch(r, first_lsn=None, last_lsn=-1, rows={}, duration_s=0),
        lambda s, r: s.record_batch(r, first_lsn=2**64, last_lsn=1, rows={}, duration_s=0),
        lambda s, r: s.record_batch(r, first_lsn=9, last_lsn=1, rows={}, duration_s=0),
        lambda s, r: s.record_batch(r, first_lsn=1, last_lsn=2, rows={"t": -1}, duration_s=0),
        lambda s, r: s.record_batch(r, first_lsn=1, last_lsn=2, rows={"t": True}, duration_s=0),
        lambda s, r: s.record_batch(r, first_lsn=1, last_lsn=2, rows={}, duration_s=-1),
        lambda s, r: s.record_batch(
            r, first_lsn=1, last_lsn=2, rows={}, duration_s=0, commit_latency_s=float("nan")
        ),
        lambda s, r: s.list_runs("shop", limit=0),
        lambda s, r: s.list_batches(r, limit=-5),
        lambda s, r: s.start_run("shop", kind="", holder="h"),
    ],
)
def test_impossible_history_is_refused(
    store: StateStore, call: Callable[[StateStore, int], object]
) -> None:
    run = store.start_run("shop", kind="stream", holder="h")
    with pytest.raises(StateStoreError) as info:
        call(store, run)
    assert info.value.reason is Reason.CONFIG_INVALID
    assert info.value.retryable is False
    assert store.list_batches(run) == []


def test_batch_retention_keeps_run_totals(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "MAX_BATCHES_PER_SOURCE", 5)
    first = store.start_run("shop", kind="stream", holder="h")
    for i in range(4):
        batch(store, first, 100 * i, **{"public.a": 1})
    second = store.start_run("shop", kind="stream", holder="h")
    for i in range(4):
        batch(store, second, 1000 + 100 * i, **{"public.a": 2, "public.b": 1})
    other = store.start_run("crm", kind="stream", holder="h")
    batch(store, other, 5, **{"public.c": 1})

    # 8 batches of shop, 5 kept: the newest, across both runs; crm counts on its own
    assert [b.first_lsn for b in store.list_batches(second)] == [1300, 1200, 1100, 1000]
    assert [b.first_lsn for b in store.list_batches(first)] == [300]
    assert len(store.list_batches(other)) == 1
    totals = {r.id: (r.batches, r.rows, r.first_lsn, r.last_lsn) for r in store.list_runs("shop")}
    assert totals == {
        first: (4, {"public.a": 4}, 0, 310),
        second: (4, {"public.a": 8, "public.b": 4}, 1000, 1310),
    }


def test_run_retention_counts_per_kind_and_spares_running_runs(
    store: StateStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "MAX_RUNS_PER_KIND", 3)
    stream = store.start_run("shop", kind="stream", holder="daemon")  # runs all along
    batch(store, stream, 1, **{"public.a": 1})
    ended = store.start_run("shop", kind="stream", holder="daemon")
    batch(store, ended, 2, **{"public.a": 1})
    store.end_run(ended)
    sweeps: list[int] = []
    for _ in range(6):  # a cron job must not flood the streams out of the history
        clock.now += 60
        sweeps.append(store.start_run("shop", kind="sweep", holder=f"cron-{len(sweeps)}"))
        store.end_run(sweeps[-1])
    listed = store.list_runs("shop", limit=50)
    assert [r.id for r in listed] == [*sweeps[::-1][:3], ended, stream]

    for _ in range(3):
        store.end_run(store.start_run("shop", kind="stream", holder="daemon"))
    kept = {r.id: r for r in store.list_runs("shop", limit=50) if r.kind == "stream"}
    assert ended not in kept  # the oldest ended stream run went, with its batches
    assert store.list_batches(ended) == []
    assert kept[stream].status is RunStatus.RUNNING  # still running: spared beyond the limit
    assert kept[stream].rows == {"public.a": 1}
    assert len(kept) == 4


def test_an_unended_run_is_interrupted_by_a_successor_or_silence(
    store: StateStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a run on another host: its pid says nothing, so the other rules decide
    monkeypatch.setattr(socket, "gethostname", lambda: "elsewhere.example")
    remote = store.start_run("shop", kind="stream", holder="remote-daemon")
    monkeypatch.undo()
    assert store.list_runs("shop")[0].status is RunStatus.RUNNING

    clock.now += runs.STALE_RUN_S - 10
    batch(store, remote, 1, **{"public.a": 1})  # a sign of life
    clock.now += runs.STALE_RUN_S - 10
    assert store.list_runs("shop")[0].status is RunStatus.RUNNING
    clock.now += 20
    silent = store.list_runs("shop")[0]
    assert silent.status is RunStatus.INTERRUPTED
    assert silent.duration_s == runs.STALE_RUN_S - 10  # until its last batch

    # an idle daemon that still holds the source's lease is running, however long it is silent
    lease = store.acquire_lease("shop", holder="remote-daemon", purpose="daemon", ttl_s=60)
    assert store.list_runs("shop")[0].status is RunStatus.RUNNING
    store.release_lease(lease)

    # a newer run of the same kind by another holder means the old one is dead
    clock.now = 1_700_000_000.0 + 10
    restarted = store.start_run("shop", kind="stream", holder="daemon-2")
    same_holder = store.start_run("shop", kind="snapshot", holder="daemon-2")
    statuses = {r.id: r.status for r in store.list_runs("shop")}
    assert statuses == {
        same_holder: RunStatus.RUNNING,
        restarted: RunStatus.RUNNING,
        remote: RunStatus.INTERRUPTED,
    }


def test_a_killed_local_run_is_interrupted(
    open_store: OpenStore, spawn: Spawn
) -> None:
    child = spawn()
    run = int(child.ask("run stream"))
    with open_store() as s:
        (rec,) = s.list_runs("shop")
        assert (rec.id, rec.pid, rec.status) == (run, child.pid, RunStatus.RUNNING)
        child.send("crash")
        assert child.proc.wait() == 3
        (rec,) = s.list_runs("shop")
        assert rec.status is RunStatus.INTERRUPTED
        assert rec.ended_at is None


def test_run_ids_are_unique_across_processes(
    open_store: OpenStore, spawn: Spawn
) -> None:
    children = [spawn() for _ in range(4)]
    for child in children:
        child.send("run sweep")
    ids = [int(child.reply()) for child in children]
    with open_store() as s:
        ids.append(s.start_run("shop", kind="sweep", holder="parent"))
        assert sorted(r.id for r in s.list_runs("shop")) == sorted(ids)
    assert len(set(ids)) == 5


__all__ = sorted(name for name in globals() if name.startswith("test_"))

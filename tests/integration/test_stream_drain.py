"""`ReplicationStream.read_payloads`: the reading thread's drain of many frames per call.

What the change session relies on: the same payloads in the same order as `read` gives, at
most `limit` per call, nothing lost between calls; a keepalive met while draining reaches
`keepalive_lsn` only on the next call (never ahead of frames not yet processed); a stream the
server ends after frames arrived hands those frames out first, then raises.
"""

from __future__ import annotations

import threading
import time

import pytest
from pgutil import ScratchDatabase, unique_name

from cdcengine.errors import CDCError, Reason
from cdcengine_postgres.replication.stream import ReplicationStream


def _setup(db: ScratchDatabase) -> tuple[str, str]:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.execute("CREATE PUBLICATION pub FOR TABLE t")
    slot = unique_name("s")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    return slot, "pub"


def _copy_slot(db: ScratchDatabase, slot: str) -> str:
    copy = unique_name("c")
    db.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", [slot, copy])
    return copy


def _load(db: ScratchDatabase, txns: int, rows: int) -> None:
    for t in range(txns):
        db.execute("INSERT INTO t SELECT g, repeat('x', g %% 50)"
                   " FROM generate_series(%s::int, %s::int) g", [t * rows + 1, (t + 1) * rows])


def _drain_all(stream: ReplicationStream, commits: int, limit: int) -> list[list[bytes]]:
    calls: list[list[bytes]] = []
    deadline = time.monotonic() + 30
    while sum(p[:1] == b"C" for call in calls for p in call) < commits:
        assert time.monotonic() < deadline, "timed out"
        got = stream.read_payloads(1.0, limit)
        assert len(got) <= limit
        if got:
            calls.append(got)
    return calls


def test_read_payloads_gives_what_read_gives_in_bursts(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    copy = _copy_slot(db, slot)
    _load(db, 5, 400)
    expected: list[bytes] = []
    with ReplicationStream(db.dsn, slot=copy, publications=[pub]) as stream:
        while sum(p[:1] == b"C" for p in expected) < 5:
            frame = stream.read(5.0)
            assert frame is not None
            expected.append(frame.payload)
    with ReplicationStream(db.dsn, slot=slot, publications=[pub]) as stream:
        calls = _drain_all(stream, 5, limit=300)
        assert stream.received_lsn > 0
        assert stream.read_payloads(0.2, 300) == []  # nothing more: an empty list in time
    got = [p for call in calls for p in call]
    assert got == expected
    assert len(got) == 5 * 402 + 1  # Relation, then Begin, 400 Inserts, Commit per transaction
    assert max(map(len, calls)) > 1  # frames were drained in bursts
    assert all(isinstance(p, bytes) for p in got)


def test_keepalive_position_never_runs_ahead_of_returned_frames(db: ScratchDatabase) -> None:
    """A keepalive's position is past every transaction sent before it. Met behind frames of
    a drain, it must not show in `keepalive_lsn` until the caller had those frames: after each
    call, every transaction whose Commit that call returned ends after `keepalive_lsn`."""
    slot, pub = _setup(db)
    with ReplicationStream(db.dsn, slot=slot, publications=[pub]) as stream:
        deadline = time.monotonic() + 30
        while stream.keepalive_lsn == 0:  # idle: keepalives come (and count) at once
            assert time.monotonic() < deadline
            assert stream.read_payloads(0.5, 100) == []
        loader = threading.Thread(target=_load, args=(db, 40, 5))
        loader.start()
        commits = 0
        try:
            while commits < 40:
                assert time.monotonic() < deadline, "timed out"
                got = stream.read_payloads(0.5, 4)
                ends = [int.from_bytes(p[10:18], "big") for p in got if p[:1] == b"C"]
                assert all(end > stream.keepalive_lsn for end in ends)
                commits += len(ends)
        finally:
            loader.join()
        # idle again: the deferred position arrives with the next calls
        last = stream.received_lsn
        while stream.keepalive_lsn < last:
            assert time.monotonic() < deadline, "keepalive position did not advance"
            assert stream.read_payloads(0.5, 100) == []


def test_frames_before_the_end_of_the_stream_come_first(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    with ReplicationStream(db.dsn, slot=slot, publications=[pub]) as stream:
        assert stream.read_payloads(0.2, 10) == []
        _load(db, 3, 50)
        time.sleep(1.0)  # let the walsender send everything into the socket
        db.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                   " WHERE slot_name = %s", [slot])
        time.sleep(0.5)
        got: list[bytes] = []

        def drain() -> None:
            for _ in range(100):
                got.extend(stream.read_payloads(1.0, 10_000))

        with pytest.raises(CDCError) as info:
            drain()
        assert info.value.reason is Reason.CONNECTION_FAILED and info.value.retryable
        assert sum(p[:1] == b"C" for p in got) == 3  # every frame sent came out first
        with pytest.raises(CDCError):  # and the stream stays ended
            stream.read_payloads(0.1, 10)

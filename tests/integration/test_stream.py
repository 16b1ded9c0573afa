"""`cdcengine_postgres.replication.stream.ReplicationStream` against a real server (fixture `db`).

What the core relies on: every published transaction arrives as raw pgoutput frames in order; a
flush LSN it reports becomes the slot's confirmed_flush_lsn exactly; an idle stream stays alive
(keepalives answered, research pitfall 3) and exposes the keepalive position (pitfall 6); a read
that waits does not hold the GIL (pitfall 2); a restart resumes after the confirmed position;
publication names are quoted (upper case survives); and each way the stream can fail is a
`CDCError` with the reason the core acts on.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from pgutil import MakeCluster, ScratchDatabase, unique_name

from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import format_lsn, parse_lsn
from cdcengine_postgres.replication.frames import XLogData, build_start_command
from cdcengine_postgres.replication.stream import ReplicationStream

# pgoutput v1 Insert: 'I' | relid int32 | 'N' | ncols int16 | per column: kind byte, len int32,
# text. v2 inside a streamed transaction adds an xid int32 after the type byte.
_INSERT_HEAD = struct.Struct(">IcHcI")  # relid, 'N', ncols, first column kind, first column len


def _with_options(dsn: str, options: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + "options=" + quote(options, safe="")


def _setup(
    db: ScratchDatabase, *, publication: str = "pub1", table: str = "t"
) -> tuple[str, str]:
    """A table, a publication for it and a pgoutput slot; returns (slot, publication)."""
    db.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v text)')
    db.execute(f'CREATE PUBLICATION "{publication}" FOR TABLE "{table}"')
    slot = unique_name("s")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    return slot, publication


def _insert(db: ScratchDatabase, ids: range, table: str = "t") -> None:
    """One transaction inserting `ids`."""
    db.execute(
        f'INSERT INTO "{table}" SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g',
        [ids.start, ids.stop - 1],
    )


def _stream(
    db: ScratchDatabase, slot: str, pubs: list[str], *, dsn: str | None = None, **kw: Any
) -> ReplicationStream:
    return ReplicationStream(dsn or db.dsn, slot=slot, publications=pubs, **kw)


def _read_until(
    stream: ReplicationStream, done: Callable[[list[XLogData]], bool], timeout_s: float = 10.0
) -> list[XLogData]:
    frames: list[XLogData] = []
    deadline = time.monotonic() + timeout_s
    while not done(frames):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {[f.payload[:1] for f in frames]}"
        msg = stream.read(min(left, 1.0))
        if msg is not None:
            frames.append(msg)
    return frames


def _commits(frames: list[XLogData], kind: bytes = b"C") -> list[bytes]:
    return [f.payload for f in frames if f.payload[:1] == kind]


def _commit_end(payload: bytes) -> int:
    """Commit: 'C' | flags int8 | commit_lsn int64 | end_lsn int64 | ts int64."""
    (end,) = struct.unpack_from(">Q", payload, 10)
    return int(end)


def _insert_id(payload: bytes, offset: int = 1) -> int:
    _, new, _, kind, length = _INSERT_HEAD.unpack_from(payload, offset)
    assert new == b"N" and kind == b"t"
    start = offset + _INSERT_HEAD.size
    return int(payload[start : start + length])


def _inserted_ids(frames: list[XLogData]) -> list[int]:
    return [_insert_id(f.payload) for f in frames if f.payload[:1] == b"I"]


def _confirmed_flush(db: ScratchDatabase, slot: str) -> int:
    rows = db.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", [slot]
    )
    return parse_lsn(rows[0][0])


def _wait_inactive(db: ScratchDatabase, slot: str, timeout_s: float = 5.0) -> None:
    """Pitfall 13: the slot stays active for a few ms after the walsender's client left."""
    deadline = time.monotonic() + timeout_s
    while db.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [slot])[0][0]:
        assert time.monotonic() < deadline, "slot still active"
        time.sleep(0.02)


# ---------------------------------------------------------------------- command text


def test_start_command_quotes_publications_and_validates() -> None:
    cmd = build_start_command(
        "cdc_1", ["PubUpper", "odd name, with comma"], (0x16 << 32) | 0xB374D848,
        proto_version=2, streaming=True, messages=True,
    )
    assert cmd == (
        'START_REPLICATION SLOT "cdc_1" LOGICAL 16/B374D848 (proto_version \'2\', '
        "publication_names '\"PubUpper\",\"odd name, with comma\"', streaming 'on', "
        "messages 'true')"
    )
    ok: dict[str, Any] = {"proto_version": 1, "streaming": False, "messages": False}
    for slot in ("Upper", "a-b", "", "x" * 64, 'a"b', "a b"):
        with pytest.raises(ValueError, match="slot name"):
            build_start_command(slot, ["p"], 0, **ok)
    for pub in ('a"b', "a'b", "", "tab\there", "p" * 64):
        with pytest.raises(ValueError, match="publication name"):
            build_start_command("s", [pub], 0, **ok)
    with pytest.raises(ValueError, match="at least one"):
        build_start_command("s", [], 0, **ok)
    with pytest.raises(ValueError, match="list of names"):
        build_start_command("s", "pub", 0, **ok)
    with pytest.raises(ValueError, match="LSN"):
        build_start_command("s", ["p"], -1, **ok)
    with pytest.raises(ValueError, match="proto_version"):
        build_start_command("s", ["p"], 0, proto_version=3, streaming=False, messages=False)
    with pytest.raises(ValueError, match="streaming"):
        build_start_command("s", ["p"], 0, proto_version=1, streaming=True, messages=False)
    # The constructor validates before any I/O (this dsn would not even parse).
    with pytest.raises(ValueError, match="publication name"):
        ReplicationStream("not a dsn %zz", slot="s", publications=["x'"])
    with pytest.raises(ValueError, match="status_interval_s"):
        ReplicationStream("", slot="s", publications=["p"], status_interval_s=0)
    # proto 2 streams by default; streaming can be switched off.
    assert ReplicationStream("", slot="s", publications=["p"], proto_version=2).streaming
    assert "streaming" not in ReplicationStream(
        "", slot="s", publications=["p"], proto_version=2, streaming=False
    ).command


# ---------------------------------------------------------------------- reading and feedback


def test_reads_every_transaction_and_flush_becomes_confirmed_flush(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    _insert(db, range(1, 4))
    _insert(db, range(4, 6))
    _insert(db, range(6, 7))
    with _stream(db, slot, [pub]) as stream:
        frames = _read_until(stream, lambda fr: len(_commits(fr)) == 3)
        kinds = [f.payload[:1] for f in frames]
        assert kinds.count(b"B") == 3 and kinds.count(b"R") == 1
        assert _inserted_ids(frames) == [1, 2, 3, 4, 5, 6]
        assert all(isinstance(f.payload, bytes) for f in frames)
        # Pitfall 4: Relation frames carry 0/0 header LSNs; data frames do not.
        assert next(f for f in frames if f.payload[:1] == b"R").wal_end == 0
        assert stream.received_lsn >= max(f.wal_end for f in frames) > 0

        end = _commit_end(_commits(frames)[-1])
        before = _confirmed_flush(db, slot)
        assert before < end
        stream.set_flush_lsn(end)
        stream.set_flush_lsn(end - 1)  # monotonic: never moves backwards
        assert stream.flush_lsn == end
        assert stream.send_status(force=True)
        deadline = time.monotonic() + 5
        while _confirmed_flush(db, slot) != end:
            assert time.monotonic() < deadline, (
                f"confirmed_flush_lsn {format_lsn(_confirmed_flush(db, slot))} "
                f"!= {format_lsn(end)}"
            )
            time.sleep(0.02)
        assert stream.last_status_at is not None
        assert not stream.send_status(force=False)  # the periodic one is not due yet
        with pytest.raises(ValueError, match="LSN"):
            stream.set_flush_lsn(-5)


def test_resume_from_flushed_lsn_resends_only_later_transactions(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    for ids in (range(1, 3), range(3, 5), range(5, 7)):
        _insert(db, ids)
    with _stream(db, slot, [pub]) as stream:
        frames = _read_until(stream, lambda fr: len(_commits(fr)) == 3)
        second_end = _commit_end(_commits(frames)[1])
        stream.set_flush_lsn(second_end)  # only the first two are "durable"
        stream.send_status()
    _insert(db, range(7, 8))
    _wait_inactive(db, slot)
    assert _confirmed_flush(db, slot) == second_end

    # From the slot's position (0/0 means "wherever the slot is")...
    with _stream(db, slot, [pub]) as stream:
        frames = _read_until(stream, lambda fr: len(_commits(fr)) == 2)
        assert _inserted_ids(frames) == [5, 6, 7]
        assert stream.read(0.3) is None  # nothing else
    _wait_inactive(db, slot)
    # ...and from an explicit start LSN: the same transactions, nothing earlier.
    with _stream(db, slot, [pub], start_lsn=second_end) as stream:
        assert stream.command.split()[4] == format_lsn(second_end)
        frames = _read_until(stream, lambda fr: len(_commits(fr)) == 2)
        assert _inserted_ids(frames) == [5, 6, 7]


def test_idle_stream_gets_keepalives_and_answers_them(db: ScratchDatabase) -> None:
    """wal_sender_timeout=2s for this walsender only (it is a user-settable GUC, and a
    replication connection accepts startup options): the server asks for a reply after 1 s
    of silence and would drop us after 2 s. The periodic status interval is 60 s, so only the
    answers to reply-requested keepalives keep the stream alive for 5 s."""
    slot, pub = _setup(db)
    dsn = _with_options(db.dsn, "-c wal_sender_timeout=2s")
    with psycopg.connect(dsn, replication="database", autocommit=True) as conn:
        row = conn.execute("SHOW wal_sender_timeout").fetchone()
        assert row is not None and row[0] == "2s"

    with _stream(db, slot, [pub], dsn=dsn, status_interval_s=60) as stream:
        stop = threading.Event()
        t0 = time.monotonic()
        timer = threading.Timer(5.0, stop.set)
        timer.start()
        try:
            got = list(stream.messages(stop, poll_s=0.5))  # raises if the server drops us
        finally:
            timer.cancel()
        assert got == []
        assert time.monotonic() - t0 >= 4.9
        assert stream.keepalive_lsn > 0
        # At least one answer went out although the periodic status was never due.
        assert stream.last_status_at is not None and stream.last_status_at > t0 + 0.5
        assert db.execute(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'cdcengine'"
        )[0][0] == 1
        # Unpublished traffic moves the keepalive position (what an idle source confirms).
        before = stream.keepalive_lsn
        db.execute("CREATE TABLE other (id int)")
        db.execute("INSERT INTO other SELECT generate_series(1, 100)")
        target = parse_lsn(db.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])
        deadline = time.monotonic() + 10
        while stream.keepalive_lsn < target:
            assert time.monotonic() < deadline, "keepalive position did not advance"
            assert stream.read(0.5) is None  # nothing published happened
        assert stream.keepalive_lsn > before


def test_statuses_forced_often_do_not_keep_an_idle_server_from_being_asked(
        db: ScratchDatabase) -> None:
    """The pipeline sends a status every few seconds on its own; the periodic one (which asks
    an idle server to answer) must still go out, or an idle stream hears nothing and its
    silence timeout ends it although the server is fine."""
    slot, pub = _setup(db)
    with _stream(db, slot, [pub], status_interval_s=1.5, silence_timeout_s=4) as stream:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 7:
            assert stream.read(0.5) is None  # raises when the silence timeout ends it
            stream.send_status()  # more often than the status interval


def test_waiting_read_does_not_hold_the_gil(db: ScratchDatabase) -> None:
    """Pitfall 2: with psycopg-binary a blocking PQgetCopyData keeps the GIL; a second thread
    must make progress while `read` waits for data that does not come."""
    slot, pub = _setup(db)
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    with _stream(db, slot, [pub]) as stream:
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            time.sleep(0.05)
            start_count = counter[0]
            t0 = time.monotonic()
            assert stream.read(2.0) is None
            elapsed = time.monotonic() - t0
            progress = counter[0] - start_count
        finally:
            stop.set()
            spinner.join()
    assert 1.9 <= elapsed < 3.0
    assert progress > 500_000, f"the spinner thread only ran {progress} times in {elapsed:.1f}s"


def test_status_can_be_sent_from_another_thread_while_reading(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    _insert(db, range(1, 2))
    with _stream(db, slot, [pub]) as stream:
        end = _commit_end(_commits(_read_until(stream, lambda fr: bool(_commits(fr))))[0])
        errors: list[BaseException] = []

        def ack() -> None:
            try:
                time.sleep(0.2)
                stream.set_flush_lsn(end)
                stream.send_status()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        worker = threading.Thread(target=ack)
        worker.start()
        assert stream.read(1.0) is None  # the main thread is waiting meanwhile
        worker.join()
        assert errors == []
        assert _confirmed_flush(db, slot) == end


# ---------------------------------------------------------------------- options


def test_upper_case_and_unusual_publication_names(db: ScratchDatabase) -> None:
    """Unquoted, publication_names would be lower-cased by the walsender (no such
    publication); quoted, upper case, spaces and commas all work."""
    slot, upper = _setup(db, publication="PubUpper", table="Orders")
    db.execute('CREATE TABLE "t2" (id int PRIMARY KEY, v text)')
    odd = "odd name, with comma"
    db.execute(f'CREATE PUBLICATION "{odd}" FOR TABLE "t2"')
    _insert(db, range(1, 3), table="Orders")
    _insert(db, range(10, 11), table="t2")
    with _stream(db, slot, [upper, odd]) as stream:
        frames = _read_until(stream, lambda fr: len(_commits(fr)) == 2)
    assert _inserted_ids(frames) == [1, 2, 10]
    relations = [f.payload for f in frames if f.payload[:1] == b"R"]
    assert any(b"Orders\x00" in r for r in relations)


def test_proto_v2_streams_a_large_transaction_in_segments(db: ScratchDatabase) -> None:
    """logical_decoding_work_mem=64kB on the walsender forces a 5000-row transaction to be
    streamed before it commits: Stream Start/Stop segments, then Stream Commit."""
    slot, pub = _setup(db)
    _insert(db, range(1, 5001))
    dsn = _with_options(db.dsn, "-c logical_decoding_work_mem=64kB")
    with _stream(db, slot, [pub], dsn=dsn, proto_version=2) as stream:
        assert "streaming 'on'" in stream.command
        frames = _read_until(stream, lambda fr: bool(_commits(fr, b"c")), timeout_s=30)
    kinds = [f.payload[:1] for f in frames]
    assert kinds.count(b"S") >= 2 and kinds.count(b"S") == kinds.count(b"E")
    assert kinds[-1] == b"c" and b"C" not in kinds and b"B" not in kinds
    # Inside a streamed segment every change carries the xid (4 bytes) after its type byte.
    ids = [_insert_id(f.payload, offset=5) for f in frames if f.payload[:1] == b"I"]
    assert ids == list(range(1, 5001))


def test_messages_option_delivers_logical_messages(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    db.execute("SELECT pg_logical_emit_message(true, 'cdc', 'hello')")
    _insert(db, range(1, 2))
    with _stream(db, slot, [pub], messages=True) as stream:
        assert "messages 'true'" in stream.command
        frames = _read_until(stream, lambda fr: b"I" in [f.payload[:1] for f in fr])
    msgs = [f.payload for f in frames if f.payload[:1] == b"M"]
    assert len(msgs) == 1 and msgs[0].endswith(b"cdc\x00\x00\x00\x00\x05hello")


# ---------------------------------------------------------------------- failures


def test_terminated_walsender_then_dropped_slot(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    stream = _stream(db, slot, [pub]).__enter__()
    try:
        assert stream.read(0.2) is None
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            [slot],
        )
        with pytest.raises(CDCError) as info:
            stream.read(5.0)
        err = info.value
        assert err.reason is Reason.CONNECTION_FAILED and err.retryable
        assert "ended the replication stream" in err.message and "57P01" in err.message
        with pytest.raises(CDCError) as info:
            stream.send_status()
        assert info.value.reason is Reason.CONNECTION_FAILED
    finally:
        stream.close()  # the server already went away: must not raise
    stream.close()  # idempotent
    assert stream.closed
    with pytest.raises(RuntimeError, match="not running"):
        stream.read(0.1)

    _wait_inactive(db, slot)
    db.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    with pytest.raises(CDCError) as info, _stream(db, slot, [pub]):
        pass
    assert info.value.reason is Reason.SLOT_MISSING and not info.value.retryable
    assert slot in info.value.message


def test_slot_held_by_another_stream_is_slot_in_use(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    with _stream(db, slot, [pub]) as first:
        second = _stream(db, slot, [pub])
        with pytest.raises(CDCError) as info:
            second.start()
        assert info.value.reason is Reason.SLOT_IN_USE and info.value.retryable
        assert not second.started
        second.close()
        assert first.read(0.1) is None  # the first one is unaffected


def test_missing_publication_surfaces_from_read(db: ScratchDatabase) -> None:
    """PG 15 checks the publication names only when it decodes the first change, so the
    error ends the copy stream; its result is classified (publication_missing)."""
    slot, _ = _setup(db)
    with _stream(db, slot, ["no_such_pub"]) as stream:
        _insert(db, range(1, 2))
        with pytest.raises(CDCError) as info:
            _read_until(stream, lambda fr: False, timeout_s=5)
    assert info.value.reason is Reason.PUBLICATION_MISSING


@pytest.mark.slow
def test_server_shutdown_ends_stream_as_retryable(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("CREATE PUBLICATION pub1 FOR TABLE t")
        conn.execute("SELECT pg_create_logical_replication_slot('s1', 'pgoutput')")
    stream = ReplicationStream(
        cluster.admin_dsn, slot="s1", publications=["pub1"], secrets=[cluster.password]
    )
    with stream:
        assert stream.read(0.2) is None
        stopper = threading.Thread(target=cluster.stop)
        stopper.start()
        try:
            with pytest.raises(CDCError) as info:
                _read_until(stream, lambda fr: False, timeout_s=30)
        finally:
            stopper.join()
    err = info.value
    assert err.reason is Reason.CONNECTION_FAILED and err.retryable
    assert cluster.password not in str(err)
    with pytest.raises(CDCError) as info, stream.__class__(
        cluster.admin_dsn, slot="s1", publications=["pub1"]
    ):
        pass
    assert info.value.reason is Reason.CONNECTION_FAILED


def test_stream_not_started_and_closed_states(db: ScratchDatabase) -> None:
    slot, pub = _setup(db)
    stream = _stream(db, slot, [pub])
    with pytest.raises(RuntimeError, match="not running"):
        stream.read(0.1)
    with pytest.raises(RuntimeError, match="not running"):
        stream.send_status()
    stream.close()  # before start: fine
    with pytest.raises(RuntimeError):
        stream.start()

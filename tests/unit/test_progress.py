"""Slot confirmation rule: only durable work moves the flush LSN; idle confirms the keepalive."""

from __future__ import annotations

from cdcengine.progress import Progress


def test_only_durable_batches_move_the_flush_lsn() -> None:
    p = Progress()
    p.buffer_state(open_transaction=True, pending_rows=0)
    p.received(100)
    p.buffer_state(open_transaction=False, pending_rows=5)
    p.keepalive(150)
    assert p.flush_lsn == 0  # rows of 100 are not durable yet
    p.batch_started()
    p.buffer_state(open_transaction=False, pending_rows=0)
    assert p.flush_lsn == 0  # handed to the writer, still not durable
    p.batch_durable(100)
    assert p.flush_lsn == 150  # durable, and idle: the keepalive position is confirmed


def test_idle_source_confirms_the_keepalive_position() -> None:
    p = Progress()
    p.keepalive(4096)
    assert p.flush_lsn == 4096
    p.keepalive(8192)
    assert p.flush_lsn == 8192


def test_a_quiet_transaction_without_rows_is_confirmed_when_idle() -> None:
    p = Progress()
    p.buffer_state(open_transaction=True, pending_rows=0)
    p.received(300)
    p.buffer_state(open_transaction=False, pending_rows=0)
    assert p.flush_lsn == 300


def test_never_backwards_and_in_flight_blocks_keepalive() -> None:
    p = Progress()
    p.batch_started()
    p.keepalive(500)
    assert p.flush_lsn == 0
    p.batch_durable(400)
    assert p.flush_lsn == 500
    p.batch_started()
    p.batch_durable(200)  # an older version never moves it back
    assert p.flush_lsn == 500


def test_held_progress_claims_nothing_however_far_it_gets() -> None:
    p = Progress(held=True)
    p.received(100)
    p.batch_started()
    p.batch_durable(100)
    p.keepalive(500)
    assert p.flush_lsn == 500  # what is durable is still tracked
    assert p.confirmable == 0  # but the server is told nothing: the slot stays put
    assert Progress(flush_lsn=7).confirmable == 7

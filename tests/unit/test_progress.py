"""Slot confirmation rule: only durable work moves the flush LSN; idle confirms the keepalive."""

from __future__ import annotations

import random

import pytest

from cdcengine.pipeline.progress import Progress


def step(p: Progress, *, durable: tuple[int, ...] = (), open_transaction: bool = False,
         pending_rows: int = 0, keepalive: int = 0) -> int:
    return p.settle(durable=durable, open_transaction=open_transaction,
                    pending_rows=pending_rows, keepalive_lsn=keepalive)


def test_only_durable_batches_move_the_flush_lsn() -> None:
    p = Progress()
    step(p, open_transaction=True)
    p.received(100)
    step(p, pending_rows=5, keepalive=150)
    assert p.flush_lsn == 0  # rows of 100 are not durable yet
    p.batch_started()
    step(p)
    assert p.flush_lsn == 0  # handed to the writer, still not durable
    step(p, durable=(100,))
    assert p.flush_lsn == 150  # durable, and idle: the keepalive position is confirmed


def test_a_transaction_received_while_its_predecessor_is_written_is_not_confirmed() -> None:
    """Issue 12's lost transaction: batch 100 is taken (buffer empty), transaction 200 arrives
    and waits in the buffer, then batch 100 becomes durable. Only 100 may be confirmed."""
    p = Progress()
    p.received(100)
    p.batch_started()
    step(p)  # the buffer was empty right after the batch was taken
    p.received(200)  # the next transaction: buffered, waiting for the flush interval
    assert step(p, durable=(100,), pending_rows=5, keepalive=150) == 100
    p.batch_started()
    assert step(p, keepalive=250) == 100
    assert step(p, durable=(200,), keepalive=250) == 250


def test_idle_source_confirms_the_keepalive_position() -> None:
    p = Progress()
    assert step(p, keepalive=4096) == 4096
    assert step(p, keepalive=8192) == 8192


def test_a_quiet_transaction_without_rows_is_confirmed_when_idle() -> None:
    p = Progress()
    step(p, open_transaction=True)
    p.received(300)
    assert step(p) == 300


def test_never_backwards_and_in_flight_blocks_keepalive() -> None:
    p = Progress()
    p.batch_started()
    assert step(p, keepalive=500) == 0
    assert step(p, durable=(400,)) == 500
    p.batch_started()
    assert step(p, durable=(200,)) == 500  # an older version never moves it back


def test_a_durable_batch_that_was_never_started_is_refused() -> None:
    with pytest.raises(ValueError, match="never started"):
        step(Progress(), durable=(100,))


def test_held_progress_claims_nothing_however_far_it_gets() -> None:
    p = Progress(held=True)
    p.received(100)
    p.batch_started()
    step(p, durable=(100,), keepalive=500)
    assert p.flush_lsn == 500  # what is durable is still tracked
    assert p.confirmable == 0  # but the server is told nothing: the slot stays put
    assert Progress(flush_lsn=7).confirmable == 7


def test_randomized_confirmation_never_passes_a_transaction_that_is_not_durable() -> None:
    """A model of the reading loop: transactions arrive, batches are taken and become durable
    at random moments, keepalives trail what was received. Whatever is confirmed must not pass
    the first transaction that is not yet durable."""
    rng = random.Random(7)
    for _ in range(200):
        p = Progress()
        lsn = 0
        buffered: list[int] = []  # end LSNs waiting in the batcher
        writing: list[list[int]] = []  # batches handed to the writer, oldest first
        durable: set[int] = set()
        keepalive = 0
        for _ in range(60):
            r = rng.random()
            if r < 0.4:
                lsn += rng.randint(50, 200)
                buffered.append(lsn)
                p.received(lsn)
            elif r < 0.6 and buffered:
                writing.append(buffered)
                buffered = []
                p.batch_started()
            done: list[int] = []
            while writing and rng.random() < 0.4:
                batch = writing.pop(0)
                durable.update(batch)
                done.append(batch[-1])
            if rng.random() < 0.3:
                # a keepalive never runs ahead of what was received
                keepalive = max(keepalive, lsn)
            confirmed = step(p, durable=tuple(done), pending_rows=len(buffered),
                             keepalive=keepalive)
            not_durable = buffered + [x for batch in writing for x in batch]
            if not_durable:
                assert confirmed < min(not_durable)

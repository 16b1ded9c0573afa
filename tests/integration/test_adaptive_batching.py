"""Adaptive batching: when the destination is slow, batches grow to carry everything that
arrived during the running write, instead of a queue of flush-interval slices."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cdc_util import source_for
from test_pipeline import Running, live_rows, wait_for

from cdcengine import api, failpoints
from cdcengine.pipeline.batcher import ChangeBatch
from cdcengine.pipeline.pipeline import Pipeline, RunStats

WRITE_S = 1.0  # what each batch's write costs on top of the real commit (failpoint)


@pytest.fixture
def slow_writes() -> Iterator[None]:
    failpoints.arm(f"after_commit=sleep:{WRITE_S}")
    try:
        yield
    finally:
        failpoints.arm("")


def test_batches_grow_while_the_sink_is_slow(db, tmp_path: Path, slow_writes: None) -> None:
    db.execute("CREATE TABLE ev (id int PRIMARY KEY, v int)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["ev"], flush_interval_ms=100)
    api.enable_cdc(src, state=state)
    batches: list[int] = []  # transactions per batch, in order

    def on_batch(batch: ChangeBatch, _: RunStats) -> None:
        batches.append(batch.transactions)

    stop_load = threading.Event()
    written = [0]

    def load() -> None:
        # one small transaction every ~20 ms: 50/s, far more than one per flush interval
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            i = 0
            while not stop_load.is_set():
                i += 1
                conn.execute("INSERT INTO ev VALUES (%s, %s)", (i, i))
                written[0] = i
                time.sleep(0.02)

    running = Running(src, state)
    running.pipeline = Pipeline(src, state=state, on_batch=on_batch)
    with running:
        db.execute("INSERT INTO ev VALUES (0, 0)")  # streaming has begun once it is in Delta
        wait_for(lambda: len(live_rows(src, "ev")) == 1, timeout=60)
        batches.clear()
        worker = threading.Thread(target=load, daemon=True)
        started = time.monotonic()
        worker.start()
        time.sleep(6.0)
        stop_load.set()
        worker.join()
        loaded = time.monotonic() - started
        wait_for(lambda: len(live_rows(src, "ev")) == written[0] + 1, timeout=60)
    # Each write takes >= WRITE_S. Flush-interval slices (100 ms) queued behind it would make
    # ~2 batches per write; grown batches make one per write (plus the tail after the load).
    assert batches, "no batch was written"
    assert len(batches) <= loaded / WRITE_S + 3, batches
    # no batch waited behind the write before it (a flush-interval slice queued behind a
    # running merge waits a whole merge, then pays for a merge of its own)
    stats = running.pipeline.stats
    assert stats.queued_seconds < WRITE_S / 2, (stats.queued_seconds, batches)
    # while one write runs (>= 1 s), ~50 transactions arrive: the next batch carries them all
    assert max(batches) >= 25, batches
    # (the first batch may still be the one holding row 0: its hook runs after the commit)
    assert sum(batches) in (written[0], written[0] + 1)

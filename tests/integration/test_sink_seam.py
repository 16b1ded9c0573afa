"""The sink seam proven by use: the real adapter and a real server, an in-memory sink.

`FakeLake` implements the `SnapshotSink` protocol with dicts (rows and applied versions per
table), keeping every `write` call as it was made. A `Pipeline` built with a factory of it
snapshots, streams, crashes right after a commit and restarts; the test then checks what the
protocol promises from the pipeline's side: every batch holds whole source transactions of one
table in WAL order, at or below its version; versions grow; the replay after the restart is
skipped by applied version (each change lands once); and the slot's confirmed position never
passes what the fake had made durable. A fake that refuses every write keeps the slot where it
was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from cdc_util import query, source_for

from cdcengine import api
from cdcengine.config import SourceConfig, TableMode
from cdcengine.errors import CDCError
from cdcengine.lsn import parse_lsn
from cdcengine.names import TableRef
from cdcengine.pipeline.pipeline import Pipeline
from cdcengine.sink.base import (
    AddedColumns,
    BatchTable,
    CommitResult,
    MaintenanceResult,
    SinkWriteError,
    SnapshotSink,
    SpilledTable,
    TableKind,
    TableSpec,
    WriteResult,
    kinds_for,
)

A, B = TableRef("public", "a"), TableRef("public", "b")
Key = tuple[str, TableRef, TableKind]  # (destination, table, kind)


@dataclass(frozen=True, slots=True)
class Call:
    """One `write` as the pipeline made it."""

    run: int
    ref: TableRef
    version: int
    rows: pa.Table
    skipped: bool = False  # nothing above the applied version: no commit


class CrashAfterCommit(RuntimeError):
    """The process "dies" after the fake's commit, before `write` returns."""


class FakeLake:
    """The store behind every sink the factory hands out (one per destination and thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[Key, list[pa.Table]] = {}
        self.applied: dict[Key, int] = {}
        self.columns: dict[Key, tuple[str, ...]] = {}
        self.plans: dict[Key, str] = {}
        self.markers: dict[Key, dict[str, int]] = {}
        self.calls: list[Call] = []
        self.run = 0
        self.refuse = False
        self.crash_after_commits: int | None = None  # crash after this many more commits

    def factory(self, source: SourceConfig) -> SnapshotSink:
        return FakeSink(self, source.destination)

    def stored(self, ref: TableRef) -> pa.Table:
        with self.lock:
            parts = [t for (_, r, _), ts in self.rows.items() if r == ref for t in ts]
        return pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})

    def durable_lsns(self) -> set[int]:
        """The `_cdc_lsn`s of every stream row stored so far (snapshot rows left out)."""
        with self.lock:
            return {lsn for tables in self.rows.values() for t in tables
                    for lsn, op in zip(t["_cdc_lsn"].to_pylist(), t["_cdc_op"].to_pylist(),
                                       strict=True) if op != "R"}


class FakeSink:
    """`SnapshotSink` in memory: stream writes keep their rows as a change log per table."""

    def __init__(self, lake: FakeLake, destination: str) -> None:
        self.lake, self.destination = lake, destination

    def _key(self, ref: TableRef, kind: TableKind | str) -> Key:
        return (self.destination, ref, TableKind(kind))

    # ---- Sink -------------------------------------------------------------------------------
    def applied_version(self, ref: TableRef, kind: TableKind) -> int | None:
        with self.lake.lock:
            return self.lake.applied.get(self._key(ref, kind))

    def resume_version(self, ref: TableRef, mode: TableMode) -> int | None:
        versions = [self.applied_version(ref, k) for k in kinds_for(mode)]
        return None if any(v is None for v in versions) else min(v for v in versions
                                                                 if v is not None)

    def data_columns(self, ref: TableRef, kind: TableKind) -> tuple[str, ...] | None:
        with self.lake.lock:
            return self.lake.columns.get(self._key(ref, kind))

    def write(self, ref: TableRef, batch: BatchTable, *, spec: TableSpec, version: int,
              added: AddedColumns | None = None) -> WriteResult:
        if isinstance(batch, SpilledTable):  # a transaction past max_batch_mb: a sink may
            batch = batch.to_table()  # read it whole (the Delta sink streams what it can)
        lake = self.lake
        with lake.lock:
            if lake.refuse:
                lake.calls.append(Call(lake.run, ref, version, batch))
                raise SinkWriteError("the fake destination refuses every write")
            commits: list[CommitResult] = []
            for kind in kinds_for(spec.mode):
                key = self._key(ref, kind)
                applied = lake.applied.get(key)
                rows = batch if applied is None else \
                    batch.filter(pc.greater(batch["_cdc_lsn"], pa.scalar(applied, pa.int64())))
                if applied is not None and rows.num_rows == 0:
                    commits.append(CommitResult(table=ref, kind=kind, version=applied,
                                                skipped=True))
                    continue
                # the commit: data and applied version together
                lake.rows.setdefault(key, []).append(rows)
                lake.applied[key] = version
                lake.columns[key] = tuple(c for c in batch.column_names
                                          if not c.startswith("_cdc_"))
                commits.append(CommitResult(table=ref, kind=kind, version=version, skipped=False,
                                            rows_in=rows.num_rows, bytes_in=rows.nbytes))
            lake.calls.append(Call(lake.run, ref, version, batch,
                                   skipped=all(c.skipped for c in commits)))
            if lake.crash_after_commits is not None and not commits[-1].skipped:
                lake.crash_after_commits -= 1
                if lake.crash_after_commits < 0:
                    lake.crash_after_commits = None
                    raise CrashAfterCommit("crashed after the commit")
        durable = min(c.version for c in commits)
        return WriteResult(table=ref, version=max(version, durable), commits=tuple(commits))

    def maintain(self, ref: TableRef, kind: TableKind) -> MaintenanceResult:
        return MaintenanceResult(table=ref, kind=kind)

    def close(self) -> None:
        pass

    # ---- SnapshotSink -----------------------------------------------------------------------
    def snapshot_plan(self, ref: TableRef, kind: TableKind) -> tuple[str | None, int | None]:
        with self.lake.lock:
            key = self._key(ref, kind)
            return self.lake.plans.get(key), self.lake.markers.get(key, {}).get("")

    def snapshot_chunk_versions(self, ref: TableRef, kind: TableKind,
                                chunks: Sequence[str]) -> dict[str, int]:
        with self.lake.lock:
            done = self.lake.markers.get(self._key(ref, kind), {})
            return {c: done[c] for c in chunks if c in done}

    def begin_snapshot(self, ref: TableRef, kind: TableKind, *, empty: pa.Table,
                       key: Sequence[str], plan: str, attempt: int) -> None:
        with self.lake.lock:
            k = self._key(ref, kind)
            self.lake.rows[k] = []
            self.lake.applied.pop(k, None)
            self.lake.columns[k] = tuple(empty.column_names)
            self.lake.plans[k] = plan
            self.lake.markers[k] = {"": attempt}

    def write_snapshot_chunk(self, ref: TableRef, kinds: Sequence[TableKind],
                             pieces: Iterable[pa.Table], *, chunk: str, seq_base: int,
                             version: int, committed_at_us: int) -> int:
        data = [p for p in pieces]  # read to the end before anything is committed
        rows = sum(p.num_rows for p in data)
        with self.lake.lock:
            for kind in kinds:
                k = self._key(ref, kind)
                for piece in data:
                    n = piece.num_rows
                    self.lake.rows[k].append(piece.append_column(
                        "_cdc_op", pa.array(["R"] * n, pa.string())).append_column(
                        "_cdc_lsn", pa.array([version] * n, pa.int64())))
                self.lake.markers[k][chunk] = version
        return rows

    def mirror_snapshot_chunks(self, ref: TableRef, into: TableKind, *,
                               chunks: Mapping[str, tuple[int, int]], version: int,
                               key: Sequence[str]) -> int:
        raise NotImplementedError("one kind per table here")

    def finish_snapshot(self, ref: TableRef, kind: TableKind, *, version: int) -> None:
        with self.lake.lock:
            self.lake.applied[self._key(ref, kind)] = version

    def read_table(self, ref: TableRef, kind: TableKind, *,
                   columns: Sequence[str] | None = None) -> pa.Table:
        raise NotImplementedError("no resync here")

    def apply_resync(self, ref: TableRef, kind: TableKind, staged: pa.Table, *,
                     key: Sequence[str], version: int, committed_at_us: int,
                     hard_deletes: bool = False, live_keys: pa.Table | None = None) -> int:
        raise NotImplementedError("no resync here")


class SlotWatch:
    """Samples the slot's confirmed position; right after each sample, what the fake holds."""

    def __init__(self, dsn: str, slot: str, lake: FakeLake) -> None:
        self.samples: list[tuple[int, set[int]]] = []
        self._dsn, self._slot, self._lake = dsn, slot, lake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.wait(0.05):
                row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                                   " WHERE slot_name = %s", [self._slot]).fetchone()
                if row and row[0]:
                    self.samples.append((parse_lsn(row[0]), self._lake.durable_lsns()))

    def __enter__(self) -> SlotWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_pipeline(src: SourceConfig, state: str, lake: FakeLake,
                 until: Callable[[], bool], timeout: float = 60.0) -> BaseException | None:
    """Run a pipeline over the fake until `until()` (or it fails); its error, if any."""
    lake.run += 1
    pipeline = Pipeline(src, state=state, sink_factory=lake.factory)
    stop = threading.Event()
    failed: list[BaseException] = []

    def target() -> None:
        try:
            pipeline.run(stop)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            failed.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and not until() and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(60)
    assert not thread.is_alive()
    return failed[0] if failed else None


def transactions(dsn: str, count: int, *, start: int) -> None:
    """`count` transactions, each inserting into a and b and updating earlier rows of a."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(count):
            base = start + i * 10
            with conn.transaction():
                conn.execute("INSERT INTO a SELECT g, g FROM generate_series(%s::int, %s::int) g",
                             [base, base + 2 + i % 4])
                conn.execute("INSERT INTO b SELECT g, -g FROM generate_series(%s::int, %s::int) g",
                             [base, base + i % 3])
                conn.execute("UPDATE a SET v = v + 1 WHERE id = %s::int", [base])
            time.sleep(0.03 + 0.03 * (i % 3))


def stream_ids(lake: FakeLake, ref: TableRef) -> list[int]:
    rows = lake.stored(ref)
    if rows.num_rows == 0:
        return []
    keep = pc.equal(rows["_cdc_op"], "I")
    return sorted(rows.filter(keep)["id"].to_pylist())


def check_batches(lake: FakeLake) -> None:
    """What the pipeline handed the sink: whole transactions of one table, in WAL order, at
    or below the batch version; per run and table, versions grow."""
    per_txn: dict[tuple[TableRef, int], int] = {}
    for ref in (A, B):
        stored = lake.stored(ref)
        stream = stored.filter(pc.not_equal(stored["_cdc_op"], "R"))
        for lsn in stream["_cdc_lsn"].to_pylist():
            per_txn[(ref, lsn)] = per_txn.get((ref, lsn), 0) + 1
    last: dict[tuple[int, TableRef], int] = {}
    for call in lake.calls:
        assert set(call.rows.column_names) >= {"id", "v", "_cdc_op", "_cdc_lsn", "_cdc_seq"}
        order = list(zip(call.rows["_cdc_lsn"].to_pylist(), call.rows["_cdc_seq"].to_pylist(),
                         strict=True))
        assert order == sorted(order) and len(set(order)) == len(order), "not in WAL order"
        assert all(lsn <= call.version for lsn, _ in order), "a row above the batch version"
        counts: dict[int, int] = {}
        for lsn, _ in order:
            counts[lsn] = counts.get(lsn, 0) + 1
        for lsn, n in counts.items():
            # the transaction's every change of this table, in this one batch
            assert per_txn.get((call.ref, lsn)) == n, "a source transaction split over batches"
        key = (call.run, call.ref)
        assert call.version > last.get(key, -1), "versions must grow"
        last[key] = call.version


def check_slot(watch: SlotWatch, lake: FakeLake) -> None:
    """The confirmed position never passed what the fake had made durable: every stream row
    at or below a sampled position was stored when the position was read."""
    final = lake.durable_lsns()
    assert watch.samples
    for confirmed, durable in watch.samples:
        missing = {lsn for lsn in final if lsn <= confirmed} - durable
        assert not missing, f"slot confirmed {confirmed} before {sorted(missing)} was durable"


def test_pipeline_over_a_fake_sink_keeps_the_seam(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY, v int); CREATE TABLE b (id int PRIMARY KEY,"
               " v int); INSERT INTO a SELECT g, g FROM generate_series(1, 5) g")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], flush_interval_ms=50)
    api.enable_cdc(src, state=state)
    lake = FakeLake()
    ids_a = lambda: [r[0] for r in query(db.dsn, "SELECT id FROM a WHERE id > 5 ORDER BY id")]  # noqa: E731
    ids_b = lambda: [r[0] for r in query(db.dsn, "SELECT id FROM b ORDER BY id")]  # noqa: E731

    with SlotWatch(db.dsn, src.slot_name, lake) as watch:
        # run 1: the snapshot, then a workload; the fake "dies" right after its 6th stream
        # commit, before `write` returns: that batch is durable and not confirmed
        lake.crash_after_commits = 5
        loader = threading.Thread(target=transactions, args=(db.dsn, 12), kwargs={"start": 100})
        snapshot_done = lambda: all(  # noqa: E731
            (src.destination, r, TableKind.CONSOLIDATED) in lake.applied for r in (A, B))
        started: list[bool] = []

        def until_crash() -> bool:
            if snapshot_done() and not started:
                started.append(True)
                loader.start()
            return False

        error = run_pipeline(src, state, lake, until_crash, timeout=90)
        assert isinstance(error, CrashAfterCommit), error
        loader.join()
        first_run = len(lake.calls)
        applied_at_crash = dict(lake.applied)
        # run 2: the restart replays from the slot's confirmed position; more work meanwhile
        transactions(db.dsn, 5, start=1000)
        error = run_pipeline(src, state, lake, lambda: stream_ids(lake, A) == ids_a()
                             and stream_ids(lake, B) == ids_b())
        assert error is None, error

    # the snapshot rows, then every change exactly once although a batch was replayed
    snap = lake.stored(A).filter(pc.equal(lake.stored(A)["_cdc_op"], "R"))
    assert sorted(snap["id"].to_pylist()) == [1, 2, 3, 4, 5]
    assert stream_ids(lake, A) == ids_a() and stream_ids(lake, B) == ids_b()
    updates = lake.stored(A).filter(pc.equal(lake.stored(A)["_cdc_op"], "U"))
    assert updates.num_rows == 17  # one per transaction, none twice
    replayed = [c for c in lake.calls[first_run:]
                if c.rows.num_rows and pc.min(c.rows["_cdc_lsn"]).as_py()
                <= applied_at_crash.get((src.destination, c.ref, TableKind.CONSOLIDATED), 0)]
    assert replayed, "the restart replayed nothing: the crash did not leave a gap to replay"
    check_batches(lake)
    check_slot(watch, lake)


def test_a_refusing_sink_keeps_the_slot_where_it_was(db, tmp_path: Path) -> None:
    db.execute("CREATE TABLE a (id int PRIMARY KEY, v int); CREATE TABLE b (id int PRIMARY KEY,"
               " v int)")
    state = "sqlite:///" + str(tmp_path / "state.db")
    src = source_for(db.dsn, tmp_path, ["a", "b"], flush_interval_ms=50)
    api.enable_cdc(src, state=state)
    lake = FakeLake()
    snapshot_done = lambda: all(  # noqa: E731
        (src.destination, r, TableKind.CONSOLIDATED) in lake.applied for r in (A, B))
    assert run_pipeline(src, state, lake, snapshot_done) is None
    lake.refuse = True
    transactions(db.dsn, 3, start=100)
    with SlotWatch(db.dsn, src.slot_name, lake) as watch:
        error = run_pipeline(src, state, lake, lambda: False, timeout=30)
    refused = [c for c in lake.calls if c.run == 2]
    assert refused, "the pipeline never tried to write"
    first = min(pc.min(c.rows["_cdc_lsn"]).as_py() for c in refused)
    confirmed = query(db.dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                      "WHERE slot_name = %s", [src.slot_name])[0][0]
    assert parse_lsn(confirmed) < first
    assert all(c < first for c, _ in watch.samples)
    assert lake.durable_lsns() == set()  # nothing of the stream was stored
    assert isinstance(error, CDCError) and error.retryable, error


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's in-place retries of a refused write, shortened."""
    monkeypatch.setattr("cdcengine.pipeline.writer.TABLE_RETRY_PAUSES_S", (0.05, 0.05))

"""`cdcengine demo`: a live workload replicated into a local Delta lake, with progress.

The engine-neutral half: the source side (a server, sample tables, the workload) comes from the
engine's adapter through `registry.demo_for`, as a `DemoSource`. This module enables CDC with a
demo-local state store (`<lake>/.state.db`), runs `Pipeline` on one thread and the workload on
another, and prints every ~1.5 s each table's source rows next to the live rows of its Delta
table (queried with DuckDB over the pyarrow dataset the sink's `DeltaReader` gives), the rows
applied and the rate. After `duration` seconds the workload stops and the demo waits until
every Delta table equals its source table, value for value, then prints a summary.

Exit codes: 0 caught up; 1 a failure, or Delta did not catch up within `catch_up_timeout_s`
(said so); 2 usage (e.g. `--lake` is a directory that is not a demo lake); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Protocol, TextIO

import duckdb
import pyarrow.dataset as pads
import structlog

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, ConfigError, PrerequisitesFailed, classify_error
from cdcengine.names import TableRef
from cdcengine.pipeline.pipeline import Pipeline
from cdcengine.sink.base import TableKind
from cdcengine.sink.columns import DELETED, PREFIX
from cdcengine.sink.delta.read import DeltaReader, DeltaSnapshot
from cdcengine.source.adapter import Check
from cdcengine.source.registry import demo_for

log = structlog.get_logger("cdcengine.serve.demo")

SOURCE_NAME = "demo"
STATE_FILE = ".state.db"
ENGINE_PREFIX = PREFIX


# ---- the seam: what an adapter's demo part provides -------------------------------------------


@dataclass(slots=True)
class WorkloadStats:
    """What the workload did so far (written by the workload thread, read for progress)."""

    transactions: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    error: str | None = None

    @property
    def rows(self) -> int:
        return self.inserts + self.updates + self.deletes

    def add(self, tx: WorkloadStats) -> None:
        """Count one committed transaction's changes."""
        self.transactions += 1
        self.inserts += tx.inserts
        self.updates += tx.updates
        self.deletes += tx.deletes


class DemoSource(Protocol):
    """The source side of the demo, as an adapter provides it (`open_demo` in its `demo`
    module). Calls come from the demo's threads; each method opens its own connection."""

    @property
    def dsn(self) -> str: ...

    @property
    def tables(self) -> tuple[str, ...]:
        """Qualified names of the sample tables (`schema.table`)."""
        ...

    @property
    def keys(self) -> Mapping[str, tuple[str, ...]]:
        """Each sample table's primary-key columns."""
        ...

    @property
    def description(self) -> str:
        """Where the source is, for people (no secrets)."""
        ...

    @property
    def owns_server(self) -> bool:
        """True when the demo started the server (`close` removes it)."""
        ...

    def create_sample(self) -> dict[str, int]:
        """(Re)create the sample tables with data; rows per table."""
        ...

    def run_workload(self, stop: threading.Event, stats: WorkloadStats) -> None:
        """Insert/update/delete transactions until `stop` is set; errors go to `stats.error`."""
        ...

    def source_counts(self) -> dict[str, int]: ...

    def source_rows(self, table: str) -> list[dict[str, object]]:
        """Every row of a sample table as Python values (json as its text)."""
        ...

    def drop_sample(self) -> None: ...

    def close(self) -> None: ...


class DemoFactory(Protocol):
    def __call__(self, dsn: str | None, *, say: Callable[[str], None]) -> DemoSource: ...


# ---- options and results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    lake: Path
    dsn: str | None = None
    duration_s: float = 30.0
    keep: bool = False
    engine: str = "postgres"
    interval_s: float = 1.5
    catch_up_timeout_s: float = 60.0


@dataclass(slots=True)
class TableResult:
    table: str
    source_rows: int | None = None
    delta_rows: int | None = None
    differing: int | None = None  # rows whose values differ (None: not compared)

    @property
    def equal(self) -> bool:
        return (self.source_rows is not None and self.source_rows == self.delta_rows
                and self.differing == 0)


@dataclass(slots=True)
class DemoResult:
    exit_code: int = 0
    caught_up: bool = False
    interrupted: bool = False
    error: str | None = None
    tables: list[TableResult] = field(default_factory=list)


# ---- Delta side ----------------------------------------------------------------------------


class LakeReader:
    """Live rows of the consolidated Delta tables, through DuckDB over pyarrow datasets."""

    def __init__(self, lake: Path) -> None:
        self.lake = lake
        self._reader = DeltaReader(str(lake))
        self._db = duckdb.connect()

    def path(self, table: str) -> str:
        return self._reader.path(TableRef.parse(table), TableKind.CONSOLIDATED)

    def _open(self, table: str) -> DeltaSnapshot | None:
        try:
            return self._reader.open_path(self.path(table))
        except Exception:  # noqa: BLE001 - not written yet or mid-create
            return None

    def live_count(self, table: str) -> int | None:
        dt = self._open(table)
        if dt is None:
            return None
        self._db.register("t", dt.dataset())
        try:
            live = f"SELECT count(*) FROM t WHERE NOT {DELETED}"  # noqa: S608
            rows = self._db.execute(live).fetchall()
        finally:
            self._db.unregister("t")
        return int(rows[0][0])

    def live_rows(self, table: str) -> list[dict[str, object]] | None:
        dt = self._open(table)
        if dt is None:
            return None
        ds = dt.dataset()
        keep = [c for c in ds.schema.names if not c.startswith(ENGINE_PREFIX)]
        return list(ds.to_table(columns=keep, filter=~pads.field(DELETED)).to_pylist())

    def close(self) -> None:
        self._db.close()


def _same(a: object, b: object) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):  # json text: equal documents
        try:
            return bool(json.loads(a) == json.loads(b))
        except ValueError:
            return False
    if isinstance(a, Decimal) and isinstance(b, Decimal | int):
        return a == Decimal(b)
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a.timestamp() == b.timestamp()
    return False


def differing_rows(source: list[dict[str, object]], delta: list[dict[str, object]],
                   key: tuple[str, ...]) -> int:
    """How many keys are missing on either side or hold different values."""
    src = {tuple(r[k] for k in key): r for r in source}
    dst = {tuple(r.get(k) for k in key): r for r in delta}
    bad = len(src.keys() ^ dst.keys())
    for k in src.keys() & dst.keys():
        s, d = src[k], dst[k]
        if any(col not in d or not _same(val, d[col]) for col, val in s.items()):
            bad += 1
    return bad


# ---- the demo ------------------------------------------------------------------------------


class _Runner(threading.Thread):
    def __init__(self, name: str, target: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: CDCError | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except Exception as exc:  # reported by the demo (classified), never a traceback
            self.error = classify_error(exc)
            log.debug("demo_thread_failed", thread=self.name, exc_info=exc)


def _previous_lake(lake: Path) -> bool:
    """True for a previous demo lake (to be replaced), False for a new or empty directory;
    anything else is refused (a usage error): the demo never deletes data it did not make."""
    if not lake.exists():
        return False
    if not lake.is_dir():
        raise ConfigError(f"--lake {lake}: exists and is not a directory")
    if not any(lake.iterdir()):
        return False
    if not (lake / STATE_FILE).is_file():
        raise ConfigError(f"--lake {lake}: the directory is not empty and is not a demo lake "
                          f"(no {STATE_FILE}); pass a new or empty directory")
    return True


def _fmt_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _short(table: str) -> str:
    return table.split(".", 1)[1] if "." in table else table


class Demo:
    def __init__(self, opts: DemoOptions, factory: DemoFactory, *, stop: threading.Event,
                 out: TextIO | None = None) -> None:
        self.opts = opts
        self.factory = factory
        self.stop = stop  # set by Ctrl-C
        self.out = out or sys.stdout
        self.lake = opts.lake.resolve()
        self.result = DemoResult()
        self.workload = WorkloadStats()
        self._workload_stop = threading.Event()
        self._pipeline_stop = threading.Event()
        self._pipeline: Pipeline | None = None

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ---- main line ---------------------------------------------------------------------------
    def run(self) -> DemoResult:
        previous = _previous_lake(self.lake)
        src: DemoSource | None = None
        source: SourceConfig | None = None
        enabled = sampled = False
        threads: list[_Runner] = []
        reader = LakeReader(self.lake)
        try:
            src = self.factory(self.opts.dsn, say=self.say)
            self.say(f"source: {src.description}")
            if self._interrupted():
                return self.result
            source = self._source_config(src)
            state = f"sqlite:///{self.lake / STATE_FILE}"
            if previous:
                if not src.owns_server:  # a kept demo on this server: drop its slot first
                    with contextlib.suppress(CDCError):
                        api.disable_cdc(source, state=state)
                self.say(f"replacing the previous demo lake in {self.lake}")
                shutil.rmtree(self.lake)
            counts = src.create_sample()
            sampled = True
            self.say("sample tables: " + ", ".join(f"{t} ({n:,} rows)"
                                                    for t, n in counts.items()))
            self.lake.mkdir(parents=True, exist_ok=True)
            api.enable_cdc(source, state=state)
            enabled = True
            self.say(f"CDC enabled: slot {source.slot_name}, publication "
                     f"{source.publication_name}; replicating into {self.lake}")
            if self._interrupted():
                return self.result
            self._pipeline = Pipeline(source, state=state)
            pipeline = _Runner("demo-pipeline", partial(self._pipeline.run, self._pipeline_stop))
            workload = _Runner("demo-workload",
                               partial(src.run_workload, self._workload_stop, self.workload))
            threads = [pipeline, workload]
            pipeline.start()
            workload.start()
            self.say(f"live workload for {self.opts.duration_s:g} s (Ctrl-C stops) — "
                     "source rows / Delta live rows per table:")
            self._watch(src, reader, pipeline, workload)
            self._workload_stop.set()
            workload.join()
            if not self.result.interrupted and self.result.error is None:
                self._catch_up(src, reader, pipeline)
            self._pipeline_stop.set()
            pipeline.join(60)
            if pipeline.error is not None and self.result.error is None:
                self.result.error = f"{pipeline.error.reason}: {pipeline.error.message}"
            self._summary(src, reader)
        except PrerequisitesFailed as exc:
            self.result.error = f"{exc.reason}: {exc.message}"
            for c in exc.checks:
                if isinstance(c, Check) and not c.ok:
                    self.say(f"  ❌ {c.name}: {c.message}")
                    if c.fix:
                        self.say(f"       fix: {c.fix}")
        except CDCError as exc:
            self.result.error = f"{exc.reason}: {exc.message}"
            if exc.fix:
                self.result.error += f"\n  fix: {exc.fix}"
        finally:
            self._workload_stop.set()
            self._pipeline_stop.set()
            for t in threads:
                t.join(60)
            reader.close()
            self._cleanup(src, source, enabled=enabled, sampled=sampled)
        if self.result.error is not None:
            self.result.exit_code = 1
        elif self.result.interrupted:
            self.result.exit_code = 130
        elif not self.result.caught_up:
            self.result.exit_code = 1
        return self.result

    def _source_config(self, src: DemoSource) -> SourceConfig:
        return SourceConfig(name=SOURCE_NAME, dsn=src.dsn, tables=tuple(src.tables),
                            destination=str(self.lake), flush_interval_ms=500)

    def _interrupted(self) -> bool:
        if self.stop.is_set():
            self.result.interrupted = True
        return self.result.interrupted

    # ---- phases ------------------------------------------------------------------------------
    def _applied(self) -> int:
        st = self._pipeline.stats if self._pipeline else None
        return (st.rows + st.snapshot_rows) if st else 0

    def _progress_line(self, src: DemoSource, reader: LakeReader, elapsed: float,
                       rate: float) -> tuple[str, bool]:
        counts = src.source_counts()
        parts, equal = [], True
        for t in src.tables:
            live = reader.live_count(t)
            ok = live == counts[t]
            equal &= ok
            parts.append(f"{_short(t)} {_fmt_count(counts[t])}/{_fmt_count(live)}"
                         + (" ✓" if ok else ""))
        w = self.workload
        line = (f"[{elapsed:5.1f}s] " + "  ".join(parts)
                + f" | applied {self._applied():,} rows ({rate:,.0f}/s)"
                + f" | workload {w.transactions} tx: +{w.inserts} ~{w.updates} -{w.deletes}")
        return line, equal

    def _watch(self, src: DemoSource, reader: LakeReader, pipeline: _Runner,
               workload: _Runner) -> None:
        started = last = time.monotonic()
        last_applied = self._applied()
        deadline = started + self.opts.duration_s
        while True:
            wait = min(self.opts.interval_s, max(deadline - time.monotonic(), 0))
            if self.stop.wait(wait):
                self.result.interrupted = True
                self.say("interrupted: stopping the workload and the pipeline")
                return
            now = time.monotonic()
            applied = self._applied()
            rate = (applied - last_applied) / max(now - last, 1e-3)
            last, last_applied = now, applied
            self.say(self._progress_line(src, reader, now - started, rate)[0])
            if pipeline.error is not None:
                self.result.error = f"{pipeline.error.reason}: {pipeline.error.message}"
                self.say(f"the pipeline stopped: {self.result.error}")
                return
            if self.workload.error is not None or workload.error is not None:
                self.result.error = self.workload.error or (
                    f"{workload.error.reason}: {workload.error.message}"  # type: ignore[union-attr]
                )
                self.say(f"the workload stopped: {self.result.error}")
                return
            if now >= deadline:
                return

    def _catch_up(self, src: DemoSource, reader: LakeReader, pipeline: _Runner) -> None:
        w = self.workload
        self.say(f"workload stopped after {w.transactions} transactions (+{w.inserts} inserts, "
                 f"~{w.updates} updates, -{w.deletes} deletes); waiting for Delta to catch up")
        started = time.monotonic()
        applied_at_stop = self._applied()
        deadline = started + self.opts.catch_up_timeout_s
        last_print = started
        while True:
            now = time.monotonic()
            applied = self._applied()
            line, equal = self._progress_line(src, reader, now - started,
                                              (applied - applied_at_stop) / max(now - started,
                                                                                1e-3))
            if equal and self._values_equal(src, reader):
                self.result.caught_up = True
                self.say(f"caught up: every Delta table equals its source table "
                         f"({now - started:.1f} s after the workload stopped)")
                return
            if now - last_print >= self.opts.interval_s:
                self.say(line)
                last_print = now
            if pipeline.error is not None:
                self.result.error = f"{pipeline.error.reason}: {pipeline.error.message}"
                self.say(f"the pipeline stopped: {self.result.error}")
                return
            if now >= deadline:
                self.say(f"NOT caught up: Delta still differs from the source "
                         f"{self.opts.catch_up_timeout_s:g} s after the workload stopped")
                return
            if self.stop.wait(0.3):
                self.result.interrupted = True
                return

    def _values_equal(self, src: DemoSource, reader: LakeReader) -> bool:
        results = []
        for t in src.tables:
            source_rows = src.source_rows(t)
            delta_rows = reader.live_rows(t)
            res = TableResult(table=t, source_rows=len(source_rows),
                              delta_rows=None if delta_rows is None else len(delta_rows))
            if delta_rows is not None:
                res.differing = differing_rows(source_rows, delta_rows, src.keys[t])
            results.append(res)
        self.result.tables = results
        return all(r.equal for r in results)

    def _summary(self, src: DemoSource, reader: LakeReader) -> None:
        if not self.result.tables:  # not compared yet (interrupted, failed): counts only
            counts = src.source_counts()
            self.result.tables = [TableResult(table=t, source_rows=counts[t],
                                              delta_rows=reader.live_count(t))
                                  for t in src.tables]
        st = self._pipeline.stats if self._pipeline else None
        self.say("")
        self.say(f"{'table':<22} {'source rows':>12} {'Delta rows':>12}  values")
        for r in self.result.tables:
            verdict = ("equal" if r.equal else "not compared" if r.differing is None
                       else f"{r.differing} rows differ")
            self.say(f"{r.table:<22} {_fmt_count(r.source_rows):>12} "
                     f"{_fmt_count(r.delta_rows):>12}  {verdict}")
        w = self.workload
        self.say(f"workload: {w.transactions} transactions, {w.inserts:,} inserts, "
                 f"{w.updates:,} updates, {w.deletes:,} deletes")
        if st is not None:
            self.say(f"pipeline: {st.snapshot_rows:,} snapshot rows, then {st.rows:,} changes "
                     f"in {st.batches} Delta commits ({st.transactions} transactions)")

    def _cleanup(self, src: DemoSource | None, source: SourceConfig | None, *,
                 enabled: bool, sampled: bool) -> None:
        """A server the demo started goes; on a --dsn server the demo drops what it made
        (slot, publication, sample tables) unless --keep."""
        if src is None:
            return
        owned = src.owns_server
        try:
            if not owned and not self.opts.keep:
                dropped = []
                if enabled and source is not None:
                    api.disable_cdc(source, state=f"sqlite:///{self.lake / STATE_FILE}")
                    dropped.append(f"slot and publication {source.slot_name}")
                if sampled:
                    src.drop_sample()
                    dropped.append("sample tables")
                if dropped:
                    self.say(f"dropped the demo's {' and '.join(dropped)} (--keep leaves them)")
            elif not owned and (enabled or sampled):
                self.say(f"kept the sample tables, slot {source.slot_name if source else '-'} "
                         "and publication on the server (--keep)")
        except CDCError as exc:
            self.say(f"cleanup: {exc.reason}: {exc.message}")
            if self.result.error is None:
                self.result.error = f"cleanup failed: {exc.message}"
        finally:
            src.close()
            if owned:
                self.say("stopped and removed the throwaway PostgreSQL server")


def how_to_query(lake: Path, tables: tuple[str, ...]) -> str:
    """A copy-paste line that queries the lake with DuckDB over deltalake."""
    try:
        shown = os.path.relpath(lake)
    except ValueError:
        shown = str(lake)
    if shown.startswith(".."):
        shown = str(lake)
    py = sys.executable
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(py)
        if not rel.startswith(".."):
            py = rel
    table = next((t for t in tables if t.endswith(".orders")), tables[0])
    path = TableRef.parse(table).delta_path(shown)
    name = _short(table)
    # printed for the user, not run here
    query = (f"SELECT status, count(*) AS n, sum(total) AS total FROM {name} "  # noqa: S608
             f"WHERE NOT {DELETED} GROUP BY status ORDER BY n DESC") if name == "orders" \
        else f"SELECT count(*) FROM {name} WHERE NOT {DELETED}"  # noqa: S608
    return (f"{py} -c \"import duckdb, deltalake; "
            f"{name} = deltalake.DeltaTable('{path}').to_pyarrow_dataset(); "
            f"duckdb.sql('{query}').show()\"")


def run_demo(opts: DemoOptions, *, stop: threading.Event | None = None,
             out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code (see the module docstring)."""
    if opts.duration_s < 0:
        raise ConfigError("--duration must be >= 0 seconds")
    demo = Demo(opts, demo_for(opts.engine), stop=stop or threading.Event(), out=out)
    result = demo.run()
    if result.error is not None:
        demo.say(f"demo failed: {result.error}")
    elif result.interrupted:
        demo.say("demo interrupted")
    tables = tuple(r.table for r in result.tables if r.delta_rows is not None)
    if tables and (demo.lake / STATE_FILE).exists():
        demo.say("")
        demo.say(f"The Delta tables stay in {demo.lake} (one folder per table; soft-deleted rows "
                 f"have {DELETED} = true). Query them with DuckDB:")
        demo.say("  " + how_to_query(demo.lake, tables))
    return result.exit_code

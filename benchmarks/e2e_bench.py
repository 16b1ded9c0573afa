"""End to end: rows/s from a PostgreSQL WAL backlog into Delta, beside `pg_recvlogical`.

The issue's target: for 1M inserts made in 1000-row transactions, the engine (slot -> decode ->
batch -> Delta commit, exactly once) reaches **at least 0.8x the rate at which `pg_recvlogical`
reads the same changes in the same run**, with a **peak RSS under 512 MB**.

What it does:
1. starts a throwaway `TempCluster` (wal_level=logical, max_wal_size 4GB, default
   logical_decoding_work_mem), unless `--dsn` names an existing server (superuser; loopback);
2. creates `public.e2e_bench(id bigint primary key, customer int, amount numeric(12,2),
   note text (40 chars), created_at timestamptz)`, enables CDC with `cdcengine.api.enable_cdc`
   and runs the `Pipeline` once until it streams, so the (empty) snapshot is done and the
   engine's slot is positioned; then stops it;
3. copies the engine's slot (`pg_copy_logical_replication_slot`) to a baseline slot, so both
   start at the same confirmed position, and only then inserts `--rows` rows in
   `--txn-rows`-row transactions (one DO block, COMMIT per transaction) while nothing consumes:
   both readers face the same WAL backlog; the end LSN is `pg_current_wal_insert_lsn()`;
4. baseline leg: `pg_recvlogical --start --no-loop -E <end> -f /dev/null -o proto_version=1
   -o publication_names=<pub>` on the copied slot (timed from process start to exit);
5. engine leg: a child process (this script's hidden `_engine` sub-command) runs
   `Pipeline(src).run(stop)`; the clock runs from the `run()` call until the `on_batch` callback
   sees `RunStats.rows` reach `--rows` (the batch's Delta commit is then durable); the child
   reports its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`), so the figure is the engine's
   only -- data generation and pg_recvlogical run in other processes;
6. prints rows, seconds, rows/s of both, the ratio, the peak RSS and PASS/MISS against the
   targets; `--json` prints the same as one JSON object. The walsender's CPU seconds are sampled
   for both legs (the walsender is the baseline's limit: research §4b/§4c); for the engine also
   the reading thread's own CPU seconds (`time.thread_time` of the thread that runs `run()`)
   and its RSS every 20 ms (when the peak happened, and the peak so far at each batch).

Fairness notes: both legs read a backlog written just before, so its WAL is in the OS page cache
for both (warm; `--engine-first` swaps the order). The engine asks for pgoutput proto 2 with
streaming, pg_recvlogical for proto 1 (as in research §4b); with 1000-row transactions and the
default 64MB logical_decoding_work_mem nothing is streamed, so the server does the same work.
The engine runs with the SPEC defaults (flush_interval_ms 1000, max_batch_rows 200000,
max_batch_mb 256, consolidated tables) unless flags say otherwise, and logs at INFO to stderr
like the daemon.

    .venv/bin/python benchmarks/e2e_bench.py [--rows 1000000] [--txn-rows 1000]
        [--flush-interval-ms N] [--max-batch-rows N] [--max-batch-mb N]
        [--catchup-threshold-mb N] [--catchup-chunk-mb N]
        [--table-mode consolidated|append|both] [--baseline-runs 1] [--engine-first]
        [--profile] [--profile-top 25] [--json] [--dsn URL] [--workdir DIR] [--keep]
        [--timeout 900]

`--profile` runs the engine leg under cProfile (slower: read the profile, not the rate) and
prints the top functions by cumulative and by own time. `--dsn` uses an existing server's
database (superuser); the benchmark drops its table, slots and publication afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from stream_bench import WalsenderCpu  # same folder: scripts run from benchmarks/

TARGET_RATIO = 0.8
TARGET_RSS_MB = 512.0
TABLE = "public.e2e_bench"
SOURCE_NAME = "e2e_bench"
RECV_SLOT = "e2e_bench_recv"
BASE_SLOT = "e2e_bench_base"

_SCHEMA = (
    "CREATE TABLE public.e2e_bench (id bigint PRIMARY KEY, customer int, amount numeric(12,2),"
    " note text, created_at timestamptz)"
)
# One DO block, COMMIT after every transaction's rows (procedure-level transaction control):
# small transactions without a client round trip each.
_LOAD = """
DO $$
DECLARE lo bigint;
BEGIN
  FOR i IN 0 .. {txns} - 1 LOOP
    lo := i::bigint * {txn_rows};
    INSERT INTO public.e2e_bench
      SELECT g, (g % 100000)::int, ((g * 7919) % 10000000) / 100.0,
             substr(md5(g::text) || md5((g + 7)::text), 1, 40),
             timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'
      FROM generate_series(lo + 1, lo + {txn_rows}) g;
    COMMIT;
  END LOOP;
END $$
"""


# ---- shared helpers -----------------------------------------------------------------------


def _one(
    conn: psycopg.Connection[tuple[Any, ...]], sql: str, params: list[Any] | None = None
) -> Any:
    row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def _drop_slot(admin: psycopg.Connection[tuple[Any, ...]], name: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                [name],
            )
            return
        except psycopg.errors.ObjectInUse:  # pitfall 13: the walsender is still exiting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# ---- the engine leg (child process) -------------------------------------------------------


class _ThreadProfiles:
    """cProfile for the calling thread and every thread started while it runs (the pipeline's
    Delta writer thread): `threading.setprofile` makes each new thread swap in its own profiler
    on its first call. Reported per thread, because their times overlap."""

    def __init__(self) -> None:
        import cProfile

        self._cls = cProfile.Profile
        self._lock = threading.Lock()
        self.profiles: list[tuple[str, Any]] = []

    def _hook(self, *_: object) -> None:
        sys.setprofile(None)
        prof = self._cls()
        with self._lock:
            self.profiles.append((threading.current_thread().name, prof))
        prof.enable()

    def start(self) -> None:
        threading.setprofile(self._hook)
        prof = self._cls()
        self.profiles.append(("main (reader)", prof))
        prof.enable()

    def stop(self) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        self.profiles[0][1].disable()

    def report(self, top: int, dump_prefix: str) -> None:
        import pstats

        for i, (name, prof) in enumerate(self.profiles):
            prof.create_stats()
            if not prof.stats:
                continue
            prof.dump_stats(f"{dump_prefix}.{i}")
            for key in ("cumulative", "tottime"):
                print(
                    f"\n==== engine profile, thread {name!r}: top {top} by {key} ====",
                    file=sys.stderr,
                )
                pstats.Stats(prof, stream=sys.stderr).sort_stats(key).print_stats(top)


def engine_child() -> int:
    """Hidden sub-command: read the job (JSON, with the DSN) from stdin, run the pipeline until
    `rows` rows are in Delta, write the result JSON to the job's `result` path."""
    job = json.loads(sys.stdin.read())
    import logging

    from cdcengine.config import SourceConfig
    from cdcengine.pipeline.pipeline import Pipeline, RunStats
    from cdcengine.serve.logs import configure_logging

    src = SourceConfig(**job["source"])
    configure_logging(fmt="console", level=logging.INFO, secrets=src.secrets())
    target = int(job["rows"])
    stop = threading.Event()
    marks: dict[str, float] = {}
    batches: list[tuple[float, int]] = []

    def on_batch(batch: object, stats: RunStats) -> None:
        now = time.perf_counter()
        batches.append((now, stats.rows, rss_peak[0]))
        marks.setdefault("first_batch", now)
        if stats.rows >= target and "done" not in marks:
            marks["done"] = now
            stop.set()

    def watchdog() -> None:
        if not stop.wait(float(job["timeout_s"])):
            marks["timed_out"] = time.perf_counter()
            stop.set()

    rss_peak = [0.0, 0.0]  # MB, seconds after run() started

    def rss_sampler() -> None:
        """Resident set size every 20 ms, to tell when the peak happens (ru_maxrss does not)."""
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as statm:
            while not stop.wait(0.02):
                statm.seek(0)
                rss = int(statm.read().split()[1]) * page_mb
                if rss > rss_peak[0]:
                    rss_peak[:] = [rss, time.perf_counter() - t0]

    pipeline = Pipeline(
        src, state=job["state"], spill_dir=Path(job["spill_dir"]), on_batch=on_batch
    )
    threading.Thread(target=watchdog, daemon=True).start()
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    profiles = _ThreadProfiles() if job["profile"] else None
    t0 = time.perf_counter()
    if os.path.exists("/proc/self/statm"):
        threading.Thread(target=rss_sampler, daemon=True).start()
    reader_cpu0 = time.thread_time()  # run() reads the stream on this thread
    if profiles is not None:
        profiles.start()
    try:
        stats = pipeline.run(stop)
    finally:
        if profiles is not None:
            profiles.stop()
    t_end = time.perf_counter()
    cpu = time.process_time() - cpu0
    reader_cpu = time.thread_time() - reader_cpu0
    result = {
        "rows": stats.rows,
        "batches": stats.batches,
        "transactions": stats.transactions,
        "seconds": (marks["done"] - t0) if "done" in marks else None,
        "first_batch_s": (marks["first_batch"] - t0) if "first_batch" in marks else None,
        "run_return_s": t_end - t0,
        "cpu_s": cpu,
        "reader_cpu_s": reader_cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sampled_peak_rss": [round(rss_peak[0]), round(rss_peak[1], 2)],
        "rss_before_run_mb": rss_before_kb / 1024,
        "timed_out": "timed_out" in marks,
        "batch_marks": [(round(t - t0, 3), n, round(peak)) for t, n, peak in batches],
    }
    Path(job["result"]).write_text(json.dumps(result))
    if profiles is not None:
        profiles.report(int(job["profile_top"]), job["result"] + ".prof")
    return 0


# ---- the parent ---------------------------------------------------------------------------


@dataclass
class Leg:
    name: str
    rows: int
    seconds: float
    walsender_cpu_s: float
    client_cpu_s: float
    runs: list[float]

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


@dataclass
class Server:
    dsn: str  # superuser libpq URL
    host: str
    port: int
    user: str
    dbname: str
    password: str | None
    bindir: Path | None
    version: int


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[Server]:
    from cdcengine_postgres.testing.cluster import TempCluster, find_bindir

    if args.dsn:
        info = psycopg.conninfo.conninfo_to_dict(args.dsn)
        with psycopg.connect(args.dsn) as conn:
            version = conn.info.server_version
        try:
            bindir: Path | None = find_bindir()
        except Exception:  # noqa: BLE001 - fall back to PATH for pg_recvlogical
            bindir = None
        yield Server(
            dsn=args.dsn,
            host=str(info.get("host", "127.0.0.1")),
            port=int(info.get("port", 5432)),
            user=str(info.get("user", "postgres")),
            dbname=str(info.get("dbname", "postgres")),
            password=str(info["password"]) if info.get("password") else None,
            bindir=bindir,
            version=version,
        )
        return
    settings = {"max_wal_size": "4GB", "shared_buffers": "512MB"}
    with TempCluster(settings) as cluster:
        yield Server(
            dsn=cluster.admin_dsn,
            host=cluster.host,
            port=cluster.port,
            user=cluster.superuser,
            dbname="postgres",
            password=cluster.password,
            bindir=cluster.bindir,
            version=cluster.version,
        )


def _recvlogical_bin(srv: Server) -> str:
    if srv.bindir is not None and (srv.bindir / "pg_recvlogical").exists():
        return str(srv.bindir / "pg_recvlogical")
    found = shutil.which("pg_recvlogical")
    if not found:
        raise SystemExit("pg_recvlogical not found (server bindir or PATH)")
    return found


def run_recvlogical(
    srv: Server,
    admin: psycopg.Connection[tuple[Any, ...]],
    publication: str,
    end_lsn: str,
    rows: int,
    runs: int,
) -> Leg:
    """`runs` timed reads of the backlog, each on a fresh copy of the base slot; median."""
    seconds: list[float] = []
    walsender: list[float] = []
    client: list[float] = []
    conninfo = f"host={srv.host} port={srv.port} user={srv.user} dbname={srv.dbname}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if srv.password:
        env["PGPASSWORD"] = srv.password  # not on the command line (ps)
    for _ in range(runs):
        _drop_slot(admin, RECV_SLOT)
        admin.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", [BASE_SLOT, RECV_SLOT])
        cmd = [
            _recvlogical_bin(srv), "-d", conninfo, "-S", RECV_SLOT, "--start", "--no-loop",
            "-E", end_lsn, "-f", "/dev/null",
            "-o", "proto_version=1", "-o", f"publication_names={publication}",
        ]  # fmt: skip
        sampler = WalsenderCpu(srv.dsn, RECV_SLOT)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.start()
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        walsender.append(sampler.stop())
        client.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    _drop_slot(admin, RECV_SLOT)
    return Leg(
        "pg_recvlogical -> /dev/null",
        rows,
        statistics.median(seconds),
        statistics.median(walsender),
        statistics.median(client),
        seconds,
    )


def run_engine(
    srv: Server, source: dict[str, Any], slot: str, work: Path, args: argparse.Namespace
) -> tuple[Leg, dict[str, Any]]:
    result_path = work / "engine_result.json"
    result_path.unlink(missing_ok=True)
    job = {
        "source": source,
        "state": "sqlite:///" + str(work / "state.db"),
        "spill_dir": str(work / "spill"),
        "rows": args.rows,
        "timeout_s": args.timeout,
        "result": str(result_path),
        "profile": args.profile,
        "profile_top": args.profile_top,
    }
    sampler = WalsenderCpu(srv.dsn, slot)
    sampler.start()
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_engine"], stdin=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    child.stdin.write(json.dumps(job))
    child.stdin.close()
    try:
        code = child.wait(timeout=args.timeout + 120)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    walsender = sampler.stop()
    if code != 0 or not result_path.exists():
        raise SystemExit(f"engine leg failed (exit code {code})")
    res = json.loads(result_path.read_text())
    if res["timed_out"] or res["seconds"] is None:
        raise SystemExit(
            f"engine leg did not reach {args.rows} rows in {args.timeout}s (got {res['rows']})"
        )
    leg = Leg(
        "cdcengine -> Delta", args.rows, res["seconds"], walsender, res["cpu_s"], [res["seconds"]]
    )
    return leg, res


def prepare(
    srv: Server, admin: psycopg.Connection[tuple[Any, ...]], work: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], str, str]:
    """Table, CDC enabled, the empty snapshot taken and streaming reached once (engine stopped
    again); the baseline's base slot copied from the engine's slot. Returns the source kwargs,
    the engine slot's name and the publication's name."""
    from cdcengine import api
    from cdcengine.config import SourceConfig
    from cdcengine.pipeline.pipeline import Pipeline
    from cdcengine.state import open_state
    from cdcengine.state.base import SourceState

    admin.execute(_SCHEMA)
    source: dict[str, Any] = {
        "name": SOURCE_NAME,
        "dsn": srv.dsn,
        "tables": [TABLE],
        "destination": str(work / "lake"),
        "table_mode": args.table_mode,
    }
    for key in ("flush_interval_ms", "max_batch_rows", "max_batch_mb", "catchup_threshold_mb",
                "catchup_chunk_mb"):
        if getattr(args, key) is not None:
            source[key] = getattr(args, key)
    src = SourceConfig(**source)
    state = "sqlite:///" + str(work / "state.db")
    api.enable_cdc(src, state=state)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Pipeline(src, state=state, spill_dir=work / "spill").run(stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    store = open_state(state)
    try:
        deadline = time.monotonic() + 60
        while not errors:
            rec = store.get_source(src.name)
            if rec is not None and rec.state is SourceState.STREAMING:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the engine did not reach streaming within 60 s")
            time.sleep(0.1)
    finally:
        store.close()
        stop.set()
        thread.join(60)
    if errors:
        raise errors[0]
    _drop_slot(admin, BASE_SLOT)
    admin.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", [src.slot_name, BASE_SLOT])
    return source, src.slot_name, src.publication_name


def cleanup_db(srv: Server, source: dict[str, Any] | None, work: Path) -> None:
    """Only matters with --dsn (a TempCluster is deleted whole)."""
    from cdcengine import api
    from cdcengine.config import SourceConfig

    with psycopg.connect(srv.dsn, autocommit=True) as admin:
        for slot in (RECV_SLOT, BASE_SLOT):
            with contextlib.suppress(psycopg.Error):
                _drop_slot(admin, slot)
        if source is not None:
            with contextlib.suppress(Exception):
                api.disable_cdc(SourceConfig(**source), state="sqlite:///" + str(work / "state.db"))
        admin.execute("DROP TABLE IF EXISTS public.e2e_bench")


def _commit() -> str:
    """The repository's HEAD, with +dirty when src/ or adapters/ have uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src", "adapters"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    args: argparse.Namespace,
    srv: Server,
    base: Leg,
    eng: Leg,
    res: dict[str, Any],
    load_s: float,
    wal_mb: float,
    order: str,
    loads: dict[str, float],
) -> dict[str, Any]:
    ratio = eng.rate / base.rate
    rss = float(res["peak_rss_mb"])
    out = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "postgres": srv.version,
        "rows": args.rows,
        "txn_rows": args.txn_rows,
        "table_mode": args.table_mode,
        "profile": args.profile,
        "load_s": round(load_s, 2),
        "wal_mb": round(wal_mb, 1),
        "order": order,
        "commit": _commit(),
        "loadavg_1m_before": loads,
        "baseline": asdict(base) | {"rows_per_s": round(base.rate)},
        "engine": asdict(eng)
        | {"rows_per_s": round(eng.rate)}
        | {
            k: res[k]
            for k in (
                "batches",
                "transactions",
                "first_batch_s",
                "run_return_s",
                "peak_rss_mb",
                "rss_before_run_mb",
                "reader_cpu_s",
                "sampled_peak_rss",
                "batch_marks",
            )
        },
        "ratio": round(ratio, 3),
        "ratio_target": TARGET_RATIO,
        "ratio_ok": ratio >= TARGET_RATIO,
        "rss_target_mb": TARGET_RSS_MB,
        "rss_ok": rss < TARGET_RSS_MB,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    print()
    profiled = "; PROFILED (rate not representative)" if args.profile else ""
    print(
        f"PostgreSQL {srv.version}, {os.cpu_count()} CPUs; {args.rows:,} rows in "
        f"{args.txn_rows}-row transactions (load {load_s:.1f}s, WAL {wal_mb:.0f} MB); "
        f"table_mode={args.table_mode}{profiled}"
    )
    print(
        f"order: {order}; both legs read a backlog written just before (WAL warm in the "
        "page cache for both)"
    )
    print(
        f"code: {out['commit']}; 1-min load average before each leg: "
        + ", ".join(f"{k} {v}" for k, v in loads.items())
        + f" ({os.cpu_count()} CPUs; anything above ~1.5 means other work shared them)"
    )
    print()
    print(
        f"| {'reader':28s} | {'rows':>9s} | {'seconds':>7s} | {'rows/s':>9s} | "
        f"{'walsender CPU s':>15s} | {'client CPU s':>12s} |"
    )
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 17}|{'-' * 14}|")
    for leg in (base, eng):
        print(
            f"| {leg.name:28s} | {leg.rows:>9,} | {leg.seconds:>7.2f} | {leg.rate:>9,.0f} | "
            f"{leg.walsender_cpu_s:>15.1f} | {leg.client_cpu_s:>12.1f} |"
        )
    print()
    if len(base.runs) > 1:
        print(f"baseline runs: {[round(s, 2) for s in base.runs]} (median used)")
    print(
        f"engine: {res['batches']} batches, first batch durable after "
        f"{res['first_batch_s']:.2f}s; RSS after imports {res['rss_before_run_mb']:.0f} MB; "
        f"reading thread CPU {res['reader_cpu_s']:.1f}s of {eng.client_cpu_s:.1f}s"
    )
    peak_mb, peak_at = res["sampled_peak_rss"]
    print(
        f"engine RSS sampled every 20 ms: peak {peak_mb} MB at {peak_at:.1f}s; batches "
        "durable at (s, rows so far, peak RSS MB so far): "
        + ", ".join(f"{t:.1f}/{n:,}/{mb}" for t, n, mb in res["batch_marks"])
    )
    print(
        f"ratio engine/baseline: {ratio:.2f}  (target >= {TARGET_RATIO})  "
        f"{_verdict(ratio >= TARGET_RATIO)}"
    )
    print(
        f"engine peak RSS: {rss:.0f} MB  (target < {TARGET_RSS_MB:.0f} MB)  "
        f"{_verdict(rss < TARGET_RSS_MB)}"
    )
    return out


def main(argv: list[str]) -> int:
    if argv[1:2] == ["_engine"]:
        return engine_child()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--txn-rows", type=int, default=1000)
    p.add_argument("--flush-interval-ms", dest="flush_interval_ms", type=int)
    p.add_argument("--max-batch-rows", dest="max_batch_rows", type=int)
    p.add_argument("--max-batch-mb", dest="max_batch_mb", type=int)
    p.add_argument("--catchup-threshold-mb", dest="catchup_threshold_mb", type=int,
                   help="0: stream the backlog; default: catch up through SQL peeks (issue 15)")
    p.add_argument("--catchup-chunk-mb", dest="catchup_chunk_mb", type=int)
    p.add_argument(
        "--table-mode", default="consolidated", choices=["consolidated", "append", "both"]
    )
    p.add_argument(
        "--baseline-runs",
        type=int,
        default=1,
        help="pg_recvlogical runs on fresh slot copies (median)",
    )
    p.add_argument("--engine-first", action="store_true", help="run the engine leg first")
    p.add_argument("--profile", action="store_true", help="cProfile the engine leg")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dsn", help="existing server (superuser DSN) instead of a TempCluster")
    p.add_argument("--workdir", type=Path, help="lake/state/spill here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--timeout", type=float, default=900.0, help="engine leg limit, seconds")
    args = p.parse_args(argv[1:])
    if args.rows % args.txn_rows:
        raise SystemExit("--rows must be a multiple of --txn-rows")

    import logging

    from cdcengine.serve.logs import configure_logging

    configure_logging(fmt="console", level=logging.WARNING)  # the set-up phase: quiet, stderr
    work = Path(tempfile.mkdtemp(prefix="cdcengine-e2e-", dir=args.workdir))
    (work / "spill").mkdir()
    source: dict[str, Any] | None = None
    say = (
        (lambda *a: print(*a, file=sys.stderr, flush=True))
        if args.json
        else (lambda *a: print(*a, flush=True))
    )
    try:
        with server(args) as srv, psycopg.connect(srv.dsn, autocommit=True) as admin:
            try:
                say(f"server PostgreSQL {srv.version}; work dir {work}")
                source, slot, pub = prepare(srv, admin, work, args)
                start_lsn = _one(
                    admin,
                    "SELECT confirmed_flush_lsn::text FROM "
                    "pg_replication_slots WHERE slot_name = %s",
                    [slot],
                )
                t0 = time.perf_counter()
                admin.execute(_LOAD.format(txns=args.rows // args.txn_rows, txn_rows=args.txn_rows))
                load_s = time.perf_counter() - t0
                end_lsn = _one(admin, "SELECT pg_current_wal_insert_lsn()::text")
                wal_mb = (
                    _one(admin, "SELECT (%s::pg_lsn - %s::pg_lsn)::float8", [end_lsn, start_lsn])
                    / 2**20
                )
                say(
                    f"backlog: {args.rows:,} rows in {load_s:.1f}s, WAL {start_lsn} -> "
                    f"{end_lsn} ({wal_mb:.0f} MB)"
                )
                legs: dict[str, Any] = {}
                loads: dict[str, float] = {}
                order = (
                    ["engine", "pg_recvlogical"]
                    if args.engine_first
                    else ["pg_recvlogical", "engine"]
                )
                for name in order:
                    loads[name] = round(os.getloadavg()[0], 2)
                    say(f"running {name} leg ... (1-min load average {loads[name]})")
                    if name == "engine":
                        legs[name] = run_engine(srv, source, slot, work, args)
                        say(f"  engine: {legs[name][0].seconds:.2f}s")
                    else:
                        legs[name] = run_recvlogical(
                            srv, admin, pub, end_lsn, args.rows, args.baseline_runs
                        )
                        say(f"  pg_recvlogical: {legs[name].runs}")
                eng, res = legs["engine"]
                report(
                    args,
                    srv,
                    legs["pg_recvlogical"],
                    eng,
                    res,
                    load_s,
                    wal_mb,
                    " then ".join(order),
                    loads,
                )
            finally:
                if args.dsn:
                    admin.close()
                    cleanup_db(srv, source, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

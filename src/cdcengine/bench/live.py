"""The live workloads of `cdcengine bench`: the engine runs while the source is written.

* latency: pgbench-style one-row transactions at a fixed rate; commit→visible per source
  transaction = the Delta commit time of the first commit that made it durable minus its source
  commit time (`_cdc_committed_at` in the change log), p50/p95/p99 — never a per-batch metric.
* steady: random updates/deletes at a fixed rate on a large table for a while; Delta lag over
  time (seconds behind the source's WAL, and bytes).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from cdcengine.bench.context import Bench, loadavg
from cdcengine.bench.engine import EngineSource
from cdcengine.bench.procs import timed_run
from cdcengine.bench.stats import (
    GOALS,
    commit_to_visible,
    lag_growth,
    lag_series,
    merge_seconds,
    percentile,
    summary,
)

SCHEMA = "public"


def _engine(bench: Bench, name: str, table: str, mode: str) -> EngineSource:
    es = EngineSource(name=name, workdir=bench.workdir, dsn=bench.source.dsn, table=table,
                      mode=mode, settings=dict(bench.options.engine_settings))
    es.enable()
    bench.progress(name, f"engine primed ({es.prime(timeout_s=bench.options.timeout_s):.1f} s)")
    return es


def _settle(seconds: float, proc_started: float) -> None:
    """Give the engine process `seconds` from its start to be streaming before the load."""
    pause = proc_started + seconds - time.monotonic()
    if pause > 0:
        time.sleep(pause)


def latency(bench: Bench) -> dict[str, Any]:
    o, src = bench.options, bench.source
    table = f"{SCHEMA}.bench_latency"
    src.drop_slots("bench_latency_")
    rows = min(o.latency_rows, o.rows)
    bench.progress("latency", f"creating {table} with {rows:,} rows")
    src.create_table(table, rows)
    reps: list[dict[str, Any]] = []
    all_lat: list[float] = []
    for rep in range(o.repeat):
        es = _engine(bench, f"bench_latency_{rep}", table, "both")
        state: dict[str, Any] = {}
        finished = threading.Event()
        started = time.monotonic()

        def load(es: EngineSource = es, state: dict[str, Any] = state,
                 finished: threading.Event = finished, started: float = started) -> None:
            try:
                _settle(5.0, started)
                state["load"] = src.latency_load(table, rate=o.latency_rate,
                                                 seconds=o.latency_seconds)
                state["marker"] = src.update_delete_backlog(table, 1, 0)
            except Exception as exc:  # noqa: BLE001 - reported as the leg's failure
                state["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                finished.set()

        def done(es: EngineSource = es, state: dict[str, Any] = state,
                 finished: threading.Event = finished) -> bool:
            if not finished.is_set():
                return False
            if "error" in state:
                return True
            return es.caught_up(state["marker"].floor_lsn)()

        bench.progress("latency", f"rep {rep + 1}: engine running, load {o.latency_rate}/s for "
                                  f"{o.latency_seconds:.0f} s")
        before = loadavg()
        worker = threading.Thread(target=load, name="bench-latency-load", daemon=True)
        worker.start()
        run = timed_run(es.command(), done=done, timeout_s=o.latency_seconds + o.timeout_s,
                        log=es.log_path(f"latency-{rep}"), poll_s=0.5)
        worker.join()
        check: dict[str, Any] | None = None
        lat: list[float] = []
        if "error" in state:
            check = {"ok": False, "error": state["error"]}
        elif run.reached:
            check = es.verify(bench.source_checksum(table), log_ops=False)
            lakes = es.lakes()
            txns = lakes["append"].transactions()
            lat = commit_to_visible(txns, lakes["consolidated"].commit_positions())
            # every load transaction (and the closing marker) is in the change log, once
            expected = _processed(state["load"]) + 1
            check["transactions"] = {"change_log": len(txns), "source": expected}
            check["all_visible"] = len(lat) == len(txns)
            check["ok"] = bool(check["ok"]) and len(lat) == len(txns) == expected
        entry = bench.record(
            "latency", leg="engine", label="both", rep=rep, run=run,
            changes=len(lat), load_before=before, check=check,
            extra={"load": state.get("load"),
                   "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95),
                                 "p99": percentile(lat, 99), "max": max(lat, default=None),
                                 "n": len(lat)}})
        entry["rate"] = None  # a latency leg has no throughput figure
        reps.append(entry)
        all_lat += lat
        if entry["ok"]:
            (bench.out / f"latency-{rep}.txt").write_text(
                "\n".join(f"{x:.4f}" for x in lat) + "\n")
    p99s = [r["latency_s"]["p99"] for r in reps if r["ok"] and r["latency_s"]["p99"] is not None]
    med_p99 = summary(p99s)["median"]
    return {"rate": o.latency_rate, "seconds": o.latency_seconds,
            "latency_s": {"p50": percentile(all_lat, 50), "p95": percentile(all_lat, 95),
                          "p99": percentile(all_lat, 99), "n": len(all_lat)},
            "p99_per_rep": summary(p99s), "histogram_s": _histogram(all_lat),
            "goals": [GOALS["latency.p99"].evaluate(med_p99)],
            "note": "commit→visible per source transaction into the consolidated table "
                    "(Delta commit time − source commit time; the change log lists the "
                    "transactions)"}


def _processed(load: dict[str, Any]) -> int:
    """Transactions pgbench reports as processed (-1 when it does not say)."""
    for line in load.get("summary", []):
        if line.startswith("number of transactions actually processed"):
            return int(line.split(":", 1)[1].split("/")[0].strip())
    return -1


def _histogram(values: list[float], bins: int = 40) -> list[list[float]]:
    if not values:
        return []
    hi = max(values)
    width = hi / bins if hi > 0 else 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width))] += 1
    return [[round(i * width, 4), c] for i, c in enumerate(counts)]


def steady(bench: Bench) -> dict[str, Any]:
    o, src = bench.options, bench.source
    table = f"{SCHEMA}.bench_steady"
    src.drop_slots("bench_steady_")
    bench.progress("steady", f"creating {table} with {o.steady_rows:,} rows")
    src.create_table(table, o.steady_rows)
    es = _engine(bench, "bench_steady_0", table, "consolidated")
    lake = es.lakes()["consolidated"]
    stop = threading.Event()
    state: dict[str, Any] = {}
    applied: list[tuple[float, int]] = []
    finished = threading.Event()
    started = time.monotonic()
    last = [0.0]

    def load() -> None:
        try:
            _settle(5.0, started)
            state["stats"] = src.steady_load(table, rate=o.steady_rate,
                                             seconds=o.steady_seconds, stop=stop)
            state["marker"] = src.update_delete_backlog(table, 1, 0)
        except Exception as exc:  # noqa: BLE001 - reported as the leg's failure
            state["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            finished.set()

    def sample(_: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            top = lake.max_lsn()
            if top is not None:
                applied.append((now, top))

    def done() -> bool:
        if not finished.is_set():
            return False
        return "error" in state or es.caught_up(state["marker"].floor_lsn)()

    bench.progress("steady", f"engine running, {o.steady_rate:,} changes/s for "
                             f"{o.steady_seconds:.0f} s")
    before = loadavg()
    worker = threading.Thread(target=load, name="bench-steady-load", daemon=True)
    worker.start()
    run = timed_run(es.command(), done=done, timeout_s=o.steady_seconds + o.timeout_s,
                    log=es.log_path("steady"), poll_s=0.2, on_poll=sample)
    stop.set()
    worker.join()
    stats = state.get("stats")
    check: dict[str, Any] | None
    if "error" in state or stats is None or stats.error:
        check = {"ok": False, "error": state.get("error") or (stats.error if stats else "?")}
    else:
        check = es.verify(bench.source_checksum(table)) if run.reached else None
    series = lag_series(stats.wal if stats else [], applied)
    t0 = started
    lag_s = [s for _, s, _ in series]
    changes = (stats.updates + stats.deletes) if stats else 0
    entry = bench.record("steady", leg="engine", label="consolidated", rep=0, run=run,
                         changes=changes, load_before=before, check=check,
                         extra={"lag": [[round(t - t0, 2), round(s, 3), b] for t, s, b in series]})
    entry["rate"] = None
    achieved = changes / stats.seconds if stats and stats.seconds else None
    # one merge's time: the median consolidated commit of the run (from the engine's log);
    # the lag's p99 stands for commit→visible (a change is visible once the applied position
    # passes it, and the lag is how old the applied position is)
    log_path = es.log_path("steady")
    merges = merge_seconds(log_path.read_text(errors="replace")) if log_path.exists() else []
    merge_s = statistics.median(merges) if merges else None
    p99 = percentile(lag_s, 99)
    load_from = min((t for t, _ in stats.wal), default=t0) if stats else t0  # load's start
    growth = lag_growth([(t - load_from, s) for t, s, _ in series], after=60.0,
                        until=o.steady_seconds)
    # after the first minute: the start (first merges into the fresh snapshot's files, the
    # source still busy from loading the table) is reported apart from the steady state
    p99_late = percentile([s for t, s, _ in series if t - load_from > 60.0], 99)
    goals = [GOALS["steady.p99"].evaluate(p99 / merge_s if p99 is not None and merge_s
                                          else None),
             GOALS["steady.growth"].evaluate(growth)]
    return {"rows": o.steady_rows, "target_rate": o.steady_rate, "achieved_rate": achieved,
            "seconds": o.steady_seconds,
            "lag_s": {"max": max(lag_s, default=None), "p95": percentile(lag_s, 95),
                      "p99": p99, "p99_after_60s": p99_late,
                      "final": lag_s[-1] if lag_s else None},
            "merge_s": {"n": len(merges), "median": merge_s,
                        "max": max(merges, default=None)},
            "lag_growth": growth, "goals": goals, "ok": entry["ok"]}


__all__ = ["latency", "steady"]

"""The backlog workloads of `cdcengine bench`: insert, mixed, bigtxn, catchup (a WAL backlog
read by every consumer), snapshot (pre-existing rows) and merge (10k changes into a small and a
10× larger table).

Fairness, for every backlog workload: all consumers' slots exist before the backlog is written
(each engine repetition is its own source, enabled and primed first; each baseline repetition
its own slot), so each reads the same WAL; the order of baseline and engine alternates between
repetitions; every engine leg is checked against the source (a wrong result fails the run).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cdcengine.bench.context import Bench, loadavg
from cdcengine.bench.engine import EngineSource
from cdcengine.bench.source import Backlog
from cdcengine.bench.stats import GOALS, ratio, summary

SCHEMA = "public"
#: The source setting that picks the read path: 0 = the streaming protocol only.
STREAM_ONLY = ("catchup_threshold_mb", 0)


def _median_rate(legs: Sequence[dict[str, Any]]) -> float | None:
    rates = [leg["rate"] for leg in legs if leg.get("rate")]
    return statistics.median(rates) if rates else None


def _figure(legs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [leg for leg in legs if leg["ok"]]
    return {"rate": summary([leg["rate"] for leg in ok]),
            "seconds": summary([leg["seconds"] for leg in ok]),
            "peak_rss_mb": summary([leg["peak_rss_mb"] for leg in ok]),
            "runs": len(legs), "failed": len(legs) - len(ok)}


def catchup_setting(settings: dict[str, object]) -> str | None:
    """The engine's backlog catch-up config key in effect, if this engine has one."""
    from cdcengine.config import SourceConfig

    names = [f.name for f in dataclasses.fields(SourceConfig) if "catch" in f.name]
    for name in names:
        if name in settings:
            return f"{name} = {settings[name]!r}"
    return f"{names[0]} (engine default)" if names else None


BEFORE = "@before"  # label suffix of the `--before-python` build's legs


def _engines(bench: Bench, workload: str, table: str, modes: Sequence[str],
             reps: int, settings: Mapping[str, object] | None = None, *,
             before: bool = True) -> dict[tuple[str, int], EngineSource]:
    """Enable and prime one engine source per mode and repetition (before any backlog), and
    with `--before-python` one more per mode and repetition for that build (key `mode@before`).

    `settings`: the workload's own source settings (which read path it measures); the user's
    `--engine-setting` values win over them."""
    engines: dict[tuple[str, int], EngineSource] = {}
    builds = [("", None)] + ([(BEFORE, bench.options.before_python)]
                             if bench.options.before_python and before else [])
    for rep in range(reps):
        for mode in modes:
            for suffix, python in builds:
                es = EngineSource(name=f"bench_{workload}_{mode[:4]}{rep}{'b' if suffix else ''}",
                                  workdir=bench.workdir, dsn=bench.source.dsn, table=table,
                                  mode=mode, label=mode + suffix,
                                  settings={**(settings or {}), **bench.options.engine_settings},
                                  **({"python": python} if python else {}))
                es.enable()
                seconds = es.prime(timeout_s=bench.options.timeout_s)
                bench.progress(workload, f"engine source {es.name} enabled and primed "
                                         f"({seconds:.1f} s)")
                engines[(mode + suffix, rep)] = es
    return engines


def _engine_leg(bench: Bench, workload: str, es: EngineSource, rep: int, backlog: Backlog,
                checksum: dict[str, str], *, inserts_only: bool) -> dict[str, Any]:
    before = loadavg()
    bench.progress(workload, f"rep {rep + 1} engine {es.label} ...")
    run = es.run(es.caught_up(backlog.floor_lsn), leg=f"{workload}-{rep}",
                 timeout_s=bench.options.timeout_s)
    check = es.verify(checksum, ops=backlog.ops, inserts_only=inserts_only) if run.reached \
        else None
    return bench.record(workload, leg="engine", label=es.label, rep=rep, run=run,
                        changes=backlog.changes, load_before=before, check=check,
                        extra={"read_path": es.read_path(f"{workload}-{rep}")})


def _labels(bench: Bench, mode: str, rep: int) -> list[str]:
    """This build's and the before build's labels of a mode, in the order of repetition
    `rep` (alternating, like baseline and engine)."""
    if not bench.options.before_python:
        return [mode]
    return [mode, mode + BEFORE] if rep % 2 == 0 else [mode + BEFORE, mode]


def backlog_workload(
    bench: Bench, workload: str, *, table_rows: int, modes: Sequence[str],
    write: Callable[[str], Backlog], sql_decode: bool = False, inserts_only: bool = False,
    settings: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """A WAL backlog read by `pg_recvlogical` (and the SQL-decoding limit) and by the engine in
    each of `modes`, `--repeat` times, all from slots made before the backlog."""
    src, reps = bench.source, bench.options.repeat
    table = f"{SCHEMA}.bench_{workload}"
    prefix = f"bench_{workload}_"
    src.drop_slots(prefix)
    bench.progress(workload, f"creating {table} with {table_rows:,} rows")
    src.create_table(table, table_rows)
    pub = f"{prefix}pub"
    src.create_publication(pub, table)
    engines = _engines(bench, workload, table, modes, reps, settings)
    profilers = (_engines(bench, workload + "_prof", table, modes, 1, settings, before=False)
                 if bench.options.profile else {})
    for rep in range(reps):
        src.create_slot(f"{prefix}recv{rep}")
        if sql_decode:
            src.create_slot(f"{prefix}sql{rep}")
    bench.progress(workload, "writing the backlog (no consumer running)")
    backlog = write(table)
    checksum = bench.source_checksum(table)
    bench.progress(workload, f"backlog: {backlog.changes:,} changes {dict(backlog.ops)}")
    legs: list[dict[str, Any]] = []
    for rep in range(reps):
        def baselines(rep: int = rep) -> None:
            legs.append(bench.baseline(workload, "pg_recvlogical", rep, src.stream_baseline(
                f"{prefix}recv{rep}", pub, backlog.end_lsn), backlog.changes))
            if sql_decode:
                legs.append(bench.baseline(workload, "sql_decoding", rep, src.sql_decode_baseline(
                    f"{prefix}sql{rep}", pub), backlog.changes))

        if rep % 2 == 0:
            baselines()
        for mode in modes:
            for label in _labels(bench, mode, rep):
                legs.append(_engine_leg(bench, workload, engines[(label, rep)], rep, backlog,
                                        checksum, inserts_only=inserts_only))
        if rep % 2 == 1:
            baselines()
    result = _backlog_result(bench, workload, modes, legs, backlog, profilers)
    src.drop_slots(prefix)
    return result


def _backlog_result(bench: Bench, workload: str, modes: Sequence[str],
                    legs: list[dict[str, Any]], backlog: Backlog,
                    profilers: dict[tuple[str, int], EngineSource]) -> dict[str, Any]:
    base = [leg for leg in legs if leg["label"] == "pg_recvlogical"]
    base_rate = _median_rate(base)
    figures: dict[str, Any] = {"pg_recvlogical": _figure(base)}
    sql_legs = [leg for leg in legs if leg["label"] == "sql_decoding"]
    if sql_legs:
        figures["sql_decoding"] = _figure(sql_legs)
    goals = []
    for mode in [m + BEFORE for m in modes if any(leg["label"] == m + BEFORE for leg in legs)]:
        mine = [leg for leg in legs if leg["leg"] == "engine" and leg["label"] == mode]
        fig = _figure(mine)
        fig["ratio_vs_pg_recvlogical"] = ratio(_median_rate(mine), base_rate)
        figures[f"engine_{mode}"] = fig
    for mode in modes:
        mine = [leg for leg in legs if leg["leg"] == "engine" and leg["label"] == mode]
        fig = _figure(mine)
        was = [leg for leg in legs if leg["leg"] == "engine" and leg["label"] == mode + BEFORE]
        if was:
            fig["ratio_vs_before"] = ratio(_median_rate(mine), _median_rate(was))
        fig["read_path"] = "/".join(sorted({str(leg.get("read_path")) for leg in mine}))
        fig["ratio_vs_pg_recvlogical"] = ratio(_median_rate(mine), base_rate)
        if sql_legs:
            fig["ratio_vs_sql_decoding"] = ratio(_median_rate(mine), _median_rate(sql_legs))
        figures[f"engine_{mode}"] = fig
        key = workload if workload in ("bigtxn", "catchup") else f"{workload}.{mode}"
        if key in GOALS:
            goals.append(GOALS[key].evaluate(fig["ratio_vs_pg_recvlogical"]))
        if f"{workload}.rss" in GOALS:  # memory goals: bigtxn, insert, mixed
            rss = GOALS[f"{workload}.rss"].evaluate(fig["peak_rss_mb"]["max"])
            goals.append({**rss, "goal": f"{rss['goal']} ({mode})", "mode": mode})
    out: dict[str, Any] = {"changes": backlog.changes, "ops": dict(backlog.ops),
                           "figures": figures, "goals": goals}
    missed = [g for g in goals if g["met"] is False]
    if profilers and missed:
        profiles = {}
        for (mode, _), es in profilers.items():
            name = bench.profile(f"{workload}-{mode}", es.command(),
                                 es.caught_up(backlog.floor_lsn))
            profiles[mode] = name
        out["profiles"] = profiles
    return out


def insert(bench: Bench) -> dict[str, Any]:
    o = bench.options
    # the streaming protocol against its raw limit: the backlog catch-up path has a workload of
    # its own (`catchup`), so it is switched off here
    res = backlog_workload(bench, "insert", table_rows=0, modes=o.modes, inserts_only=True,
                           write=lambda t: bench.source.insert_backlog(t, o.rows, o.txn_rows),
                           settings={STREAM_ONLY[0]: STREAM_ONLY[1]})
    res["note"] = "streaming protocol only (`catchup_threshold_mb = 0`)"
    return res


def mixed(bench: Bench) -> dict[str, Any]:
    o = bench.options
    updates, deletes = max(1, o.rows // 10), max(1, o.rows // 100)
    res = backlog_workload(
        bench, "mixed", table_rows=o.rows, modes=[m for m in ("consolidated", "append")],
        write=lambda t: bench.source.update_delete_backlog(t, updates, deletes))
    res["note"] = (f"{updates:,} UPDATEs in one transaction, then {deletes:,} DELETEs in one "
                   f"transaction, on a {o.rows:,}-row table")
    return res


def bigtxn(bench: Bench) -> dict[str, Any]:
    o = bench.options
    res = backlog_workload(bench, "bigtxn", table_rows=0, modes=["consolidated"],
                           inserts_only=True,
                           write=lambda t: bench.source.insert_backlog(t, o.rows, o.rows))
    res["note"] = f"one transaction of {o.rows:,} inserted rows"
    return res


def catchup(bench: Bench) -> dict[str, Any]:
    o = bench.options
    # the catch-up path whatever the backlog's size (the engine's default threshold is 64 MB)
    res = backlog_workload(bench, "catchup", table_rows=0, modes=["consolidated"],
                           sql_decode=True, inserts_only=True,
                           write=lambda t: bench.source.insert_backlog(t, o.rows, o.txn_rows),
                           settings={STREAM_ONLY[0]: 1})
    setting = catchup_setting({STREAM_ONLY[0]: 1, **o.engine_settings})
    res["note"] = (f"engine catch-up path: {setting}" if setting else
                   "this engine has no backlog catch-up setting: the engine leg is plain "
                   "streaming")
    return res


def _snapshot_leg(bench: Bench, es: EngineSource, rep: int, size: int,
                  checksum: dict[str, str]) -> dict[str, Any]:
    before = loadavg()
    run = es.run(es.has_rows(size), leg=f"snapshot-{rep}", timeout_s=bench.options.timeout_s)
    check = es.verify(checksum) if run.reached else None
    return bench.record("snapshot", leg="engine", label=es.label, rep=rep, run=run,
                        changes=size, load_before=before, check=check, extra={"size": size})


def snapshot(bench: Bench) -> dict[str, Any]:
    """N pre-existing rows: the engine's first snapshot (enable, then `run` until Delta holds
    every row) vs `COPY … TO STDOUT (FORMAT binary)`."""
    o, src = bench.options, bench.source
    sizes = [o.rows, 10 * o.rows] if o.snapshot_large else [o.rows]
    out: dict[str, Any] = {"sizes": {}, "goals": []}
    mode = "consolidated"
    for size in sizes:
        name = f"snapshot{size}"
        table = f"{SCHEMA}.bench_{name}"
        src.drop_slots(f"bench_{name}_")
        bench.progress("snapshot", f"creating {table} with {size:,} rows")
        src.create_table(table, size)
        checksum = bench.source_checksum(table)
        legs: list[dict[str, Any]] = []
        for rep in range(o.repeat):
            engines = []
            for label in _labels(bench, mode, rep):
                was = label.endswith(BEFORE)
                es = EngineSource(name=f"bench_{name}_{rep}{'b' if was else ''}",
                                  workdir=bench.workdir, dsn=src.dsn, table=table, label=label,
                                  settings=dict(o.engine_settings),
                                  **({"python": o.before_python} if was and o.before_python
                                     else {}))
                es.enable()  # provisions the slot; the snapshot is the timed `run`
                engines.append(es)
            copy = src.copy_baseline(table)
            if rep % 2 == 0:
                legs.append(bench.baseline("snapshot", "copy_binary", rep, copy, size))
            legs += [_snapshot_leg(bench, es, rep, size, checksum) for es in engines]
            if rep % 2 == 1:
                legs.append(bench.baseline("snapshot", "copy_binary", rep, copy, size))
        base = [leg for leg in legs if leg["leg"] == "baseline"]
        fig: dict[str, Any] = {"copy_binary": _figure(base)}
        for label in (mode + BEFORE, mode):
            mine = [leg for leg in legs if leg["leg"] == "engine" and leg["label"] == label]
            if mine:
                fig[f"engine_{label}"] = _figure(mine)
                fig[f"engine_{label}"]["ratio_vs_copy"] = ratio(_median_rate(mine),
                                                                _median_rate(base))
        if f"engine_{mode}{BEFORE}" in fig:
            fig[f"engine_{mode}"]["ratio_vs_before"] = ratio(
                fig[f"engine_{mode}"]["rate"]["median"],
                fig[f"engine_{mode}{BEFORE}"]["rate"]["median"])
        out["sizes"][str(size)] = fig
        goal = GOALS["snapshot"].evaluate(fig["engine_consolidated"]["ratio_vs_copy"])
        out["goals"].append({**goal, "size": size})
        if o.profile and goal["met"] is False:  # the miss, explained: one more, profiled run
            es = EngineSource(name=f"bench_{name}_prof", workdir=bench.workdir, dsn=src.dsn,
                              table=table, label=mode, settings=dict(o.engine_settings))
            es.enable()
            out.setdefault("profiles", {})[f"{mode}, {size:,} rows"] = bench.profile(
                f"snapshot{size}-{mode}", es.command(), es.has_rows(size))
        rss = GOALS["snapshot.rss"].evaluate(fig["engine_consolidated"]["peak_rss_mb"]["max"])
        out["goals"].append({**rss, "goal": f"{rss['goal']} ({size:,} rows)", "size": size})
        src.drop_slots(f"bench_{name}_")
    return out


def merge(bench: Bench) -> dict[str, Any]:
    """`--merge-changes` updates (random keys, then the most recent keys) applied to a table of
    `--rows` rows and to one of 10× as many: the engine's catch-up of them, timed from process
    start. The goal: into 10× rows at most 3× the time of into 1× rows, for recent keys."""
    o, src = bench.options, bench.source
    sizes = [o.rows, 10 * o.rows]
    changes = min(o.merge_changes, max(1, o.rows // 10))
    out: dict[str, Any] = {"changes": changes, "sizes": {}, "goals": []}
    medians: dict[tuple[int, str], float] = {}
    for size in sizes:
        table = f"{SCHEMA}.bench_merge{size}"
        src.drop_slots(f"bench_merge{size}_")
        bench.progress("merge", f"creating {table} with {size:,} rows")
        src.create_table(table, size)
        es = EngineSource(name=f"bench_merge{size}_0", workdir=bench.workdir, dsn=src.dsn,
                          table=table, settings=dict(o.engine_settings))
        es.enable()
        bench.progress("merge", f"engine primed: snapshot of {size:,} rows in "
                                f"{es.prime(timeout_s=o.timeout_s):.1f} s")
        per_keys: dict[str, Any] = {}
        for keys in ("random", "recent"):
            legs: list[dict[str, Any]] = []
            for rep in range(o.repeat):
                backlog = src.update_delete_backlog(table, changes, 0, keys=keys)
                checksum = bench.source_checksum(table)
                before = loadavg()
                run = es.run(es.caught_up(backlog.floor_lsn), leg=f"merge{size}-{keys}-{rep}",
                             timeout_s=o.timeout_s)
                check = es.verify(checksum) if run.reached else None
                legs.append(bench.record("merge", leg="engine", label=f"{size}-{keys}", rep=rep,
                                         run=run, changes=backlog.changes, load_before=before,
                                         check=check, extra={"size": size, "keys": keys}))
            fig = _figure(legs)
            per_keys[keys] = fig
            if fig["seconds"]["median"] is not None:
                medians[(size, keys)] = fig["seconds"]["median"]
        out["sizes"][str(size)] = per_keys
        src.drop_slots(f"bench_merge{size}_")
    for keys in ("random", "recent"):
        small, large = medians.get((sizes[0], keys)), medians.get((sizes[1], keys))
        out[f"ratio_{keys}"] = None if not small or large is None else large / small
    out["goals"].append(GOALS["merge.recent"].evaluate(out["ratio_recent"]))
    return out


__all__ = ["backlog_workload", "bigtxn", "catchup", "catchup_setting", "insert", "merge",
           "mixed", "snapshot"]

"""`cdcengine` command line: a thin layer over `cdcengine.api` (SPEC §3).

Exit codes: 0 ok; 1 a check or command failed with a stated reason (including an unreachable
source); 2 usage or configuration error. Output never contains a secret: every message printed
comes from a `CDCError` (static text) or is scrubbed of the configured sources' secrets.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import structlog

from cdcengine import api
from cdcengine.config import Config, EngineConfig, SourceConfig, load_config
from cdcengine.errors import CDCError, ConfigError, Reason, UnknownSource, classify_error
from cdcengine.secrets import dsn_password, scrub
from cdcengine.serve import daemon
from cdcengine.serve.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    _mb,
    _per_source,
    _print_checks,
    _print_error,
    _print_json,
    _sources,
    _state,
)
from cdcengine.serve.http import unreachable_status
from cdcengine.serve.logs import configure_logging
from cdcengine.source.adapter import Check, Severity, TableInfo

_NO_CONFIG = frozenset({"demo", "bench"})  # commands that bring their own source and need no config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep its text
        self.print_usage(sys.stderr)
        print(f"cdcengine: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"expected 0 to 86400 seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cdcengine", description="PostgreSQL logical replication into Delta Lake.")
    p.add_argument("--config", metavar="PATH", help="config file (default ./cdcengine.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    c = cmd("check", "prerequisite checks, one line per check with the fix; exit 1 on any ❌")
    c.add_argument("--source", metavar="S")
    c.add_argument("--json", action="store_true")
    c = cmd("tables", "discover the database's tables and whether each can be captured")
    c.add_argument("--source", metavar="S")
    c.add_argument("--json", action="store_true")
    c = cmd("enable", "re-run the checks, then create the publication and the slot")
    c.add_argument("--source", metavar="S")
    c.add_argument("--slot-wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long slot creation may wait for running transactions (30)")
    c.add_argument("--json", action="store_true")
    c = cmd("disable", "drop what the engine owns (managed: slot + publication; "
                       "self_managed: slot)")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", metavar="S")
    g.add_argument("--all", action="store_true")
    c.add_argument("--json", action="store_true")
    c = cmd("run", "daemon: snapshot where needed, then stream every (or one) source")
    c.add_argument("--source", metavar="S")
    c = cmd("status", "state, slot, publication, settings and tables per source")
    c.add_argument("--source", metavar="S")
    c.add_argument("--json", action="store_true")
    c = cmd("settings", "update tuning: auto-drop and lag thresholds")
    c.add_argument("--source", metavar="S", required=True)
    c.add_argument("--auto-drop-slot", type=_bool, metavar="BOOL")
    c.add_argument("--lag-warning-mb", type=int, metavar="N")
    c.add_argument("--lag-critical-mb", type=int, metavar="N")
    c.add_argument("--json", action="store_true")
    c = cmd("resync", "re-snapshot one table while the others keep streaming (queued for "
                      "the daemon, or done by the next run)")
    c.add_argument("--source", metavar="S", required=True)
    c.add_argument("--table", metavar="T", required=True, help="schema.table (bare → public)")
    c.add_argument("--json", action="store_true")
    c = cmd("verify", "compare source tables with their Delta tables (row counts, then a "
                      "key/checksum diff) and report the differences; exit 1 unless all equal")
    c.add_argument("--source", metavar="S", required=True)
    c.add_argument("--table", metavar="T", help="one table (schema.table; bare → public)")
    c.add_argument("--wait", type=_seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait for Delta to catch up with the source snapshot (60)")
    c.add_argument("--examples", type=int, default=20, metavar="N",
                   help="example keys shown per kind of difference (20)")
    c.add_argument("--json", action="store_true")
    c = cmd("sweep", "one pass of the lag policy over every source (for cron when no daemon "
                     "runs); exit 1 unless every source could be checked")
    c.add_argument("--prune", action="store_true",
                   help="also drop the managed slot/publication of sources recorded as "
                        "enabled that are no longer in the config")
    c.add_argument("--json", action="store_true")
    c = cmd("repair", "recreate a lost/dropped slot (and publication) and re-snapshot every "
                      "table; refuses (exit 1) when nothing is broken")
    c.add_argument("--source", metavar="S", required=True)
    c.add_argument("--json", action="store_true")
    c = cmd("resume", "clear a pause (after auth/permission was fixed) without re-snapshotting, "
                      "after re-probing slot and publication")
    c.add_argument("--source", metavar="S", required=True)
    c.add_argument("--json", action="store_true")
    c = cmd("jobs", "recent runs per source: start/end, rows and LSN range per table, errors")
    c.add_argument("--source", metavar="S")
    c.add_argument("--limit", type=int, default=10, metavar="N", help="runs per source (10)")
    c.add_argument("--json", action="store_true")
    c = cmd("demo", "the embedded default: a throwaway PostgreSQL (or --dsn), sample tables and "
                    "a live workload, replicated into ./demo-lake with progress")
    c.add_argument("--dsn", metavar="URL",
                   help="use this database instead of a throwaway server; its demo schema "
                        "'shop', slot and publication are dropped at the end unless --keep")
    c.add_argument("--lake", metavar="PATH", default="demo-lake",
                   help="where the Delta tables go (./demo-lake); kept afterwards")
    c.add_argument("--duration", type=_seconds, default=30.0, metavar="SECONDS",
                   help="how long the live workload runs (30)")
    c.add_argument("--keep", action="store_true",
                   help="with --dsn: leave the sample schema, slot and publication in place")
    _bench_parser(cmd("bench", "benchmark the engine against its raw limits on a throwaway "
                               "PostgreSQL (or --dsn); results, report and plots under "
                               "benchmarks/results/<date>-<host>/"))
    return p


def _bench_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument("--dsn", metavar="URL", help="use this database instead of a throwaway "
                   "server (its bench_* tables, slots and publications are replaced)")
    c.add_argument("--workloads", metavar="W,…", default="default",
                   help="comma-separated: insert, mixed, steady, bigtxn, snapshot, latency, "
                        "merge, catchup; 'default' = all but steady; 'all' = all")
    c.add_argument("--rows", type=int, default=1_000_000, metavar="N",
                   help="rows of the insert/bigtxn/catch-up backlogs, the mixed and snapshot "
                        "tables and the smaller merge table (1000000)")
    c.add_argument("--repeat", type=int, default=3, metavar="N", help="repetitions (3)")
    c.add_argument("--out", metavar="DIR", help="results folder "
                   "(benchmarks/results/<date>-<host>)")
    c.add_argument("--modes", default="consolidated,append,both", metavar="M,…",
                   help="table modes of the insert workload (consolidated,append,both)")
    c.add_argument("--snapshot-large", action="store_true",
                   help="snapshot also 10× --rows pre-existing rows")
    c.add_argument("--steady-rows", type=int, default=10_000_000, metavar="N")
    c.add_argument("--steady-rate", type=int, default=5000, metavar="N",
                   help="changes/s of the steady workload (5000)")
    c.add_argument("--steady-seconds", type=_seconds, default=120.0, metavar="S")
    c.add_argument("--latency-rate", type=int, default=1000, metavar="N",
                   help="pgbench -R of the latency workload (1000)")
    c.add_argument("--latency-seconds", type=_seconds, default=60.0, metavar="S")
    c.add_argument("--engine-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a source config key for every engine leg (TOML value), repeatable")
    c.add_argument("--before-python", metavar="PYTHON",
                   help="another build's Python (e.g. an older checkout's .venv/bin/python): "
                        "its engine runs beside this one on the backlog and snapshot "
                        "workloads, as `<mode>@before`, for before/after figures from one run")
    c.add_argument("--profile", action="store_true",
                   help="on a missed goal, record a py-spy flame graph of an extra engine run")
    c.add_argument("--keep-workdir", action="store_true",
                   help="keep the engine configs, logs and Delta tables")
    c.add_argument("--corrupt-checksum", action="store_true", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # the demo brings its own source: it needs (and reads) no config file
        cfg = (Config(engine=EngineConfig(), sources=()) if args.command in _NO_CONFIG
               else load_config(args.config))
    except CDCError as exc:
        if exc.reason is Reason.CONFIG_INVALID:
            print(f"cdcengine: {exc.message}", file=sys.stderr)
        else:  # e.g. host_not_allowed: the code a script can match, and the fix
            print(f"cdcengine: {exc.reason}: {exc.message}\n  fix: {exc.fix}", file=sys.stderr)
        return EXIT_USAGE
    secrets = [s for src in cfg.sources for s in src.secrets()]
    if getattr(args, "dsn", None):
        secrets += [s for s in (dsn_password(args.dsn),) if s]
    quiet = logging.INFO if args.command == "run" else logging.WARNING
    configure_logging(fmt=str(cfg.engine.log_format),
                      level=logging.DEBUG if args.verbose else quiet, secrets=secrets)
    handler = _handler(args.command)
    try:
        return handler(args, cfg)
    except (ConfigError, UnknownSource) as exc:
        print(f"cdcengine: {scrub(exc.message, secrets)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last word: a reason, never a traceback
        err = classify_error(exc)
        print(f"cdcengine: {err.reason}: {scrub(err.message, secrets)}", file=sys.stderr)
        if err.reason is Reason.UNKNOWN:
            print(f"  ({type(exc).__name__}; run with -v for details)", file=sys.stderr)
            structlog.get_logger("cdcengine.cli").debug("cli_unexpected_error", exc_info=exc)
        return EXIT_FAILED


# ---- commands -------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, checks: list[Check]) -> None:
        print(f"source {src.name} ({src.masked_dsn})")
        _print_checks(checks)
        errors = sum(not c.ok for c in checks)
        warnings = sum(c.severity is Severity.WARNING for c in checks)
        print(f"  {len(checks)} checks: {errors} failed, {warnings} warnings")

    return _per_source(
        args, _sources(cfg, args.source),
        lambda src: api.check_prerequisites(src, state=_state(cfg)),
        show=show,
        to_json=lambda src, checks: {"source": src.name, "checks": [c.to_dict() for c in checks]},
        failed=lambda checks: any(not c.ok for c in checks),
        error_json=lambda src, exc: {"source": src.name, "error": exc.to_dict(), "checks": []},
    )


def _table_line(t: TableInfo) -> str:
    rows = "?" if t.estimated_rows is None else f"~{t.estimated_rows}"
    pk = ", ".join(t.primary_key) or "-"
    mark = "*" if t.configured else " "
    verdict = "capturable" if t.capturable else "NOT capturable"
    return (f" {mark} {t.qualified:<40} {t.kind:<18} rows {rows:<10} pk ({pk}) identity "
            f"{t.replica_identity}  {verdict}")


def cmd_tables(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, tables: list[TableInfo]) -> None:
        print(f"source {src.name} ({src.masked_dsn}) — * = in this source's tables")
        for t in tables:
            print(_table_line(t))
            for r in t.reasons:
                print(f"      {Severity.ERROR.symbol} {r}")
            for n in t.notes:
                print(f"      note: {n}")
            for col in t.columns:
                flags = [f for f, on in (("pk", col.primary_key), ("generated", col.generated),
                                         ("not captured", not col.captured)) if on]
                extra = f"  [{', '.join(flags)}]" if flags else ""
                print(f"        {col.name:<30} {col.source_type:<28} -> {col.delta_type}{extra}")

    return _per_source(
        args, _sources(cfg, args.source), api.discover_tables, show=show,
        to_json=lambda src, tables: {"source": src.name,
                                     "tables": [t.to_dict() for t in tables]},
        error_json=lambda src, exc: {"source": src.name, "error": exc.to_dict(), "tables": []},
    )


def cmd_enable(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, res: api.EnableResult) -> None:
        if res.already_enabled:
            print(f"source {src.name}: already enabled (slot {res.slot_name}, publication "
                  f"{res.publication_name})")
            for what, names in (("added", res.added), ("removed", res.removed),
                                ("mode changed", res.changed)):
                if names:
                    print(f"  tables {what}: {', '.join(names)}")
            if (res.added or res.removed or res.changed) and res.daemon_running:
                print("  the running daemon applies this within seconds; added tables (and "
                      "change logs of tables now in `both`) are snapshotted while the others "
                      "keep streaming")
            return
        slot = "adopted" if res.slot_adopted else f"created at {res.consistent_point}"
        pub = ("created" if res.publication_created else
               "adopted" if res.publication_adopted else "yours (self_managed)")
        print(f"source {src.name}: enabled ({res.management_mode}); slot {res.slot_name} "
              f"{slot}; publication {res.publication_name} {pub}; {len(res.tables)} table(s) "
              "pending their snapshot")

    def show_error(src: SourceConfig, exc: CDCError) -> None:
        print(f"source {src.name}: enable refused")
        _print_checks([c for c in getattr(exc, "checks", []) if c.severity is not Severity.OK])
        _print_error(exc)

    return _per_source(
        args, _sources(cfg, args.source),
        lambda src: api.enable_cdc(src, state=_state(cfg), slot_wait_s=args.slot_wait),
        show=show, to_json=lambda _, res: res.to_dict(), show_error=show_error,
        error_json=lambda src, exc: {"source": src.name, "error": exc.to_dict(), "checks": [
            c.to_dict() for c in getattr(exc, "checks", [])]},
    )


def cmd_disable(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, res: api.DisableResult) -> None:
        if res.already_disabled:
            print(f"source {src.name}: already disabled; nothing to drop")
        else:
            dropped = [what for what, did in (("slot " + src.slot_name, res.slot_dropped),
                                              ("publication " + src.publication_name,
                                               res.publication_dropped)) if did]
            killed = (f" (terminated pid {', '.join(map(str, res.terminated_pids))})"
                      if res.terminated_pids else "")
            print(f"source {src.name}: disabled; dropped {', '.join(dropped) or 'nothing'}"
                  + killed)
        for note in res.notes:
            print(f"  note: {note}")

    def show_error(src: SourceConfig, exc: CDCError) -> None:
        print(f"source {src.name}: disable failed")
        _print_error(exc)

    return _per_source(
        args, _sources(cfg, None if args.all else args.source),
        lambda src: api.disable_cdc(src, state=_state(cfg)),
        show=show, to_json=lambda _, res: res.to_dict(), show_error=show_error,
    )


def _show_status(_: SourceConfig, st: api.Status) -> None:
    print(f"{st.name}: {st.state} ({'enabled' if st.enabled else 'not enabled'}, "
          f"{st.management_mode}) {st.dsn} -> {st.destination}")
    for label, m in (("broken", st.broken), ("paused", st.paused)):
        if m is not None:
            print(f"  {label}: {m.reason} — {m.message} (since {m.at})")
    if st.stalled is not None:
        print(f"  stalled since {st.stalled.since}: {st.stalled.message}")
        for t in st.stalled.threads:
            print(f"    thread {t['name']}: {t['doing']}")
    s = st.slot
    if s.exists:
        held = f"active pid {s.active_pid}" if s.active else "inactive"
        print(f"  slot {s.name}: {held}, confirmed_flush {s.confirmed_flush_lsn}, restart "
              f"{s.restart_lsn}, lag {_mb(s.lag_bytes)}, retained WAL "
              f"{_mb(s.retained_wal_bytes)}, wal_status {s.wal_status}")
    else:
        print(f"  slot {s.name}: does not exist")
    p = st.publication
    print(f"  publication {p.name}: "
          + (f"{len(p.tables)} table(s)" if p.exists else "does not exist"))
    if st.lag.get("level") is not None:
        cap = (f", lowered to 80 % of max_slot_wal_keep_size {st.lag['max_slot_wal_keep_size_mb']}"
               " MB" if st.lag.get("lowered_by_cap") else "")
        print(f"  slot health: {st.lag['level']} — retained WAL "
              f"{_mb(st.lag['retained_wal_bytes'])} (warning {st.lag['warning_mb']} MB, "  # type: ignore[arg-type]
              f"critical {st.lag['critical_mb']} MB{cap})")
    for t in st.temporary_slots:
        print(f"  temporary slot {t.name}: retained WAL {_mb(t.retained_wal_bytes)}")
    se, o = st.settings, st.settings.origin
    print(f"  settings: auto_drop_slot={str(se.auto_drop_slot).lower()} "
          f"({o['auto_drop_slot']}), warning {se.lag_warning_threshold_mb} MB "
          f"({o['lag_warning_threshold_mb']}), critical {se.lag_critical_threshold_mb} MB "
          f"({o['lag_critical_threshold_mb']})")
    if st.lease:
        print(f"  held by: {st.lease['purpose']} (host {st.lease['host']}, pid "
              f"{st.lease['pid']}) since {st.lease['since']}")
    for t in st.tables:
        why = (f"  {t.reason}" + (f"; remedy: {t.remedy}" if t.remedy else "")) if t.reason \
            else ""
        rows = "-" if t.rows is None else f"{t.rows:,}"
        lake = f"  (destination unreadable: {t.delta_error})" if t.delta_error else ""
        print(f"    {t.name:<40} {t.mode:<13} {t.state:<13} applied_lsn "
              f"{t.applied_lsn or '-':<18} rows {rows}{why}{lake}")
        if t.snapshot and not t.snapshot.get("finished"):
            print(f"      snapshot: {_snapshot_progress(t.snapshot)}")


def _snapshot_progress(snap: Mapping[str, object]) -> str:
    """`rows of ~total rows, rows/s, chunks done/total, ETA` of a running table snapshot."""
    def num(key: str) -> float:
        value = snap.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    eta = snap.get("eta_s")
    return (f"{num('rows'):,.0f} of ~{num('rows_total'):,.0f} rows, {num('rows_per_s'):,.0f} "
            f"rows/s, chunks {num('chunks_done'):.0f}/{num('chunks_total'):.0f}, ETA "
            + (f"{eta:.0f} s" if isinstance(eta, int | float) else "-"))


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    def show_error(src: SourceConfig, exc: CDCError) -> None:
        print(f"{src.name}: could not be read")
        _print_error(exc)

    return _per_source(
        args, _sources(cfg, args.source), lambda src: api.cdc_status(src, state=_state(cfg)),
        show=_show_status, to_json=lambda _, st: st.to_dict(), show_error=show_error,
        error_json=unreachable_status,  # the same document as the daemon's /status
    )


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    """SIGINT/SIGTERM finish the current Delta commit and exit 0 (SPEC §3)."""
    sources = _sources(cfg, args.source)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    result = daemon.run(cfg, sources, stop)
    for outcome in result.outcomes:
        # with JSON logs stderr stays JSON lines: `source_stopped` already said all of this
        if outcome.error is not None and cfg.engine.log_format != "json":
            print(f"source {outcome.name}: stopped: {outcome.error.reason}: "
                  f"{outcome.error.message}\n  fix: {outcome.error.fix}", file=sys.stderr)
    return EXIT_OK if result.requested_stop and result.exit_code == 0 else result.exit_code


def cmd_settings(args: argparse.Namespace, cfg: Config) -> int:
    src = cfg.source(args.source)
    changes: dict[str, object] = {}
    if args.auto_drop_slot is not None:
        changes["auto_drop_slot"] = args.auto_drop_slot
    if args.lag_warning_mb is not None:
        changes["lag_warning_threshold_mb"] = args.lag_warning_mb
    if args.lag_critical_mb is not None:
        changes["lag_critical_threshold_mb"] = args.lag_critical_mb
    res = api.update_cdc_settings(src, state=_state(cfg), **changes)
    if args.json:
        _print_json(res.to_dict())
    elif res.unchanged:
        print(f"source {src.name}: unchanged")
    else:
        for key in res.changed:
            print(f"source {src.name}: {key} = {json.dumps(res.settings[key])}")
    return EXIT_OK


def cmd_resync(args: argparse.Namespace, cfg: Config) -> int:
    src = cfg.source(args.source)
    res = api.resync_table(src, args.table, state=_state(cfg))
    if args.json:
        _print_json(res.to_dict())
    elif res.daemon_running:
        print(f"source {src.name}: resync of {res.table} queued; the running daemon performs it")
    else:
        print(f"source {src.name}: resync of {res.table} queued; the next `cdcengine run` "
              "performs it")
    return EXIT_OK


def _show_verify(src: SourceConfig, res: api.VerifyResult) -> None:
    from cdcengine.control.verify import format_key  # verify's module: loaded by verify only

    print(f"source {src.name} ({src.masked_dsn})")
    for t in res.tables:
        symbol = Severity.OK.symbol if t.ok else Severity.ERROR.symbol
        c = t.comparison
        print(f"  {symbol} {t.table}: {t.message}")
        if c is not None and not t.ok:
            print(f"       rows: source {c.source_rows:,}, Delta {c.delta_rows:,}, compared "
                  f"{c.rows_compared:,}, in flux {c.in_flux:,} (at {t.consistent_point})")
            for label, keys in (("missing in Delta", c.missing_examples),
                                ("extra in Delta", c.extra_examples)):
                if keys:
                    print(f"       {label}: " + ", ".join(format_key(k)
                                                      for k in keys))
            if c.different_examples:
                print("       different: " + ", ".join(
                    f"{format_key(d.key)} ({', '.join(d.columns)})"
                    for d in c.different_examples))
        if t.fix and not t.ok:
            print(f"       fix: {t.fix}")


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    if args.examples < 0:
        raise ConfigError("verify: --examples must be >= 0")
    sources = _sources(cfg, args.source)
    for src in sources:
        api.tables_to_verify(src, args.table)  # an unknown table is a usage error (exit 2)
    return _per_source(
        args, sources,
        lambda src: api.verify(src, args.table, state=_state(cfg), wait_s=args.wait,
                               examples=args.examples),
        show=_show_verify, to_json=lambda _, res: res.to_dict(),
        failed=lambda res: not res.ok,
    )


def cmd_demo(args: argparse.Namespace, _cfg: Config) -> int:
    """SIGINT/SIGTERM stop the demo; it still stops its threads and cleans up (exit 130)."""
    from pathlib import Path

    from cdcengine.serve.demo import DemoOptions, run_demo  # duckdb and friends: only for the demo

    stop = threading.Event()
    previous: dict[signal.Signals, Callable[..., object] | int | None] = {}

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
    try:
        opts = DemoOptions(lake=Path(args.lake), dsn=args.dsn, duration_s=args.duration,
                           keep=args.keep)
        return run_demo(opts, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_bench(args: argparse.Namespace, _cfg: Config) -> int:
    import tomllib
    from pathlib import Path

    from cdcengine.bench.context import ALL_WORKLOADS, DEFAULT_WORKLOADS, BenchOptions
    from cdcengine.bench.harness import run_bench

    names = {"default": DEFAULT_WORKLOADS, "all": ALL_WORKLOADS}.get(args.workloads) or tuple(
        w.strip() for w in args.workloads.split(",") if w.strip())
    settings: dict[str, object] = {}
    for item in args.engine_setting:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bench: --engine-setting {item!r}: expected KEY=VALUE")
        try:
            settings[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            settings[key.strip()] = value
    opts = BenchOptions(
        workloads=names, rows=args.rows, repeat=args.repeat,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        snapshot_large=args.snapshot_large, steady_rows=args.steady_rows,
        steady_rate=args.steady_rate, steady_seconds=args.steady_seconds,
        latency_rate=args.latency_rate, latency_seconds=args.latency_seconds,
        engine_settings=settings, before_python=args.before_python, profile=args.profile,
        corrupt_checksum=args.corrupt_checksum)
    return run_bench(opts, dsn=args.dsn, out=Path(args.out) if args.out else None,
                     keep_workdir=args.keep_workdir,
                     say=lambda text: print(text, flush=True))


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "bench": cmd_bench,
    "check": cmd_check,
    "tables": cmd_tables,
    "enable": cmd_enable,
    "disable": cmd_disable,
    "run": cmd_run,
    "status": cmd_status,
    "settings": cmd_settings,
    "demo": cmd_demo,
    "verify": cmd_verify,
    "resync": cmd_resync,
}
# operator commands of slot health live in `cli_ops`, which uses this module's helpers: it is
# imported when one of them runs
OPS_COMMANDS = ("sweep", "repair", "resume", "jobs")


def _handler(command: str) -> Callable[[argparse.Namespace, Config], int]:
    if command in OPS_COMMANDS:
        from cdcengine.serve.cli import operations as cli_ops
        return getattr(cli_ops, f"cmd_{command}")  # type: ignore[no-any-return]
    return COMMANDS[command]


if __name__ == "__main__":
    raise SystemExit(main())

"""CLI commands of slot health and operations (SPEC §3): sweep, repair, resume, jobs.

Imported by `cdcengine.serve.cli.main` once its shared helpers exist (output, per-source loop)."""

from __future__ import annotations

import argparse
from datetime import datetime

from cdcengine import api
from cdcengine.api.recovery import RepairResult, ResumeResult, repair_cdc, resume_cdc
from cdcengine.config import Config, SourceConfig
from cdcengine.control.health import HealthReport, sweep
from cdcengine.errors import CDCError
from cdcengine.serve.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    _mb,
    _per_source,
    _print_checks,
    _print_error,
    _print_json,
    _sources,
    _state,
)
from cdcengine.source.adapter import Severity

_SYMBOL = {"none": Severity.OK, "warning": Severity.WARNING}


def _health_line(r: HealthReport) -> str:
    if r.error is not None:
        return (f"  {Severity.ERROR.symbol} {r.source}: not checked: {r.error['reason']}: "
                f"{r.error['message']}")
    if not r.checked:
        return f"  {Severity.OK.symbol} {r.source}: skipped ({r.message})"
    sym = _SYMBOL.get(r.action, Severity.ERROR).symbol
    acted = "" if r.action in _SYMBOL else f" [{r.action}]"
    dropped = "; slot and publication DROPPED" if r.dropped else ""
    return (f"  {sym} {r.source}: {r.state}{acted}; retained WAL {_mb(r.retained_wal_bytes)}, "
            f"lag {_mb(r.lag_bytes)} (warning {r.warning_mb} MB, critical {r.critical_mb} MB); "
            f"{r.message}{dropped}")


def cmd_sweep(args: argparse.Namespace, cfg: Config) -> int:
    result = sweep(list(cfg.sources), state=_state(cfg), prune=args.prune)
    if args.json:
        _print_json(result.to_dict())
        return result.exit_code
    for r in result.reports:
        print(_health_line(r))
    for p in result.pruned:
        what = [w for w, did in ((f"slot {p.slot_name}", p.slot_dropped),
                                 (f"publication {p.publication_name}", p.publication_dropped))
                if did]
        print(f"  prune {p.source}: {'dropped ' + ', '.join(what) + '; ' if what else ''}"
              f"{p.message}")
    return result.exit_code


def _one(args: argparse.Namespace, cfg: Config, act: object, show: object) -> int:
    def show_error(src: SourceConfig, exc: CDCError) -> None:
        print(f"source {src.name}: {args.command} refused")
        _print_checks([c for c in getattr(exc, "checks", []) if c.severity is not Severity.OK])
        _print_error(exc)

    return _per_source(args, [cfg.source(args.source)], act,  # type: ignore[arg-type]
                       show=show, to_json=lambda _, res: res.to_dict(),  # type: ignore[arg-type]
                       show_error=show_error)


def cmd_repair(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, res: RepairResult) -> None:
        print(f"source {src.name}: repaired ({res.was}); slot {src.slot_name} created at "
              f"{res.consistent_point}; {len(res.tables)} table(s) queued for re-snapshot — a "
              "running daemon starts within seconds, otherwise run `cdcengine run`")

    return _one(args, cfg, lambda src: repair_cdc(src, state=_state(cfg)), show)


def cmd_resume(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, res: ResumeResult) -> None:
        print(f"source {src.name}: resumed (was paused: {res.was}); streaming continues from "
              "the slot")

    return _one(args, cfg, lambda src: resume_cdc(src, state=_state(cfg)), show)


def _when(at: datetime | None) -> str:
    return "-" if at is None else f"{at:%Y-%m-%d %H:%M:%S}"


def cmd_jobs(args: argparse.Namespace, cfg: Config) -> int:
    def show(src: SourceConfig, runs: list[api.JobView]) -> None:
        print(f"{src.name}: {len(runs)} recent run(s)")
        for r in runs:
            took = "-" if r.duration_s is None else f"{r.duration_s:.1f} s"
            lsns = f"{r.first_lsn or '?'} .. {r.last_lsn}" if r.last_lsn else "-"
            print(f"  #{r.id} {r.kind:<8} {r.status:<11} {_when(r.started_at)} -> "
                  f"{_when(r.ended_at)} ({took}), {r.batches} batch(es), LSN {lsns}")
            for table, rows in sorted(r.rows.items()):
                print(f"      {table:<40} {rows:>12,} rows")
            if r.error_reason:
                print(f"      error: {r.error_reason}: {r.error_message}")

    return _per_source(
        args, _sources(cfg, args.source),
        lambda src: api.list_jobs(src, state=_state(cfg), limit=args.limit), show=show,
        to_json=lambda src, runs: {"source": src.name, "runs": [r.to_dict() for r in runs]})


__all__ = ["EXIT_FAILED", "EXIT_OK", "cmd_jobs", "cmd_repair", "cmd_resume", "cmd_sweep"]

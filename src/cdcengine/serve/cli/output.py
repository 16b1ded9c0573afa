"""What every `cdcengine` command shares: exit codes, picking sources, and the output helpers
(checks, errors, JSON, sizes). `cli` (the parser and most commands) and `cli_ops` (the slot
health operator commands) both use it; neither imports the other's internals."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TextIO, TypeVar

from cdcengine.config import Config, SourceConfig
from cdcengine.errors import CDCError, ConfigError
from cdcengine.source.adapter import Check, Severity

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


def _sources(cfg: Config, name: str | None) -> list[SourceConfig]:
    if name is not None:
        return [cfg.source(name)]
    if not cfg.sources:
        raise ConfigError("the config defines no [[source]]")
    return list(cfg.sources)


def _state(cfg: Config) -> str:
    return cfg.engine.state


def _print_json(obj: object, out: TextIO = sys.stdout) -> None:
    json.dump(obj, out, indent=2, default=str, ensure_ascii=False)
    out.write("\n")


def _print_error(err: CDCError, out: TextIO = sys.stdout) -> None:
    out.write(f"  {Severity.ERROR.symbol} {err.reason}: {err.message}\n")
    if err.fix:
        out.write(f"       fix: {err.fix}\n")


def _print_checks(checks: Sequence[Check], out: TextIO = sys.stdout) -> None:
    for c in checks:
        where = f" [{c.table}]" if c.table else ""
        out.write(f"  {c.severity.symbol} {c.name}{where}: {c.message}\n")
        if c.fix and c.severity is not Severity.OK:
            out.write(f"       fix: {c.fix}\n")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MB"


def _per_source(
    args: argparse.Namespace,
    sources: list[SourceConfig],
    act: Callable[[SourceConfig], T],
    *,
    show: Callable[[SourceConfig, T], None],
    to_json: Callable[[SourceConfig, T], dict[str, object]],
    failed: Callable[[T], bool] = lambda _: False,
    show_error: Callable[[SourceConfig, CDCError], None] | None = None,
    error_json: Callable[[SourceConfig, CDCError], dict[str, object]] | None = None,
) -> int:
    """Run `act` for each source; a source's CDCError is reported and the others still run.

    Text output per source through `show`, or one `{"sources": [...]}` JSON document. Exit 1 when
    any source raised or `failed(result)` says so.
    """
    any_failed = False
    results: list[dict[str, object]] = []
    for src in sources:
        try:
            value = act(src)
        except CDCError as exc:
            any_failed = True
            if args.json:
                results.append(error_json(src, exc) if error_json
                               else {"source": src.name, "error": exc.to_dict()})
            elif show_error:
                show_error(src, exc)
            else:
                print(f"source {src.name} ({src.masked_dsn})")
                _print_error(exc)
            continue
        any_failed |= failed(value)
        if args.json:
            results.append(to_json(src, value))
        else:
            show(src, value)
    if args.json:
        _print_json({"sources": results})
    return EXIT_FAILED if any_failed else EXIT_OK

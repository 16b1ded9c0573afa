"""structlog set-up: console or JSON lines on stderr, with secrets masked in every event.

Events have stable snake_case names (`slot_created`, `cdc_enabled`, …) and key-value fields.
The masking processor is the last line of defence: code never logs a dsn, but any string field
that looks like a URL password or a `password=` pair is masked anyway, and the secrets of the
configured sources are scrubbed by value.

With `log_format = "json"` every line on stderr is one JSON object with `event`, `level` and
`timestamp`: records of the standard `logging` module (third-party libraries, `warnings`) are
rendered by the same processors, masking included, instead of Python's plain-text fallback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from cdcengine.secrets import scrub


def _masker(secrets: tuple[str, ...]) -> structlog.types.Processor:
    def mask(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if key in ("dsn", "password"):
                event[key] = "***"
            elif isinstance(value, str):
                event[key] = scrub(value, secrets)
        return event

    return mask


class _Stderr:
    """`sys.stderr` looked up at every write, not bound once: the stream may be replaced later
    (a host application, a test harness) and a closed one must never be written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    *, fmt: str = "console", level: int = logging.INFO, secrets: Iterable[str] = ()
) -> None:
    """Configure structlog for the CLI and the daemon (the library leaves logging to its host)."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    tail: list[structlog.types.Processor] = [
        # render tracebacks to text *before* masking: driver messages may echo a secret
        structlog.processors.format_exc_info,
        _masker(tuple(s for s in secrets if s)),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            *tail,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(level, structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           stamp],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail,
                    renderer],
    ))


class _StdlibHandler(logging.StreamHandler[_Stderr]):
    """Our handler on the root logger, told apart so a second `configure_logging` replaces it."""


def _route_stdlib_logging(level: int, formatter: logging.Formatter) -> None:
    """Send the standard `logging` module's records through structlog's renderer.

    Libraries log there (and `warnings` with `captureWarnings`); left alone, Python prints their
    warnings as bare text, which breaks a JSON log stream. Their info and debug chatter stays
    hidden (root level WARNING, even with -v: it is about the engine's own events).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    handler = _StdlibHandler(_Stderr())
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)

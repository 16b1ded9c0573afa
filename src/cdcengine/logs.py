"""structlog set-up: console or JSON lines on stderr, with secrets masked in every event.

Events have stable snake_case names (`slot_created`, `cdc_enabled`, …) and key-value fields.
The masking processor is the last line of defence: code never logs a dsn, but any string field
that looks like a URL password or a `password=` pair is masked anyway, and the secrets of the
configured sources are scrubbed by value.
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # render tracebacks to text *before* masking: driver messages may echo a secret
            structlog.processors.format_exc_info,
            _masker(tuple(s for s in secrets if s)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=False,
    )

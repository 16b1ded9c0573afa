"""What a source's failure leaves in the state store, so `status` and /health show it."""

from __future__ import annotations

import structlog

from cdcengine.errors import BREAKING_REASONS, PAUSING_REASONS, CDCError
from cdcengine.state.base import StateStore

log = structlog.get_logger("cdcengine.pipeline.pipeline")  # its events stay where they were

__all__ = ["record_failure"]


def record_failure(store: StateStore, name: str, exc: CDCError) -> None:
    """Non-retryable problems become visible states (broken: `repair`; paused: fix, then
    `resume`); retryable ones are the caller's to retry."""
    if exc.retryable:
        return
    if exc.reason in BREAKING_REASONS:
        store.set_broken(name, str(exc.reason), exc.message)
    elif exc.reason in PAUSING_REASONS:
        store.set_paused(name, str(exc.reason), exc.message)
    log.error("source_failed", source=name, reason=str(exc.reason), message=exc.message)

"""Opening the state store and reading a source through it, for every part of the engine.

These used to live in `cdcengine.api`, so the pipeline, the daemon's runner, monitor and
watchdog and the health pass imported the library's façade to reach their own state store
(issue 14). The façade re-exports them; the engine imports them from here. The settings
overrides are applied by `cdcengine.state.settings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from cdcengine.config import DEFAULT_STATE_URL, SourceConfig
from cdcengine.state import open_state
from cdcengine.state.base import SourceRecord, StateStore

__all__ = ["StateArg", "as_enabled", "open_store"]

#: A state store, or the URL to open one from (None: the engine default).
StateArg = StateStore | str | None


@contextmanager
def open_store(state: StateArg) -> Iterator[StateStore]:
    """The given store as is, or one opened from a URL (default: the engine default) and
    closed afterwards."""
    if state is None or isinstance(state, str):
        store = open_state(state or DEFAULT_STATE_URL)
        try:
            yield store
        finally:
            store.close()
    else:
        yield state


def as_enabled(rec: SourceRecord | None, source: SourceConfig) -> SourceConfig:
    """Slot, publication and mode are immutable while enabled: the recorded ones win."""
    if not (rec and rec.enabled and rec.slot_name and rec.publication_name
            and rec.management_mode):
        return source
    return dataclasses.replace(source, slot_name=rec.slot_name,
                               publication_name=rec.publication_name,
                               management_mode=rec.management_mode)  # type: ignore[arg-type]

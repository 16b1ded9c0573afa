"""The engine's state store: lifecycle, tables, setting overrides, leases and run history per
source.

`open_state(url)` picks the implementation from the `[engine] state` URL. The PostgreSQL store
lives in the adapter package and is imported only when asked for, so the core never needs a driver.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from cdcengine.errors import Reason, StateStoreError, StopReason
from cdcengine.secrets import mask_dsn
from cdcengine.state.base import (
    SETTING_KEYS,
    BatchRecord,
    Lease,
    Marker,
    RunRecord,
    RunStatus,
    SettingValue,
    SourceRecord,
    SourceState,
    StateStore,
    TableRecord,
    TableState,
    hold_lease,
    new_holder_id,
)
from cdcengine.state.migrations import LATEST_VERSION, MIGRATIONS, Migration
from cdcengine.state.sql import SQLStateStore
from cdcengine.state.sqlite import SQLiteStateStore

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "SETTING_KEYS",
    "BatchRecord",
    "Lease",
    "Marker",
    "Migration",
    "RunRecord",
    "RunStatus",
    "SQLStateStore",
    "SQLiteStateStore",
    "SettingValue",
    "SourceRecord",
    "SourceState",
    "StateStore",
    "StopReason",
    "TableRecord",
    "TableState",
    "hold_lease",
    "new_holder_id",
    "open_state",
]

_SQLITE = "sqlite://"
_ALLOWED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite://:memory: "
    "or postgresql://user@host/db"
)


def open_state(url: str, *, base_dir: Path | None = None) -> StateStore:
    """An open, migrated state store for `url`; relative SQLite paths resolve against `base_dir`
    (default: the working directory) and their parent folders are created.

    A `postgresql://` URL (optionally with `?schema=name`, default `cdcengine`) opens
    `cdcengine_postgres.state_store.PostgresStateStore`: the same store in a PostgreSQL schema,
    shared by daemons on several machines. Messages quote the URL masked, so a PostgreSQL
    password never reaches a log or a terminal.
    """
    if url in (f"{_SQLITE}:memory:", f"{_SQLITE}/:memory:"):
        return SQLiteStateStore(":memory:")
    if url.startswith(f"{_SQLITE}/") and len(url) > len(_SQLITE) + 1:
        path = Path(url[len(_SQLITE) + 1 :])
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateStoreError(
                f"cannot create the state store's folder {path.parent}: {exc.strerror}"
            ) from exc
        return SQLiteStateStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url)
    raise StateStoreError(
        f"unsupported state URL {mask_dsn(url)!r}; use {_ALLOWED}",
        reason=Reason.CONFIG_INVALID,
    )


def _open_postgres(url: str) -> StateStore:
    try:
        module = importlib.import_module("cdcengine_postgres.state_store")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("cdcengine_postgres"):
            message = (
                "the PostgreSQL state store is not available in this version; "
                "use sqlite:///path/to/state.db"
            )
        else:
            message = f"the PostgreSQL state store needs the module {exc.name!r}, not installed"
        raise StateStoreError(message, reason=Reason.CONFIG_INVALID) from exc
    store: StateStore = module.PostgresStateStore(url)
    return store

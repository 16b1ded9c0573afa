"""The SQLite state store: the shared store contract (tests/state_contract.py) and run history
(tests/run_history_contract.py), plus what is SQLite's own: the file, WAL mode, schema
versions, wrapped driver errors and the `open_state` URLs."""

from __future__ import annotations

import sqlite3
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("state_contract", "run_history_contract")

from run_history_contract import *  # noqa: E402, F403 - the shared tests run against this store
from state_contract import *  # noqa: E402, F403
from state_contract import OpenStore, enable  # noqa: E402

from cdcengine.errors import Reason, StateStoreError  # noqa: E402
from cdcengine.state import (  # noqa: E402
    LATEST_VERSION,
    MIGRATIONS,
    SQLiteStateStore,
    open_state,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def state_url(db: Path) -> str:
    return f"sqlite:///{db}"


@pytest.fixture
def open_store(db: Path) -> Iterator[OpenStore]:
    opened: list[SQLiteStateStore] = []

    def make(clock: Callable[[], float] | None = None) -> SQLiteStateStore:
        opened.append(SQLiteStateStore(db, clock=clock or time.time))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


# schema ---------------------------------------------------------------------------------------


def test_open_uses_wal_and_records_every_migration(store: SQLiteStateStore, db: Path) -> None:
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in raw.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in MIGRATIONS]
    assert versions == sorted(versions)
    assert versions[-1] == LATEST_VERSION


def test_reopen_is_idempotent_and_keeps_data(db: Path) -> None:
    with SQLiteStateStore(db) as s:
        enable(s)
    for _ in range(2):
        with SQLiteStateStore(db) as s:
            assert s.get_source("shop") is not None
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
            MIGRATIONS
        )


def test_newer_schema_is_refused(db: Path) -> None:
    SQLiteStateStore(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (LATEST_VERSION + 1,)
        )
    with pytest.raises(StateStoreError, match="newer cdcengine") as info:
        SQLiteStateStore(db)
    assert info.value.retryable is False


def test_sqlite_errors_are_wrapped_and_chained(tmp_path: Path) -> None:
    with pytest.raises(StateStoreError) as info:
        SQLiteStateStore(tmp_path)  # a folder, not a database file
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert info.value.reason is Reason.STATE_STORE_FAILED


def test_closed_store_refuses_calls(db: Path) -> None:
    s = SQLiteStateStore(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StateStoreError, match="closed"):
        s.list_sources()


def test_install_id_is_stable_across_reopen(db: Path, tmp_path: Path) -> None:
    with SQLiteStateStore(db) as s:
        first = s.install_id()
        assert s.install_id() == first
    assert len(first) == 32
    int(first, 16)
    with SQLiteStateStore(db) as s:
        assert s.install_id() == first
    with SQLiteStateStore(tmp_path / "other.db") as other:
        assert other.install_id() != first



def test_a_store_of_an_older_version_is_upgraded_in_place(db: Path) -> None:
    with sqlite3.connect(db) as raw:  # what an older cdcengine left: migrations 1 and 2 only
        for migration in MIGRATIONS[:2]:
            for statement in migration.statements:
                raw.execute(statement)
        raw.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        raw.executemany(
            "INSERT INTO schema_migrations VALUES (?, ?, 0)",
            [(m.version, m.description) for m in MIGRATIONS[:2]],
        )
        raw.execute("INSERT INTO meta VALUES ('install_id', 'abc')")
    with SQLiteStateStore(db) as s:
        assert s.install_id() == "abc"
        run = s.start_run("shop", kind="stream", holder="h")
        assert [r.id for r in s.list_runs("shop")] == [run]
    with sqlite3.connect(db) as raw:
        versions = [r[0] for r in raw.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in MIGRATIONS]


# open_state -----------------------------------------------------------------------------------


def test_open_state_sqlite_urls(tmp_path: Path) -> None:
    with open_state("sqlite:///.cdcengine/state.db", base_dir=tmp_path) as s:
        assert isinstance(s, SQLiteStateStore)
        assert Path(s.path) == tmp_path / ".cdcengine" / "state.db"
    assert (tmp_path / ".cdcengine" / "state.db").is_file()
    absolute = tmp_path / "abs" / "deep" / "s.db"
    with open_state(f"sqlite:///{absolute}") as s:
        assert isinstance(s, SQLiteStateStore)
        assert Path(s.path) == absolute
    with open_state("sqlite://:memory:") as s:
        enable(s)
        assert s.get_source("shop") is not None


@pytest.mark.parametrize("url", ["mysql://u:hunter2@h/db", "sqlite://", "sqlite:///", "state.db"])
def test_open_state_refuses_other_urls(url: str) -> None:
    with pytest.raises(StateStoreError, match="sqlite:///") as info:
        open_state(url)
    assert info.value.reason is Reason.CONFIG_INVALID
    assert "hunter2" not in str(info.value)


def test_open_state_postgres_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://cdc:hunter2@db:5432/state"
    monkeypatch.setitem(sys.modules, "cdcengine_postgres.state_store", None)
    with pytest.raises(StateStoreError, match="not available in this version") as info:
        open_state(url)
    assert info.value.reason is Reason.CONFIG_INVALID
    assert "hunter2" not in str(info.value)

    seen: list[str] = []

    def fake_store(u: str) -> str:
        seen.append(u)
        return "pg-store"

    fake = types.ModuleType("cdcengine_postgres.state_store")
    fake.PostgresStateStore = fake_store  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cdcengine_postgres.state_store", fake)
    opened: object = open_state(url)
    assert opened == "pg-store"
    assert seen == [url]

"""Which tables a running source captures after `enable` changed the registrations."""

from __future__ import annotations

from datetime import UTC, datetime

from cdcengine.config import SourceConfig, TableMode
from cdcengine.pipeline.tablesets import registered_changes, registrations
from cdcengine.state.base import TableRecord, TableState


def rec(name: str, mode: str = "consolidated", *, columns: tuple[str, ...] | None = None,
        primary_key: tuple[str, ...] | None = None) -> TableRecord:
    return TableRecord(source="shop", name=name, mode=mode, state=TableState.STREAMING,
                       reason=None, remedy=None, updated_at=datetime.now(UTC), columns=columns,
                       primary_key=primary_key)


def source(*tables: str, **table: dict[str, object]) -> SourceConfig:
    return SourceConfig(name="shop", dsn="postgresql://u@h/db", tables=list(tables),
                        destination="/lake", table=table)


def test_nothing_registered_since_is_no_change() -> None:
    src = source("public.a")
    seen = registrations([rec("public.a")])
    change = registered_changes(src, seen, dict(seen))
    assert not change and change.source is src


def test_added_table_comes_with_its_registered_options() -> None:
    src = source("public.a")
    seen = registrations([rec("public.a")])
    now = registrations([rec("public.a"), rec("public.b", "both", columns=("id", "v"),
                                              primary_key=("id",))])
    change = registered_changes(src, seen, now)
    assert change.added == ("public.b",) and not change.removed and not change.remoded
    b = change.source.table_config("public.b")
    assert (b.mode, b.columns, b.primary_key) == (TableMode.BOTH, ("id", "v"), ("id",))
    assert change.source.table_config("public.a") == src.table_config("public.a")


def test_removed_and_remoded_tables() -> None:
    src = source("public.a", "public.b", **{"public.a": {"columns": ["id", "x"]}})
    seen = registrations([rec("public.a"), rec("public.b")])
    now = registrations([rec("public.a", "both")])
    change = registered_changes(src, seen, now)
    assert change.removed == ("public.b",) and change.remoded == ("public.a",)
    assert change.source.tables == ("public.a",)
    a = change.source.table_config("public.a")
    assert a.mode is TableMode.BOTH and a.columns == ("id", "x")  # other options kept


def test_only_changes_since_the_last_look_count() -> None:
    """A daemon started on a config that disagrees with the store keeps the config's view:
    a table registered before it started is not added, a config table never registered is
    not removed, and its own registration of the config's mode is no change."""
    src = source("public.a", "public.c")
    seen = registrations([rec("public.a", "both"), rec("public.old")])
    now = registrations([rec("public.a", "consolidated"), rec("public.old")])
    assert not registered_changes(src, seen, now)

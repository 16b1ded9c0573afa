"""Catalog facts and table discovery against a real server (fixture `db`: a fresh database).

Each test builds the few tables it needs, then reads them back through `load_table_facts` (the
query set shared with the prerequisite checks) and `discover_tables` (what `cdcengine tables`
prints), checking both the facts and the capturable/why-not verdicts users act on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgutil import ScratchDatabase
from psycopg import sql

from cdcengine.config import SourceConfig
from cdcengine.names import TableRef
from cdcengine.source.adapter import TableInfo
from cdcengine_postgres.connection import connect
from cdcengine_postgres.control.catalog import TableFacts, load_table_facts
from cdcengine_postgres.control.discovery import (
    NOTE_GENERATED,
    NOTE_NOT_SELECTED,
    NOTE_PARTITION_DRIFT,
    NOTE_TIMESTAMP_NTZ,
    discover_tables,
)

ORDERS_DDL = """
CREATE TABLE public.orders (
    tenant    int NOT NULL,
    id        bigint NOT NULL,
    amount    numeric(12,2),
    huge      numeric,
    tags      text[],
    scores    integer[],
    placed    timestamp,
    placed_tz timestamptz,
    doc       jsonb,
    total     numeric(14,2) GENERATED ALWAYS AS (amount * 2) STORED,
    PRIMARY KEY (id, tenant)
)
"""


@pytest.fixture
def conn(db: ScratchDatabase) -> Iterator[psycopg.Connection[Any]]:
    with connect(db.dsn) as c:
        yield c


def _source(
    db: ScratchDatabase,
    tmp_path: Path,
    tables: list[str],
    table: Mapping[str, Mapping[str, object]] | None = None,
) -> SourceConfig:
    return SourceConfig(
        name="shop",
        dsn=db.dsn,
        tables=tuple(tables),
        destination=str(tmp_path / "lake"),
        table=table or {},
    )


def _by_name(infos: list[TableInfo]) -> dict[str, TableInfo]:
    return {t.qualified: t for t in infos}


def _facts(conn: psycopg.Connection[Any], schema: str, name: str) -> TableFacts:
    ref = TableRef(schema, name)
    return load_table_facts(conn, [ref])[ref]


def test_composite_key_types_and_generated_column(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(ORDERS_DDL)
    f = _facts(conn, "public", "orders")
    assert f.relkind == "r"
    assert f.persistence == "p"
    assert f.primary_key == ("id", "tenant")  # index order, not column order
    assert f.replica_identity == "default"
    assert f.identity_columns == ("id", "tenant")
    assert f.identity_index is None
    assert f.unique_indexes == (("orders_pkey", ("id", "tenant")),)
    assert f.owned_by_current_user
    assert f.can_select
    assert [c.name for c in f.columns] == [
        "tenant", "id", "amount", "huge", "tags", "scores", "placed", "placed_tz", "doc",
        "total",
    ]
    assert [c.attnum for c in f.columns] == list(range(1, 11))
    by = {c.name: c for c in f.columns}
    assert by["amount"].type_text == "numeric(12,2)"
    assert by["tags"].type_text == "text[]"
    assert by["scores"].type_text == "integer[]"
    assert by["tenant"].not_null
    assert not by["amount"].not_null
    assert by["total"].generated
    assert not by["amount"].generated
    assert by["scores"].pg_type.is_array

    info = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.orders"])))[
        "public.orders"
    ]
    assert info.kind == "table"
    assert info.capturable, info.reasons
    assert info.configured
    assert info.primary_key == ("id", "tenant")
    assert info.replica_identity_columns == ("id", "tenant")
    cols = {c.name: c for c in info.columns}
    expected = {
        "tenant": ("integer", "integer"),
        "id": ("bigint", "long"),
        "amount": ("numeric(12,2)", "decimal(12,2)"),
        "huge": ("numeric", "string"),
        "tags": ("text[]", "array<string>"),
        "scores": ("integer[]", "array<integer>"),
        "placed": ("timestamp without time zone", "timestamp_ntz"),
        "placed_tz": ("timestamp with time zone", "timestamp"),
        "doc": ("jsonb", "string"),
        "total": ("numeric(14,2)", "decimal(14,2)"),
    }
    assert {n: (c.source_type, c.delta_type) for n, c in cols.items()} == expected
    assert cols["id"].primary_key
    assert cols["tenant"].primary_key
    assert not cols["amount"].primary_key
    assert not cols["id"].nullable
    assert cols["amount"].nullable
    assert cols["total"].generated
    assert not cols["total"].captured
    assert cols["total"].note == NOTE_GENERATED
    assert cols["placed"].captured
    assert cols["placed"].note == NOTE_TIMESTAMP_NTZ
    assert cols["placed_tz"].note is None
    assert any("placed" in n and NOTE_TIMESTAMP_NTZ in n for n in info.notes)
    info.to_dict()  # JSON-safe through asdict


def test_columns_override_marks_unselected_columns(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(ORDERS_DDL)
    source = _source(
        db, tmp_path, ["public.orders"], {"public.orders": {"columns": ["amount", "doc"]}}
    )
    info = _by_name(discover_tables(conn, source))["public.orders"]
    cols = {c.name: c for c in info.columns}
    assert info.capturable, info.reasons
    # key columns are always captured, even when `columns` leaves them out
    assert cols["id"].captured
    assert cols["tenant"].captured
    assert cols["amount"].captured
    assert cols["doc"].captured
    assert not cols["placed"].captured
    assert cols["placed"].note is not None
    assert NOTE_NOT_SELECTED in cols["placed"].note
    assert cols["huge"].note == NOTE_NOT_SELECTED
    # the only timestamp column is not captured: no table-level timestampNtz note
    assert not any(NOTE_TIMESTAMP_NTZ in n for n in info.notes)


def test_replica_identity_variants(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.nopk (x int, y text);
        CREATE TABLE public.nopk_full (x int, y text, z int GENERATED ALWAYS AS (x + 1) STORED);
        ALTER TABLE public.nopk_full REPLICA IDENTITY FULL;
        CREATE TABLE public.by_index (code text NOT NULL, other int, note text);
        CREATE UNIQUE INDEX by_index_code ON public.by_index (code);
        CREATE UNIQUE INDEX by_index_other ON public.by_index (other);  -- nullable: unusable
        CREATE UNIQUE INDEX by_index_partial ON public.by_index (code) WHERE other > 0;
        CREATE UNIQUE INDEX by_index_expr ON public.by_index (lower(code));
        ALTER TABLE public.by_index REPLICA IDENTITY USING INDEX by_index_code;
        CREATE TABLE public.nothing (id int PRIMARY KEY);
        ALTER TABLE public.nothing REPLICA IDENTITY NOTHING;
        """
    )
    facts = load_table_facts(conn)
    nopk = facts[TableRef("public", "nopk")]
    assert nopk.primary_key == ()
    assert nopk.identity_columns == ()
    full = facts[TableRef("public", "nopk_full")]
    assert full.replica_identity == "full"
    assert full.identity_columns == ("x", "y")  # generated columns are never sent
    idx = facts[TableRef("public", "by_index")]
    assert idx.replica_identity == "index"
    assert idx.identity_index == "by_index_code"
    assert idx.identity_columns == ("code",)
    assert idx.unique_indexes == (("by_index_code", ("code",)),)
    assert facts[TableRef("public", "nothing")].replica_identity == "nothing"

    infos = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.nopk"])))
    t = infos["public.nopk"]
    assert not t.capturable
    assert len(t.reasons) == 1
    assert "REPLICA IDENTITY" in t.reasons[0]
    assert 'ALTER TABLE "public"."nopk" REPLICA IDENTITY FULL' in t.reasons[0]

    t = infos["public.nopk_full"]
    assert t.capturable, t.reasons
    assert t.replica_identity == "full"
    assert any("primary_key" in n for n in t.notes)

    t = infos["public.by_index"]
    assert t.capturable, t.reasons
    assert t.replica_identity == "index"
    assert t.replica_identity_columns == ("code",)
    assert t.primary_key == ("code",)  # rows are keyed on the identity index
    assert any("by_index_code" in n for n in t.notes)

    t = infos["public.nothing"]
    assert not t.capturable
    assert "NOTHING" in t.reasons[0]


def test_declared_primary_key_must_be_the_identity(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.ev_full (id int, kind text);
        ALTER TABLE public.ev_full REPLICA IDENTITY FULL;
        CREATE TABLE public.ev_idx (id int NOT NULL, kind text);
        CREATE UNIQUE INDEX ev_idx_id ON public.ev_idx (id);
        ALTER TABLE public.ev_idx REPLICA IDENTITY USING INDEX ev_idx_id;
        CREATE TABLE public.ev_none (id int NOT NULL, kind text);
        CREATE UNIQUE INDEX "Ev None Id" ON public.ev_none (id);
        CREATE TABLE public.ev_other (id int PRIMARY KEY, code int NOT NULL UNIQUE);
        """
    )
    tables = ["ev_full", "ev_idx", "ev_none", "ev_other"]
    overrides: dict[str, Mapping[str, object]] = {
        "ev_full": {"primary_key": ["id"]},
        "ev_idx": {"primary_key": ["id"]},
        "ev_none": {"primary_key": ["id"]},
        "ev_other": {"primary_key": ["code"]},
    }
    infos = _by_name(discover_tables(conn, _source(db, tmp_path, tables, overrides)))
    assert infos["public.ev_full"].capturable, infos["public.ev_full"].reasons
    assert infos["public.ev_full"].primary_key == ("id",)
    assert infos["public.ev_idx"].capturable, infos["public.ev_idx"].reasons

    none = infos["public.ev_none"]
    assert not none.capturable
    # the fix names the existing unique index on the declared key, quoted
    assert (
        'ALTER TABLE "public"."ev_none" REPLICA IDENTITY USING INDEX "Ev None Id"'
        in none.reasons[0]
    )

    other = infos["public.ev_other"]
    assert not other.capturable
    assert "not the replica identity" in other.reasons[0]


def test_views_unlogged_and_other_kinds(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.base (id int PRIMARY KEY);
        CREATE VIEW public.v AS SELECT id FROM public.base;
        CREATE MATERIALIZED VIEW public.mv AS SELECT id FROM public.base;
        CREATE UNLOGGED TABLE public.scratch (id int PRIMARY KEY);
        CREATE SEQUENCE public.seq;
        """
    )
    facts = load_table_facts(conn)
    assert facts[TableRef("public", "v")].relkind == "v"
    assert facts[TableRef("public", "mv")].relkind == "m"
    assert facts[TableRef("public", "scratch")].persistence == "u"
    assert TableRef("public", "seq") not in facts
    assert TableRef("public", "base_pkey") not in facts
    assert all(r.schema not in ("pg_catalog", "information_schema") for r in facts)

    infos = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.base"])))
    assert infos["public.base"].capturable
    assert infos["public.v"].kind == "view"
    assert not infos["public.v"].capturable
    assert "publishes only tables" in infos["public.v"].reasons[0]
    assert infos["public.mv"].kind == "materialized view"
    assert not infos["public.mv"].capturable
    scratch = infos["public.scratch"]
    assert not scratch.capturable
    assert 'ALTER TABLE "public"."scratch" SET LOGGED' in scratch.reasons[0]
    assert list(infos) == sorted(infos, key=lambda q: (infos[q].schema, infos[q].name))


def test_partitioned_table(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.measure (id int, at date, v int, PRIMARY KEY (id, at))
            PARTITION BY RANGE (at);
        CREATE TABLE public.measure_2024 PARTITION OF public.measure
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE public.measure_2025 PARTITION OF public.measure
            FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        INSERT INTO public.measure
            SELECT g, date '2024-06-01' + (g % 365), g FROM generate_series(1, 3000) g;
        ANALYZE public.measure_2024, public.measure_2025;
        """
    )
    root_ref = TableRef("public", "measure")
    leaves = (TableRef("public", "measure_2024"), TableRef("public", "measure_2025"))
    facts = load_table_facts(conn)
    root = facts[root_ref]
    assert root.relkind == "p"
    assert root.leaf_partitions == leaves
    assert not root.is_partition
    assert root.partition_root is None
    assert root.estimated_rows == 3000  # sum of the leaves
    for ref in leaves:
        assert facts[ref].is_partition
        assert facts[ref].partition_root == root_ref
        assert facts[ref].primary_key == ("id", "at")  # cascaded from the root

    # asking for the root alone still reports its leaves
    assert load_table_facts(conn, [root_ref])[root_ref].leaf_partitions == leaves

    infos = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.measure"])))
    r = infos["public.measure"]
    assert r.kind == "partitioned table"
    assert r.partitioned
    assert r.capturable, r.reasons
    assert NOTE_PARTITION_DRIFT in r.notes
    for ref in leaves:
        leaf = infos[ref.qualified]
        assert leaf.kind == "partition"
        assert leaf.partition_of == "public.measure"
        assert not leaf.capturable
        assert "public.measure" in leaf.reasons[0]
        assert "publish_via_partition_root" in leaf.reasons[0]


def test_partitioned_root_identity_does_not_cascade(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.logs (at date, msg text) PARTITION BY RANGE (at);
        CREATE TABLE public.logs_a PARTITION OF public.logs
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        ALTER TABLE public.logs REPLICA IDENTITY FULL;
        """
    )
    info = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.logs"])))["public.logs"]
    assert not info.capturable
    assert any("public.logs_a" in r and "REPLICA IDENTITY FULL" in r for r in info.reasons)


def test_exact_case_sensitive_and_dotted_names(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public."Odd.Name" (id int PRIMARY KEY);
        CREATE TABLE public."Orders" (id int PRIMARY KEY, note text);
        CREATE TABLE public.orders (id int PRIMARY KEY);
        CREATE SCHEMA "My Schema";
        CREATE TABLE "My Schema".orders (id int PRIMARY KEY, x int);
        """
    )
    wanted = [
        TableRef("public", "Odd.Name"),
        TableRef("public", "Orders"),
        TableRef("public", "odd.name"),  # no such table
        TableRef("public", "ORDERS"),  # no such table
        TableRef("My Schema", "orders"),
        TableRef("my schema", "orders"),  # no such schema
    ]
    facts = load_table_facts(conn, wanted)
    assert set(facts) == {
        TableRef("public", "Odd.Name"),
        TableRef("public", "Orders"),
        TableRef("My Schema", "orders"),
    }
    assert facts[TableRef("public", "Orders")].column_names == ("id", "note")
    assert facts[TableRef("My Schema", "orders")].column_names == ("id", "x")
    assert load_table_facts(conn, []) == {}

    source = _source(db, tmp_path, ['public."Odd.Name"', '"My Schema".orders'])
    infos = _by_name(discover_tables(conn, source))
    odd = infos['public."Odd.Name"']
    assert (odd.schema, odd.name) == ("public", "Odd.Name")
    assert odd.configured
    assert odd.capturable
    assert infos['"My Schema".orders'].configured
    assert not infos["public.orders"].configured
    assert not infos["public.Orders"].configured  # exact case: not public.orders


def test_reserved_and_case_colliding_columns(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.engine_named (id int PRIMARY KEY, "_CDC_x" int);
        CREATE TABLE public.cased (id int PRIMARY KEY, a int, "A" int);
        """
    )
    infos = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.cased"])))
    engine_named = infos["public.engine_named"]
    assert not engine_named.capturable
    assert "_cdc_" in engine_named.reasons[0]
    assert "_CDC_x" in engine_named.reasons[0]
    cased = infos["public.cased"]
    assert not cased.capturable
    assert "case" in cased.reasons[0]
    assert "'a'" in cased.reasons[0]

    # leaving one of the pair out with `columns` makes the table capturable
    source = _source(db, tmp_path, ["public.cased"], {"public.cased": {"columns": ["id", "a"]}})
    cased = _by_name(discover_tables(conn, source))["public.cased"]
    assert cased.capturable, cased.reasons
    assert {c.name: c.captured for c in cased.columns} == {"id": True, "a": True, "A": False}


def test_table_in_another_schema(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE SCHEMA sales;
        CREATE TABLE sales.orders (id int PRIMARY KEY);
        CREATE TABLE public.orders (id int PRIMARY KEY, x int);
        """
    )
    infos = discover_tables(conn, _source(db, tmp_path, ["sales.orders"]))
    names = [t.qualified for t in infos]
    assert names == ["public.orders", "sales.orders"]
    sales = infos[1]
    assert sales.schema == "sales"
    assert sales.configured
    assert sales.capturable
    assert [c.name for c in sales.columns] == ["id"]
    assert not infos[0].configured


def test_role_without_select(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.secret (id int PRIMARY KEY, pw text);
        CREATE TABLE public.open (id int PRIMARY KEY);
        """
    )
    role, dsn = db.create_role()
    db.execute(sql.SQL("GRANT SELECT ON public.open TO {}").format(sql.Identifier(role)))
    with connect(dsn) as limited:
        facts = load_table_facts(limited)
        secret = facts[TableRef("public", "secret")]
        assert not secret.can_select
        assert not secret.owned_by_current_user
        # pg_catalog is not ACL-filtered: the key is seen even without any privilege
        assert secret.primary_key == ("id",)
        assert secret.column_names == ("id", "pw")
        assert facts[TableRef("public", "open")].can_select

        infos = _by_name(discover_tables(limited, _source(db, tmp_path, ["public.secret"])))
    info = infos["public.secret"]
    assert not info.capturable
    assert f'GRANT SELECT ON "public"."secret" TO "{role}"' in info.reasons[0]
    assert infos["public.open"].capturable
    assert _facts(conn, "public", "secret").owned_by_current_user  # the superuser


def test_estimated_rows_after_analyze(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(
        """
        CREATE TABLE public.items (id int PRIMARY KEY);
        INSERT INTO public.items SELECT generate_series(1, 2500);
        """
    )
    before = _facts(conn, "public", "items").estimated_rows
    if conn.info.server_version >= 140000:
        assert before is None  # never analyzed: reltuples = -1 (PostgreSQL 14+)
    db.execute("ANALYZE public.items")
    assert _facts(conn, "public", "items").estimated_rows == 2500
    info = _by_name(discover_tables(conn, _source(db, tmp_path, ["items"])))["public.items"]
    assert info.estimated_rows == 2500


def test_a_declared_multi_dimensional_array_is_noted(
    db: ScratchDatabase, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """`int[][]` values cannot be Delta arrays (one-dimensional): `tables` says so for a column
    declared multi-dimensional, instead of showing it as plainly capturable (issue 13)."""
    db.execute("CREATE TABLE grid (id int PRIMARY KEY, cells int[][], tags text[])")
    assert {c.name: c.dims for c in _facts(conn, "public", "grid").columns} == {
        "id": 0, "cells": 2, "tags": 1}
    info = _by_name(discover_tables(conn, _source(db, tmp_path, ["public.grid"])))["public.grid"]
    cols = {c.name: c for c in info.columns}
    assert cols["cells"].note is not None and "multi-dimensional" in cols["cells"].note
    assert cols["tags"].note is None

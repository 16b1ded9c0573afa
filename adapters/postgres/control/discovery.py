"""Table discovery for `cdcengine tables` / `discover_tables(cfg)` (SPEC §3).

Every user table-like relation of the source database, with its columns and their PostgreSQL →
Delta types, key, replica identity, partitioning, and whether the engine can capture it. When a
table cannot be captured, each reason says what is wrong and what to run about it, with the
identifiers quoted exactly as PostgreSQL needs them (`psycopg.sql.Identifier`), so a user can
paste the statement. `notes` are things worth knowing about a table that can be captured.

The facts come from `catalog.load_table_facts`, the same query set the prerequisite checks use,
so `tables` and `check` read one description of each table. This module only applies the rules:

- logical replication publishes tables only: views, materialized views and foreign tables are
  listed but not capturable;
- unlogged and temporary tables write no WAL, so no change of theirs is ever decoded;
- a partition is published through its root (`publish_via_partition_root`), never on its own;
- UPDATE and DELETE on a published table fail unless the table has a replica identity to key
  on (a primary key under the default identity, an identity index, or FULL); a declared
  `primary_key` must be that identity (or FULL, where whole old rows are sent);
- Delta column names are case-insensitive and the engine owns the `_cdc_` prefix;
- the role must be able to SELECT the table to snapshot it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import tuple_row

from cdcengine.names import TableRef, case_collisions, is_engine_column
from cdcengine.source.adapter import ColumnInfo, TableInfo
from cdcengine_postgres.control.catalog import (
    ColumnFacts,
    TableFacts,
    effective_key,
    lacks_identity,
    load_table_facts,
    unkeyable_columns,
)
from cdcengine_postgres.types.mapping import arrow_type, delta_type_name, needs_timestamp_ntz

if TYPE_CHECKING:
    import psycopg

    from cdcengine.config import SourceConfig, TableConfig

__all__ = ["discover_tables", "table_info"]

KINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}

NOTE_GENERATED = (
    "generated columns are not captured: PostgreSQL sends them neither in COPY nor in pgoutput"
)
NOTE_NOT_SELECTED = "not selected in columns"
NOTE_TIMESTAMP_NTZ = "readers need Delta's timestampNtz feature"
NOTE_MULTI_DIM = (
    "declared multi-dimensional: Delta arrays are one-dimensional, so a multi-dimensional value "
    "is captured as null (logged as values_masked); store it as jsonb or text to keep it"
)
# PostgreSQL publishes no event for these (pgoutput skips a leaf's TRUNCATE under
# publish_via_partition_root; ATTACH/DETACH are DDL): the Delta table drifts silently until
# `verify` compares it and `resync` re-copies the root.
NOTE_PARTITION_DRIFT = (
    "a TRUNCATE or DETACH of a single partition, and the rows a table already holds when it is "
    "ATTACHed, are not published by PostgreSQL; `cdcengine verify` finds that drift and "
    "`cdcengine resync` repairs it"
)


def discover_tables(conn: psycopg.Connection[Any], source: SourceConfig) -> list[TableInfo]:
    """Every user table of the database behind `conn`, sorted by schema then name.

    `configured` marks the tables listed in `source.tables`; for those, the per-table `columns`
    and `primary_key` overrides are applied (columns left out are shown as not captured; a
    declared key must match the replica identity). A configured table that does not exist is
    not listed (the prerequisite checks report it).
    """
    facts = load_table_facts(conn)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT current_user::text")
        row = cur.fetchone()
    role = str(row[0]) if row else "current_user"
    configs = {tc.ref: tc for tc in source.table_configs}
    infos = [
        table_info(f, facts=facts, config=configs.get(ref), role=role, conn=conn)
        for ref, f in facts.items()
    ]
    infos.sort(key=lambda t: (t.schema, t.name))
    return infos


def _qualified_sql(ref: TableRef, conn: psycopg.Connection[Any]) -> str:
    return sql.Identifier(ref.schema, ref.name).as_string(conn)


def _ident(name: str, conn: psycopg.Connection[Any]) -> str:
    return sql.Identifier(name).as_string(conn)


def _columns_sql(names: Iterable[str], conn: psycopg.Connection[Any]) -> str:
    return ", ".join(_ident(n, conn) for n in names)


def _kind(f: TableFacts) -> str:
    if f.is_partition:
        return "partition"
    return KINDS.get(f.relkind, f"relation (relkind {f.relkind!r})")


def _delta_type(c: ColumnFacts) -> str:
    return delta_type_name(arrow_type(c.pg_type))


def _is_ntz(c: ColumnFacts) -> bool:
    return needs_timestamp_ntz(arrow_type(c.pg_type))


def table_info(
    f: TableFacts,
    *,
    facts: dict[TableRef, TableFacts],
    config: TableConfig | None,
    role: str,
    conn: psycopg.Connection[Any],
) -> TableInfo:
    """One table's `TableInfo`: the rules of the module docstring applied to its facts.

    `facts` holds the other relations of the database (a partitioned root's leaves are checked
    too: UPDATE/DELETE on a leaf need the leaf's own replica identity). `conn` is used only to
    quote identifiers in the suggested SQL.

    `primary_key` of the result (and `ColumnInfo.primary_key`) is the key rows are merged on:
    the declared `primary_key` of a configured table, else the table's primary key, else the
    columns of its replica identity index; empty when there is none.
    """
    reasons: list[str] = []
    notes: list[str] = []
    table_sql = _qualified_sql(f.ref, conn)
    declared = config.primary_key if config is not None else None

    # The key rows are merged on: a declared key, else the primary key, else the identity index.
    key = effective_key(f, declared)
    # `columns` selects what is captured; the key columns always are (SPEC §2).
    selected = (
        set(config.columns) | set(key)
        if config is not None and config.columns is not None
        else None
    )

    columns = tuple(_column_info(c, key=key, selected=selected) for c in f.columns)
    ntz = [c.name for c in f.columns if _is_ntz(c) and _captured(c, selected)]

    kind = _kind(f)
    capturable_kind = f.relkind in ("r", "p") and not f.is_partition
    if f.relkind in ("v", "m", "f"):
        where = (
            "capture the table in the server it lives on"
            if f.relkind == "f"
            else "capture the tables it reads from"
        )
        reasons.append(
            f"a {kind} is not capturable: logical replication publishes only tables; {where}"
        )
    elif f.is_partition:
        root = f.partition_root.qualified if f.partition_root else "its partitioned root"
        reasons.append(
            f"a partition is captured only through its root {root}: list {root} in tables; "
            "it is published with publish_via_partition_root and each partition is copied on "
            "its own"
        )
    elif not capturable_kind:
        reasons.append(f"a {kind} is not capturable: logical replication publishes only tables")

    if capturable_kind:
        reasons.extend(_persistence_reasons(f, table_sql))
        reasons.extend(_column_reasons(f, config, selected))
        unkeyable = unkeyable_columns(f, key)
        if unkeyable:
            listed = ", ".join(f"{c.name} ({c.type_text})" for c in unkeyable)
            reasons.append(
                f"keyed on {listed}, an array: rows cannot be matched on array values; key "
                f"the table on scalar columns (e.g. add a bigint identity column with a unique "
                f"index as replica identity and declare primary_key = [\"that column\"])"
            )
        identity_reasons, identity_notes = _identity(f, declared, table_sql, conn)
        reasons.extend(identity_reasons)
        notes.extend(identity_notes)
        if f.relkind == "p":
            reasons.extend(_leaf_reasons(f, facts, conn))
            notes.append(NOTE_PARTITION_DRIFT)
        if not f.can_select:
            reasons.append(
                f"role {role} cannot read the table (no SELECT privilege), so it cannot be "
                f"snapshotted: run GRANT SELECT ON {table_sql} TO {_ident(role, conn)}"
            )
        if ntz:
            notes.append(
                f"timestamp without time zone column(s) {', '.join(ntz)}: {NOTE_TIMESTAMP_NTZ}"
            )

    return TableInfo(
        schema=f.ref.schema,
        name=f.ref.name,
        qualified=f.ref.qualified,
        kind=kind,
        estimated_rows=f.estimated_rows,
        columns=columns,
        primary_key=key,
        replica_identity=f.replica_identity,
        replica_identity_columns=f.identity_columns,
        partitioned=f.relkind == "p",
        partition_of=f.partition_root.qualified if f.partition_root else None,
        capturable=not reasons,
        reasons=tuple(reasons),
        notes=tuple(notes),
        configured=config is not None,
    )


def _captured(c: ColumnFacts, selected: set[str] | None) -> bool:
    return not c.generated and (selected is None or c.name in selected)


def _column_info(c: ColumnFacts, *, key: tuple[str, ...], selected: set[str] | None) -> ColumnInfo:
    notes: list[str] = []
    if c.generated:
        notes.append(NOTE_GENERATED)
    elif selected is not None and c.name not in selected:
        notes.append(NOTE_NOT_SELECTED)
    if _is_ntz(c):
        notes.append(NOTE_TIMESTAMP_NTZ)
    if c.dims > 1:
        notes.append(NOTE_MULTI_DIM)
    return ColumnInfo(
        name=c.name,
        source_type=c.type_text,
        delta_type=_delta_type(c),
        nullable=not c.not_null,
        primary_key=c.name in key,
        generated=c.generated,
        captured=_captured(c, selected),
        note="; ".join(notes) or None,
    )


def _persistence_reasons(f: TableFacts, table_sql: str) -> list[str]:
    if f.persistence == "u":
        return [
            "an unlogged table writes no WAL, so none of its changes can be decoded: run "
            f"ALTER TABLE {table_sql} SET LOGGED"
        ]
    if f.persistence == "t":
        return [
            "a temporary table writes no WAL and lives only in its session: capture a "
            "permanent table instead"
        ]
    return []


def _column_reasons(
    f: TableFacts, config: TableConfig | None, selected: set[str] | None
) -> list[str]:
    """Names the Delta table could not hold, and configured columns the table lacks.

    Only captured columns count: a `_cdc_x` column or an `a`/`A` pair left out through
    `columns` (or generated, hence never sent) does not reach Delta.
    """
    out: list[str] = []
    existing = set(f.column_names)
    if config is not None:
        for label, wanted in (("columns", config.columns), ("primary_key", config.primary_key)):
            missing = [c for c in wanted or () if c not in existing]
            if missing:
                out.append(
                    f"{label} names {', '.join(repr(c) for c in missing)}, which the table does "
                    f"not have (names are case-sensitive; the table has: "
                    f"{', '.join(f.column_names)})"
                )
    captured = [c.name for c in f.columns if _captured(c, selected)]
    reserved = [c for c in captured if is_engine_column(c)]
    if reserved:
        out.append(
            f"column(s) {', '.join(reserved)} use the prefix _cdc_, which the engine reserves "
            "for its own columns: rename them, or leave them out with `columns`"
        )
    for a, b in case_collisions(captured):
        out.append(
            f"columns {a!r} and {b!r} differ only in case and Delta column names are "
            "case-insensitive: rename one, or leave one out with `columns`"
        )
    return out


def _identity(
    f: TableFacts,
    declared: tuple[str, ...] | None,
    table_sql: str,
    conn: psycopg.Connection[Any],
) -> tuple[list[str], list[str]]:
    """Whether UPDATE/DELETE can be keyed: (reasons, notes) for the table's replica identity.

    Under the default identity PostgreSQL sends the primary key of the old row; with none, an
    UPDATE or DELETE on a published table fails outright ("cannot update table … because it does
    not have a replica identity and publishes updates"), so capturing it would break the
    source's own writes. NOTHING has the same effect, as does an identity index since dropped.
    """
    reasons: list[str] = []
    notes: list[str] = []
    identity = f.replica_identity
    if lacks_identity(f):
        what = {
            "default": "it has no primary key and its replica identity is DEFAULT",
            "nothing": "its replica identity is NOTHING",
            "index": "its replica identity index no longer exists",
        }[identity]
        reasons.append(
            f"no replica identity to key on ({what}): UPDATE and DELETE would fail once it is "
            f"published; {_identity_fix(f, declared, table_sql, conn)}"
        )
        return reasons, notes

    if declared:
        if identity == "full":
            notes.append(
                "replica identity FULL: whole old rows are sent; rows are matched on the "
                f"declared primary_key ({', '.join(declared)})"
            )
        elif set(declared) != set(f.identity_columns):
            source_of = (
                f"its primary key ({', '.join(f.identity_columns)})"
                if identity == "default"
                else f"the index {f.identity_index} ({', '.join(f.identity_columns)})"
            )
            reasons.append(
                f"the declared primary_key ({', '.join(declared)}) is not the replica identity, "
                f"which is {source_of}: a DELETE would not carry the declared key; "
                f"{_identity_fix(f, declared, table_sql, conn)}, or declare primary_key = "
                f"{list(f.identity_columns)}"
            )
        nullable = [c for c in declared if (col := f.column(c)) is not None and not col.not_null]
        if nullable and identity == "full":
            notes.append(
                f"declared primary_key column(s) {', '.join(nullable)} allow NULL: rows with a "
                "NULL there cannot be matched"
            )
        return reasons, notes

    if identity == "index":
        cols = ", ".join(f.identity_columns)
        if not f.primary_key:
            notes.append(
                f"keyed on the replica identity index {f.identity_index} ({cols}): declare "
                f"primary_key = {list(f.identity_columns)} for this table"
            )
        elif set(f.primary_key) != set(f.identity_columns):
            notes.append(
                f"the replica identity index {f.identity_index} ({cols}) differs from the "
                "primary key: a DELETE carries only the identity columns; consider "
                f"ALTER TABLE {table_sql} REPLICA IDENTITY DEFAULT"
            )
    elif identity == "full":
        if f.primary_key:
            notes.append(
                "replica identity FULL: whole old rows are sent (more WAL); rows are matched on "
                f"the primary key ({', '.join(f.primary_key)})"
            )
        else:
            notes.append(
                "replica identity FULL without a primary key: declare primary_key (columns that "
                "identify a row) for this table; rows are matched on it"
            )
    return reasons, notes


def _identity_fix(
    f: TableFacts,
    declared: tuple[str, ...] | None,
    table_sql: str,
    conn: psycopg.Connection[Any],
) -> str:
    """What to run so the table gets a replica identity, naming a usable index when one exists."""
    full = f"ALTER TABLE {table_sql} REPLICA IDENTITY FULL"
    if declared:
        matching = [name for name, cols in f.unique_indexes if set(cols) == set(declared)]
        if matching:
            return (
                f"run ALTER TABLE {table_sql} REPLICA IDENTITY USING INDEX "
                f"{_ident(matching[0], conn)} (the unique index on the declared primary_key), "
                f"or {full}"
            )
        return (
            f"create a unique index on the declared primary_key columns (NOT NULL) with "
            f"CREATE UNIQUE INDEX ON {table_sql} ({_columns_sql(declared, conn)}) and make it "
            f"the replica identity (ALTER TABLE {table_sql} REPLICA IDENTITY USING INDEX …), "
            f"or run {full}"
        )
    if f.unique_indexes:
        name, cols = f.unique_indexes[0]
        return (
            "add a primary key, or declare primary_key = "
            f"{list(cols)} and run ALTER TABLE {table_sql} REPLICA IDENTITY USING INDEX "
            f"{_ident(name, conn)}, or run {full}"
        )
    return (
        f"add a primary key (ALTER TABLE {table_sql} ADD PRIMARY KEY (…)), or declare "
        "primary_key with a unique index as replica identity (ALTER TABLE "
        f"{table_sql} REPLICA IDENTITY USING INDEX …), or run {full}"
    )


def _leaf_reasons(
    f: TableFacts, facts: dict[TableRef, TableFacts], conn: psycopg.Connection[Any]
) -> list[str]:
    """Leaves that would break UPDATE/DELETE: each leaf is checked against its own identity.

    PostgreSQL checks the replica identity of the partition a row lives in, not the root's, and
    `ALTER TABLE root REPLICA IDENTITY …` does not cascade to existing partitions. A primary key
    on the root does cascade, so the usual set-up passes; a root made FULL does not.
    """
    bad: list[TableRef] = []
    for leaf_ref in f.leaf_partitions:
        leaf = facts.get(leaf_ref)
        if leaf is None or leaf.relkind not in ("r", "p"):
            continue
        if lacks_identity(leaf):
            bad.append(leaf_ref)
    if not bad:
        return []
    return [
        f"partition(s) {', '.join(r.qualified for r in bad)} have no replica identity of their "
        "own (the root's identity does not cascade to partitions): UPDATE and DELETE there "
        "would fail once published; give each a primary key, or run e.g. "
        f"ALTER TABLE {_qualified_sql(bad[0], conn)} REPLICA IDENTITY FULL"
    ]


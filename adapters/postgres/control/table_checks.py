"""Prerequisite checks of each configured table: it exists and is a capturable table, is
readable, has a key the engine can merge on and an identity that keeps the application's UPDATE
and DELETE working once published, column names Delta can hold, and (managed mode) an owner who
may publish it."""

from __future__ import annotations

import re
from collections.abc import Iterable

from cdcengine.config import TableConfig
from cdcengine.names import TableRef, case_collisions, is_engine_column
from cdcengine.source.adapter import Check, Severity
from cdcengine_postgres.control.catalog import (
    TableFacts,
    effective_key,
    lacks_identity,
    unkeyable_columns,
)
from cdcengine_postgres.control.check_context import ERR, OK, WARN, CheckContext
from cdcengine_postgres.control.publications import table_list_sql

__all__ = ["check_tables"]


def check_tables(ctx: CheckContext) -> list[Check]:
    out: list[Check] = []
    for tc in ctx.source.table_configs:
        facts = ctx.facts.get(tc.ref)
        if facts is None:
            out.append(_missing_table(ctx, tc))
            continue
        out.extend(_table_checks(ctx, tc, facts))
    return out


def _missing_table(ctx: CheckContext, tc: TableConfig) -> Check:
    rows = ctx.conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid ="
        " c.relnamespace WHERE lower(c.relname) = lower(%s) AND c.relkind IN ('r', 'p')"
        " ORDER BY n.nspname = %s DESC, n.nspname LIMIT 3",
        [tc.ref.name, tc.ref.schema],
    ).fetchall()
    hint = ""
    if rows:
        hint = " Did you mean " + " or ".join(TableRef(s, t).qualified for s, t in rows) + \
            "? (names are exact and case-sensitive)"
    return Check(name="table_exists", severity=ERR, table=tc.name,
                 message=f"Table {tc.name} does not exist in database {ctx.database}." + hint,
                 fix="Create the table, or correct or remove it in the source's `tables`.")


def _table_checks(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> list[Check]:
    name, q = tc.name, ctx.q(tc.ref)
    out: list[Check] = []

    def add(check: str, sev: Severity, message: str, fix: str = "") -> None:
        out.append(Check(name=check, severity=sev, message=message, fix=fix, table=name))

    kinds = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}
    if f.relkind in kinds:
        add("table_kind", ERR, f"{name} is {kinds[f.relkind]}; logical replication publishes "
            "only tables.", "Capture the underlying table(s) instead.")
        return out
    if f.is_partition and f.partition_root is not None:
        add("table_kind", ERR, f"{name} is a partition of {f.partition_root.qualified}; "
            "partitions are captured through their root (publish_via_partition_root), each "
            "leaf copied on its own.", f"Capture {f.partition_root.qualified} instead.")
        return out
    if f.persistence != "p":
        add("table_kind", ERR, f"{name} is {'unlogged' if f.persistence == 'u' else 'temporary'}"
            "; its changes are not written to WAL, so they cannot be captured.",
            f"ALTER TABLE {q} SET LOGGED;")
    if f.can_select:
        add("table_readable", OK, f"{name} is readable.")
    else:
        add("table_readable", ERR, f"User {ctx.user} cannot SELECT from {name} (needed for the "
            "initial snapshot).", f"GRANT SELECT ON {q} TO {ctx.q(ctx.user)};")
    out.extend(_key_checks(ctx, tc, f))
    out.extend(_name_checks(ctx, tc, f))
    if ctx.managed:
        if ctx.superuser or f.owned_by_current_user:
            add("table_owner", OK, f"User {ctx.user} may add {name} to a publication.")
        else:
            add("table_owner", ERR, f"{name} is owned by {f.owner}; only its owner may add it "
                "to a publication (managed mode).",
                f"ALTER TABLE {q} OWNER TO {ctx.q(ctx.user)};  (or GRANT {ctx.q(f.owner)} TO "
                f"{ctx.q(ctx.user)};, or use management_mode = \"self_managed\")")
    if f.relkind == "p":
        add("partitioned_table", WARN, f"{name} is partitioned: it is captured through its root "
            "and each leaf is copied on its own; a TRUNCATE or DETACH of a single partition, and "
            "the rows a table already holds when it is ATTACHed, are not published by "
            "PostgreSQL, and `cdcengine verify` finds that drift.",
            "Prefer TRUNCATE on the root table and attach empty partitions (insert through the "
            "root afterwards); after other partition DDL run `cdcengine verify`, then "
            f"`cdcengine resync --source {ctx.source.name} --table {tc.name}` where it reports "
            "drift.")
    if tc.columns is not None and ctx.version < 150000:
        add("column_list", WARN, f"{name}: publication column lists need PostgreSQL 15; every "
            "column travels in WAL and the engine keeps only the selected ones.")
    return out


def _key_checks(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> list[Check]:
    """A key the engine can merge on, and an identity that keeps the application's writes working.

    Once a table is in a publication that publishes UPDATE/DELETE, PostgreSQL rejects those
    statements when the table has no replica identity, and (PG15) when a column list or row
    filter does not cover the identity. These checks make sure enabling CDC cannot break them.
    """
    name, q = tc.name, ctx.q(tc.ref)
    out: list[Check] = []
    colnames = {c.name for c in f.columns}

    def add(check: str, sev: Severity, message: str, fix: str = "") -> None:
        out.append(Check(name=check, severity=sev, message=message, fix=fix, table=name))

    no_identity = f.replica_identity == "nothing" or (
        f.replica_identity == "default" and not f.primary_key)
    declared = tc.primary_key
    if declared:
        unknown = [c for c in declared if c not in colnames]
        if unknown:
            add("primary_key", ERR, f"{name}: declared primary_key column(s) "
                f"{', '.join(unknown)} do not exist.", "Fix primary_key in the table override.")
        elif f.replica_identity == "full":
            add("primary_key", OK, f"{name}: rows are matched on the declared key "
                f"({', '.join(declared)}) under REPLICA IDENTITY FULL; it must be unique.")
        elif set(f.identity_columns) == set(declared) and f.identity_columns:
            add("primary_key", OK, f"{name}: the declared key ({', '.join(declared)}) is the "
                "table's replica identity.")
        else:
            index = next((ix for ix, cols in f.unique_indexes if set(cols) == set(declared)), None)
            if index:
                fix = f"ALTER TABLE {q} REPLICA IDENTITY USING INDEX {ctx.q(index)};"
            else:
                cols = ", ".join(ctx.q(c) for c in declared)
                fix = (f"CREATE UNIQUE INDEX ON {q} ({cols}); then ALTER TABLE {q} REPLICA "
                       "IDENTITY USING INDEX <that index>;  (columns must be NOT NULL) — or "
                       f"ALTER TABLE {q} REPLICA IDENTITY FULL;")
            add("primary_key", ERR, f"{name}: the declared primary_key ({', '.join(declared)}) "
                "is not backed by the replica identity, so deletes and key changes could not "
                "be matched.", fix)
    elif f.primary_key:
        if f.replica_identity == "index" and set(f.identity_columns) != set(f.primary_key):
            add("primary_key", WARN, f"{name}: replica identity index "
                f"{f.identity_index} differs from the primary key; deletes carry the "
                "identity columns.", f"ALTER TABLE {q} REPLICA IDENTITY DEFAULT;")
        else:
            add("primary_key", OK, f"{name}: primary key ({', '.join(f.primary_key)}).")
    else:
        hint = (f"ALTER TABLE {q} ADD PRIMARY KEY (…);  or declare primary_key = [...] for "
                f"this table with a unique index as replica identity (ALTER TABLE {q} REPLICA "
                f"IDENTITY USING INDEX …), or ALTER TABLE {q} REPLICA IDENTITY FULL")
        if f.replica_identity in ("index", "full"):
            key = list(f.identity_columns) if f.replica_identity == "index" else ["…"]
            add("primary_key", ERR, f"{name} has no primary key; declare which columns identify "
                "a row.", f'Add primary_key = {_toml_list(key)} under [source.table."{name}"].')
        else:
            add("primary_key", ERR, f"{name} has no primary key and no usable replica "
                "identity.", hint)

    out.extend(_key_type_checks(ctx, tc, f))
    if no_identity:
        add("replica_identity", ERR, f"{name} has no replica identity: once published, UPDATE "
            "and DELETE on it would fail for the application.",
            f"ALTER TABLE {q} ADD PRIMARY KEY (…);  or ALTER TABLE {q} REPLICA IDENTITY "
            f"USING INDEX <unique index>;  or ALTER TABLE {q} REPLICA IDENTITY FULL;")
    elif bare := [r for r in f.leaf_partitions if r in ctx.facts and lacks_identity(
            ctx.facts[r])]:
        add("replica_identity", ERR, f"{name}: partition(s) "
            f"{', '.join(r.qualified for r in bare)} have no replica identity of their own (the "
            "root's does not cascade to existing partitions): once published, UPDATE and DELETE "
            "there would fail for the application.",
            f"ALTER TABLE {q} ADD PRIMARY KEY (…) including the partition key (it cascades to "
            f"every partition);  or ALTER TABLE {ctx.q(bare[0])} REPLICA IDENTITY FULL; for "
            "each of them")
    elif ctx.managed:
        add("replica_identity", OK, f"{name}: replica identity {f.replica_identity} keeps "
            "UPDATE and DELETE working once published.")
    else:
        out.extend(_published_table_checks(ctx, tc, f))
    return out


def _key_type_checks(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> list[Check]:
    """Key columns the engine can group, look up and merge rows on (not arrays)."""
    bad = unkeyable_columns(f, effective_key(f, tc.primary_key))
    if not bad:
        return []
    q = ctx.q(tc.ref)
    listed = ", ".join(f"{c.name} ({c.type_text})" for c in bad)
    return [Check(
        name="key_type", severity=ERR, table=tc.name,
        message=f"{tc.name}: rows are keyed on {listed}, an array: rows cannot be matched on "
                "array values (grouped, looked up, merged), so changes could not be applied.",
        fix=(f"Key the table on scalar columns: ALTER TABLE {q} ADD COLUMN row_id bigint "
             f"GENERATED ALWAYS AS IDENTITY; CREATE UNIQUE INDEX ON {q} (row_id); ALTER TABLE "
             f"{q} REPLICA IDENTITY USING INDEX <that index>; then declare primary_key = "
             f'["row_id"] under [source.table."{tc.name}"] — or leave the table out of tables.'))]


def _published_table_checks(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> list[Check]:
    """Self-managed: the user's column list and row filter must not break UPDATE/DELETE."""
    pub = ctx.publication
    pt = pub.table(tc.ref) if pub.exists else None
    if pt is None:
        return []  # coverage is reported by check_publication
    name, out = tc.name, []
    pub_q = ctx.q(pub.name)
    if pt.columns is not None:
        listed = set(pt.columns)
        if f.replica_identity == "full" and listed != {c.name for c in f.columns
                                                       if not c.generated}:
            out.append(Check(name="replica_identity", severity=ERR, table=name,
                             message=f"{name} has REPLICA IDENTITY FULL but publication "
                                     f"{pub.name} lists only some columns: UPDATE and DELETE "
                                     "on it fail.",
                             fix=f"ALTER PUBLICATION {pub_q} SET TABLE {ctx.q(tc.ref)}; "
                                 "(drop the column list; the engine filters columns itself)"))
        elif not set(f.identity_columns) <= listed:
            missing = sorted(set(f.identity_columns) - listed)
            out.append(Check(name="replica_identity", severity=ERR, table=name,
                             message=f"Publication {pub.name}'s column list for {name} misses "
                                     f"replica identity column(s) {', '.join(missing)}: UPDATE "
                                     "on it fails.",
                             fix=_republish_fix(ctx, tc, f)))
        wanted = set(tc.columns or [c.name for c in f.columns if not c.generated])
        if not wanted <= listed:
            out.append(Check(name="publication_columns", severity=ERR, table=name,
                             message=f"Publication {pub.name} does not publish column(s) "
                                     f"{', '.join(sorted(wanted - listed))} of {name}.",
                             fix=_republish_fix(ctx, tc, f)))
    if pt.row_filter:
        idents = set(re.findall(r'"((?:[^"]|"")+)"|\b([A-Za-z_][A-Za-z0-9_$]*)\b',
                                pt.row_filter))
        used = {a.replace('""', '"') or b for a, b in idents} & {c.name for c in f.columns}
        outside = sorted(used - set(f.identity_columns))
        if outside and f.replica_identity != "full":
            out.append(Check(name="replica_identity", severity=ERR, table=name,
                             message=f"Publication {pub.name}'s row filter on {name} uses "
                                     f"non-identity column(s) {', '.join(outside)}: UPDATE and "
                                     "DELETE on it fail.",
                             fix=_republish_fix(ctx, tc, f)))
        out.append(Check(name="row_filter", severity=WARN, table=name,
                         message=f"Publication {pub.name} filters {name} with WHERE "
                                 f"({pt.row_filter}): rows outside it are not captured, so Delta "
                                 "holds only the filtered rows.",
                         fix=_republish_fix(ctx, tc, f)))
    if not out:
        out.append(Check(name="replica_identity", severity=OK, table=name,
                         message=f"{name}: replica identity {f.replica_identity} is covered by "
                                 f"publication {pub.name}."))
    return out


def _republish_fix(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> str:
    pub_q = ctx.q(ctx.publication.name)
    cols = _publish_columns(ctx, tc, f)
    listed = table_list_sql([tc.ref], {tc.ref: cols} if cols else None).as_string(ctx.conn)
    return (f"ALTER PUBLICATION {pub_q} DROP TABLE {ctx.q(tc.ref)}; "
            f"ALTER PUBLICATION {pub_q} ADD TABLE {listed};")


def _publish_columns(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> list[str] | None:
    """The column list to publish: selected columns plus identity, none under FULL or < PG15."""
    if tc.columns is None or f.replica_identity == "full" or ctx.version < 150000:
        return None
    cols = list(tc.columns)
    cols += [c for c in f.identity_columns if c not in cols]
    return cols


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _name_checks(ctx: CheckContext, tc: TableConfig, f: TableFacts) -> list[Check]:
    name = tc.name
    allcols = [c.name for c in f.columns]
    out: list[Check] = []
    if tc.columns is not None:
        unknown = [c for c in tc.columns if c not in allcols]
        if unknown:
            out.append(Check(name="columns", severity=ERR, table=name,
                             message=f"{name}: selected column(s) {', '.join(unknown)} do not "
                                     "exist (names are exact and case-sensitive).",
                             fix=f'Fix columns under [source.table."{name}"].'))
        generated = [c.name for c in f.columns if c.generated and c.name in tc.columns]
        if generated:
            out.append(Check(name="columns", severity=WARN, table=name,
                             message=f"{name}: generated column(s) {', '.join(generated)} are "
                                     "not captured (PostgreSQL sends them neither in COPY nor "
                                     "in WAL)."))
    captured = [c.name for c in f.columns if not c.generated
                and (tc.columns is None or c.name in tc.columns)]
    reserved = [c for c in captured if is_engine_column(c)]
    clashes = case_collisions(captured)
    if reserved:
        out.append(Check(name="column_names", severity=ERR, table=name,
                         message=f"{name}: column(s) {', '.join(reserved)} use the engine's "
                                 "reserved prefix _cdc_.",
                         fix="Rename the column(s), or leave them out with `columns = [...]`."))
    if clashes:
        pairs = ", ".join(f"{a}/{b}" for a, b in clashes)
        out.append(Check(name="column_names", severity=ERR, table=name,
                         message=f"{name}: columns {pairs} differ only in case; Delta column "
                                 "names are case-insensitive.",
                         fix="Rename one of each pair, or leave one out with `columns = [...]`."))
    if not reserved and not clashes:
        out.append(Check(name="column_names", severity=OK, table=name,
                         message=f"{name}: column names map to Delta without collisions."))
    return out

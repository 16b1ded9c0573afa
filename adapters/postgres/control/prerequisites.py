"""Prerequisite checks for a PostgreSQL source: each a small named function returning `Check`s.

Every check runs and is reported, even after others failed; each failure says what is wrong and
the exact fix (identifiers quoted with `psycopg.sql`). A check that cannot even run (say, a
catalog query is denied) reports itself as failed with the classified reason instead of aborting
the others. Only an unreachable source raises.

Catalog facts come from pg_catalog (`catalog.load_table_facts`), never information_schema,
which hides rows the user has no privilege on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdcengine.config import ManagementMode, SourceConfig, TableConfig
from cdcengine.control.lag import effective_thresholds
from cdcengine.names import TableRef, case_collisions, is_engine_column
from cdcengine.source.adapter import Check, Severity
from cdcengine_postgres.connection import connect
from cdcengine_postgres.control.catalog import (
    TableFacts,
    effective_key,
    load_table_facts,
    unkeyable_columns,
)
from cdcengine_postgres.control.health import retention_cap_mb
from cdcengine_postgres.control.publications import (
    PublicationState,
    read_publication,
    table_list_sql,
)
from cdcengine_postgres.control.slots import SlotState, read_slot
from cdcengine_postgres.errors import postgres_error

OK, WARN, ERR = Severity.OK, Severity.WARNING, Severity.ERROR
# one persistent slot, plus one temporary slot per running table snapshot (SPEC §8)
SLOTS_NEEDED = 2


@dataclass(slots=True, kw_only=True)
class _Ctx:
    conn: psycopg.Connection
    source: SourceConfig
    install_id: str
    known_slot: bool
    version: int
    user: str
    database: str
    superuser: bool
    facts: dict[TableRef, TableFacts]
    slot: SlotState
    publication: PublicationState

    def q(self, *parts: str | TableRef) -> str:
        """Quoted SQL identifier text for a fix message."""
        out = []
        for p in parts:
            ident = (sql.Identifier(p.schema, p.name) if isinstance(p, TableRef)
                     else sql.Identifier(p))
            out.append(ident.as_string(self.conn))
        return ".".join(out)

    @property
    def managed(self) -> bool:
        return self.source.management_mode is ManagementMode.MANAGED


def check_prerequisites(
    source: SourceConfig, *, install_id: str, known_slot: bool = False
) -> list[Check]:
    secrets = source.secrets()
    with connect(source.dsn, secrets=secrets) as conn:
        ctx = _context(conn, source, install_id, known_slot)
        checks: list[Check] = []
        for fn in _CHECKS:
            try:
                checks.extend(fn(ctx))
            except psycopg.Error as exc:
                err = postgres_error(exc, secrets=secrets, context=fn.__name__)
                checks.append(Check(name=fn.__name__.removeprefix("check_"), severity=ERR,
                                    message=f"could not run this check: {err.message}",
                                    fix=err.fix))
        return checks


def _context(conn: psycopg.Connection, source: SourceConfig, install_id: str,
             known_slot: bool) -> _Ctx:
    row = conn.execute(
        "SELECT current_setting('server_version_num')::int, current_user, current_database(),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
    ).fetchone()
    assert row is not None
    refs = [tc.ref for tc in source.table_configs]
    return _Ctx(
        conn=conn, source=source, install_id=install_id, known_slot=known_slot,
        version=row[0], user=row[1], database=row[2], superuser=bool(row[3]),
        facts=load_table_facts(conn, refs), slot=read_slot(conn, source.slot_name),
        publication=read_publication(conn, source.publication_name),
    )


# ---- server ---------------------------------------------------------------------------------


def check_server_version(ctx: _Ctx) -> list[Check]:
    v, major = ctx.version, ctx.version // 10000
    if v < 130000:
        return [Check(name="server_version", severity=ERR,
                      message=f"PostgreSQL {major} is too old: 13 or later is required "
                              "(publish_via_partition_root, wal_status).",
                      fix="Upgrade the server to PostgreSQL 13 or later (15+ recommended).")]
    missing = []
    if v < 140000:
        missing.append("streaming of large in-progress transactions (needs 14; large "
                       "transactions are decoded fully on the server first)")
    if v < 150000:
        missing.append("publication column lists (needs 15; `columns` is filtered by the "
                       "engine, all columns travel in WAL)")
    if missing:
        return [Check(name="server_version", severity=WARN,
                      message=f"PostgreSQL {major} works, without: " + "; ".join(missing) + ".",
                      fix="Upgrade to PostgreSQL 15 or later for these features.")]
    return [Check(name="server_version", severity=OK,
                  message=f"PostgreSQL {major}: streaming of large transactions and column "
                          "lists available.")]


def check_not_standby(ctx: _Ctx) -> list[Check]:
    row = ctx.conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row and row[0]:
        return [Check(name="not_standby", severity=ERR,
                      message="The server is a standby (pg_is_in_recovery() is true); "
                              "publications and slots must be created on the primary.",
                      fix="Point the dsn at the primary server.")]
    return [Check(name="not_standby", severity=OK, message="Connected to a primary.")]


def check_wal_level(ctx: _Ctx) -> list[Check]:
    try:
        row = ctx.conn.execute("SHOW wal_level").fetchone()
    except psycopg.Error:
        # PgBouncer in transaction mode and some wire-compatible databases refuse SHOW.
        return [Check(name="wal_level", severity=ERR,
                      message="This endpoint does not expose wal_level (a connection pooler "
                              "or a PostgreSQL-compatible database?); logical replication "
                              "needs a direct connection to PostgreSQL.",
                      fix="Point the dsn at the PostgreSQL primary itself, not a pooler.")]
    level = row[0] if row else "unknown"
    if level != "logical":
        return [Check(name="wal_level", severity=ERR,
                      message=f"wal_level is '{level}'; logical replication needs 'logical'.",
                      fix="ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
                          "(on managed services: set the logical replication parameter).")]
    return [Check(name="wal_level", severity=OK, message="wal_level is 'logical'.")]


def check_replication_privilege(ctx: _Ctx) -> list[Check]:
    row = ctx.conn.execute(
        "SELECT r.rolsuper, r.rolreplication,"
        " EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname IN ('rds_replication',"
        "  'rds_superuser') AND pg_has_role(current_user, g.oid, 'MEMBER'))"
        " FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()
    sup, repl, rds = row if row else (False, False, False)
    if sup or repl or rds:
        how = "superuser" if sup else ("REPLICATION" if repl else "rds_replication")
        return [Check(name="replication_privilege", severity=OK,
                      message=f"User {ctx.user} may replicate ({how}).")]
    return [Check(name="replication_privilege", severity=ERR,
                  message=f"User {ctx.user} is neither superuser nor has the REPLICATION "
                          "attribute (nor rds_replication/rds_superuser membership).",
                  fix=f"ALTER ROLE {ctx.q(ctx.user)} WITH REPLICATION;  "
                      f"(on Amazon RDS: GRANT rds_replication TO {ctx.q(ctx.user)};)")]


def check_create_privilege(ctx: _Ctx) -> list[Check]:
    if not ctx.managed:
        return [Check(name="create_privilege", severity=OK,
                      message="Not needed: self_managed mode creates no publication.")]
    row = ctx.conn.execute(
        "SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
    if row and row[0]:
        return [Check(name="create_privilege", severity=OK,
                      message=f"User {ctx.user} may create publications in {ctx.database}.")]
    return [Check(name="create_privilege", severity=ERR,
                  message=f"User {ctx.user} lacks CREATE on database {ctx.database}, which "
                          "managed mode needs to create the publication.",
                  fix=f"GRANT CREATE ON DATABASE {ctx.q(ctx.database)} TO {ctx.q(ctx.user)};  "
                      "(or use management_mode = \"self_managed\")")]


def check_replication_slots(ctx: _Ctx) -> list[Check]:
    row = ctx.conn.execute(
        "SELECT current_setting('max_replication_slots')::int,"
        " (SELECT count(*) FROM pg_replication_slots)::int").fetchone()
    assert row is not None
    max_slots, used = row
    have_own = ctx.slot.exists and _slot_is_ours(ctx)
    need = SLOTS_NEEDED - (1 if have_own else 0)
    free = max_slots - used
    if free >= need:
        return [Check(name="replication_slots", severity=OK,
                      message=f"{free} of {max_slots} replication slots free ({need} needed: "
                              "one persistent, one temporary per table snapshot).")]
    return [Check(name="replication_slots", severity=ERR,
                  message=f"Only {max(free, 0)} of {max_slots} replication slots are free; "
                          f"{need} are needed (one persistent, one temporary per snapshot).",
                  fix=f"ALTER SYSTEM SET max_replication_slots = {used + SLOTS_NEEDED + 2}; "
                      "then restart PostgreSQL (or drop unused slots from "
                      "pg_replication_slots).")]


def check_wal_senders(ctx: _Ctx) -> list[Check]:
    row = ctx.conn.execute(
        "SELECT current_setting('max_wal_senders')::int,"
        " (SELECT count(*) FROM pg_stat_replication)::int").fetchone()
    assert row is not None
    max_senders, used = row
    need = SLOTS_NEEDED - (1 if ctx.slot.info.active and _slot_is_ours(ctx) else 0)
    free = max_senders - used
    if free >= need:
        return [Check(name="wal_senders", severity=OK,
                      message=f"{free} of {max_senders} WAL senders free ({need} needed).")]
    return [Check(name="wal_senders", severity=ERR,
                  message=f"Only {max(free, 0)} of {max_senders} WAL senders are free; {need} "
                          "are needed (one for streaming, one per table snapshot).",
                  fix=f"ALTER SYSTEM SET max_wal_senders = {used + SLOTS_NEEDED + 2}; then "
                      "restart PostgreSQL.")]


def check_replication_connection(ctx: _Ctx) -> list[Check]:
    secrets = ctx.source.secrets()
    try:
        with connect(ctx.source.dsn, replication=True, secrets=secrets) as rconn:
            row = rconn.execute("IDENTIFY_SYSTEM").fetchone()
    except Exception as exc:  # noqa: BLE001 - every failure here is a reportable ❌
        from cdcengine.errors import classify_error

        err = classify_error(exc)
        return [Check(name="replication_connection", severity=ERR,
                      message="A replication connection could not be opened "
                              f"({err.reason}: {err.message}). Connection poolers refuse "
                              "replication connections; the role needs REPLICATION; and "
                              "max_wal_senders must have room.",
                      fix="Connect to PostgreSQL directly (not through a pooler) with a role "
                          "that has REPLICATION, and allow it in pg_hba.conf.")]
    sysid = row[0] if row else "?"
    return [Check(name="replication_connection", severity=OK,
                  message=f"Replication connection works (system identifier {sysid}).")]


def check_slot(ctx: _Ctx) -> list[Check]:
    name = ctx.source.slot_name
    st = ctx.slot
    if not st.exists:
        return [Check(name="slot", severity=OK,
                      message=f"Replication slot {name} does not exist yet; enable creates it.")]
    problems = []
    if st.slot_type != "logical" or st.info.plugin != "pgoutput":
        problems.append(f"it is a {st.slot_type} slot with plugin {st.info.plugin}, "
                        "not a pgoutput logical slot")
    if st.database not in (None, ctx.database):
        problems.append(f"it belongs to database {st.database}, not {ctx.database}")
    if st.info.wal_status == "lost":
        problems.append("PostgreSQL invalidated it (wal_status = lost)")
    if not _slot_is_ours(ctx):
        problems.insert(0, "this install did not create it")
        if st.info.active:
            problems.append(f"it is in use by backend pid {st.info.active_pid}")
    if problems:
        return [Check(name="slot", severity=ERR,
                      message=f"Replication slot {name} already exists, but "
                              + "; ".join(problems) + ".",
                      fix="Set another slot_name, or drop that slot if nothing uses it: "
                          f"SELECT pg_drop_replication_slot('{name}');")]
    if st.info.active:
        return [Check(name="slot", severity=WARN,
                      message=f"Replication slot {name} is ours and in use by pid "
                              f"{st.info.active_pid} (a running daemon?).")]
    return [Check(name="slot", severity=OK,
                  message=f"Replication slot {name} exists and is this install's: enable "
                          "adopts it.")]


def _slot_is_ours(ctx: _Ctx) -> bool:
    return ctx.known_slot or (
        ctx.managed
        and ctx.publication.marked_by(ctx.install_id, ctx.source.name)
        and ctx.publication.marked_slot == ctx.source.slot_name
    )


# ---- tables ---------------------------------------------------------------------------------


def check_tables(ctx: _Ctx) -> list[Check]:
    out: list[Check] = []
    for tc in ctx.source.table_configs:
        facts = ctx.facts.get(tc.ref)
        if facts is None:
            out.append(_missing_table(ctx, tc))
            continue
        out.extend(_table_checks(ctx, tc, facts))
    return out


def _missing_table(ctx: _Ctx, tc: TableConfig) -> Check:
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


def _table_checks(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> list[Check]:
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
            "and each leaf is copied on its own; a TRUNCATE or DETACH of a single partition is "
            "not published by PostgreSQL, and `cdcengine verify` finds that drift.",
            "Prefer TRUNCATE on the root table; run `cdcengine verify` after partition DDL.")
    if tc.columns is not None and ctx.version < 150000:
        add("column_list", WARN, f"{name}: publication column lists need PostgreSQL 15; every "
            "column travels in WAL and the engine keeps only the selected ones.")
    return out


def _key_checks(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> list[Check]:
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
    elif ctx.managed:
        add("replica_identity", OK, f"{name}: replica identity {f.replica_identity} keeps "
            "UPDATE and DELETE working once published.")
    else:
        out.extend(_published_table_checks(ctx, tc, f))
    return out


def _key_type_checks(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> list[Check]:
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


def _published_table_checks(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> list[Check]:
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


def _republish_fix(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> str:
    pub_q = ctx.q(ctx.publication.name)
    cols = _publish_columns(ctx, tc, f)
    listed = table_list_sql([tc.ref], {tc.ref: cols} if cols else None).as_string(ctx.conn)
    return (f"ALTER PUBLICATION {pub_q} DROP TABLE {ctx.q(tc.ref)}; "
            f"ALTER PUBLICATION {pub_q} ADD TABLE {listed};")


def _publish_columns(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> list[str] | None:
    """The column list to publish: selected columns plus identity, none under FULL or < PG15."""
    if tc.columns is None or f.replica_identity == "full" or ctx.version < 150000:
        return None
    cols = list(tc.columns)
    cols += [c for c in f.identity_columns if c not in cols]
    return cols


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _name_checks(ctx: _Ctx, tc: TableConfig, f: TableFacts) -> list[Check]:
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


# ---- publication and thresholds ---------------------------------------------------------------


def check_publication(ctx: _Ctx) -> list[Check]:
    pub, name = ctx.publication, ctx.source.publication_name
    pub_q = ctx.q(name)
    refs = [tc.ref for tc in ctx.source.table_configs]
    if ctx.managed:
        if not pub.exists:
            return [Check(name="publication", severity=OK,
                          message=f"Publication {name} does not exist yet; enable creates it.")]
        if pub.marked_by(ctx.install_id, ctx.source.name):
            return [Check(name="publication", severity=OK,
                          message=f"Publication {name} exists and carries this install's mark: "
                                  "enable adopts it.")]
        return [Check(name="publication", severity=ERR,
                      message=f"Publication {name} already exists and was not created by this "
                              "install (no matching cdcengine mark); it is left untouched.",
                      fix="Set another publication_name, or use management_mode = "
                          "\"self_managed\" to use it as is.")]
    existing = [r for r in refs if r in ctx.facts]
    create = sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
                     ).format(sql.Identifier(name), table_list_sql(existing or refs))
    if not pub.exists:
        return [Check(name="publication", severity=ERR,
                      message=f"Publication {name} does not exist (self_managed mode: you own "
                              "it).", fix=create.as_string(ctx.conn) + ";")]
    out: list[Check] = []
    published = {t.ref for t in pub.tables}
    # Without publish_via_partition_root, pg_publication_tables lists a root's leaves instead.
    missing = [r for r in existing if r not in published and not (
        ctx.facts[r].leaf_partitions and set(ctx.facts[r].leaf_partitions) <= published)]
    if missing:
        out.append(Check(name="publication_tables", severity=ERR,
                         message=f"Publication {name} does not cover "
                                 f"{', '.join(r.qualified for r in missing)}.",
                         fix=f"ALTER PUBLICATION {pub_q} ADD TABLE "
                             f"{table_list_sql(missing).as_string(ctx.conn)};"))
    flags = [op for op, on in (("insert", pub.insert), ("update", pub.update),
                               ("delete", pub.delete), ("truncate", pub.truncate)) if not on]
    if flags:
        out.append(Check(name="publication_operations", severity=ERR,
                         message=f"Publication {name} does not publish {', '.join(flags)}.",
                         fix=f"ALTER PUBLICATION {pub_q} SET (publish = 'insert, update, "
                             "delete, truncate');"))
    partitioned = [r for r in existing if ctx.facts[r].relkind == "p"]
    if partitioned and not pub.via_root:
        out.append(Check(name="publication_partition_root", severity=ERR,
                         message=f"Publication {name} has publish_via_partition_root = false, "
                                 "but partitioned table(s) "
                                 f"{', '.join(r.qualified for r in partitioned)} must be "
                                 "published through their root.",
                         fix=f"ALTER PUBLICATION {pub_q} SET (publish_via_partition_root = "
                             "true);"))
    if not out:
        out.append(Check(name="publication", severity=OK,
                         message=f"Publication {name} covers every table and publishes insert, "
                                 "update, delete and truncate."))
    return out


def check_lag_thresholds(ctx: _Ctx) -> list[Check]:
    s = ctx.source
    t = effective_thresholds(s.lag_warning_threshold_mb, s.lag_critical_threshold_mb,
                             retention_cap_mb(ctx.conn))
    if t.cap_mb is None:
        return [Check(name="lag_thresholds", severity=OK,
                      message=f"Retained WAL: warning at {t.warning_mb} MB, critical at "
                              f"{t.critical_mb} MB (max_slot_wal_keep_size unlimited).")]
    if t.critical_below_warning:
        return [Check(name="lag_thresholds", severity=WARN,
                      message=f"max_slot_wal_keep_size is {t.cap_mb} MB, so the effective "
                              f"critical threshold is {t.critical_mb} MB (80 %), at or below "
                              f"the warning threshold {t.warning_mb} MB; the engine uses "
                              f"{t.critical_mb} MB.",
                      fix="Lower lag_warning_threshold_mb below it (cdcengine settings), or "
                          "raise max_slot_wal_keep_size.")]
    lowered = (f", lowered from {t.configured_critical_mb} MB to 80 % of max_slot_wal_keep_size "
               f"({t.cap_mb} MB)") if t.lowered_by_cap else ""
    return [Check(name="lag_thresholds", severity=OK,
                  message=f"Retained WAL: warning at {t.warning_mb} MB, critical at "
                          f"{t.critical_mb} MB{lowered}.")]


_CHECKS: tuple[Callable[[_Ctx], list[Check]], ...] = (
    check_server_version,
    check_not_standby,
    check_wal_level,
    check_replication_privilege,
    check_create_privilege,
    check_replication_slots,
    check_wal_senders,
    check_replication_connection,
    check_slot,
    check_tables,
    check_publication,
    check_lag_thresholds,
)

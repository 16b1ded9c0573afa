"""Publications: reading them, the install mark, and the DDL the engine runs (managed mode only).

The engine marks a publication it created with `COMMENT ON PUBLICATION … IS 'cdcengine …'`
carrying the install id, the source and the slot name. That mark is the only proof of ownership
it accepts: a publication without our mark is never altered or dropped, and the slot named in the
mark is the one slot that may be adopted along with it.

Every identifier goes through `psycopg.sql.Identifier`; nothing is formatted into SQL by hand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdcengine.names import TableRef
from cdcengine.source.adapter import PublicationInfo

_MARK = re.compile(r"^cdcengine install=(?P<install>[0-9a-f]+) source=(?P<source>\S+) "
                   r"slot=(?P<slot>\S+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedTable:
    ref: TableRef
    columns: tuple[str, ...] | None  # None: every column (no column list)
    row_filter: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicationState:
    name: str
    exists: bool
    all_tables: bool = False
    insert: bool = False
    update: bool = False
    delete: bool = False
    truncate: bool = False
    via_root: bool = False
    mark: str | None = None
    tables: tuple[PublishedTable, ...] = ()

    def marked_by(self, install_id: str, source: str) -> bool:
        m = _MARK.match(self.mark or "")
        return bool(m and m["install"] == install_id and m["source"] == source)

    @property
    def marked_slot(self) -> str | None:
        m = _MARK.match(self.mark or "")
        return m["slot"] if m else None

    def table(self, ref: TableRef) -> PublishedTable | None:
        return next((t for t in self.tables if t.ref == ref), None)


def publication_info(pub: PublicationState, *, install_id: str | None, source: str
                     ) -> PublicationInfo:
    """The engine-neutral view; `owned` tells whether it carries `install_id`'s mark."""
    if not pub.exists:
        return PublicationInfo(name=pub.name, exists=False)
    return PublicationInfo(name=pub.name, exists=True,
                           tables=tuple(t.ref.qualified for t in pub.tables),
                           owned=pub.marked_by(install_id, source) if install_id else None,
                           mark=pub.mark)


def mark_text(install_id: str, source: str, slot: str) -> str:
    return f"cdcengine install={install_id} source={source} slot={slot}"


def read_publication(conn: psycopg.Connection, name: str) -> PublicationState:
    row = conn.execute(
        "SELECT p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate,"
        " p.pubviaroot, obj_description(p.oid, 'pg_publication')"
        " FROM pg_publication p WHERE p.pubname = %s",
        [name],
    ).fetchone()
    if row is None:
        return PublicationState(name=name, exists=False)
    tables: list[PublishedTable] = []
    if conn.info.server_version >= 150000:
        # PG15 added column lists (attnames) and row filters (rowfilter) to this view.
        rows = conn.execute(
            "SELECT schemaname, tablename, attnames, rowfilter FROM pg_publication_tables"
            " WHERE pubname = %s ORDER BY schemaname, tablename",
            [name],
        ).fetchall()
        for schema, table, attnames, rowfilter in rows:
            tables.append(PublishedTable(ref=TableRef(schema, table),
                                         columns=_published_columns(conn, name, schema, table,
                                                                    attnames),
                                         row_filter=rowfilter))
    else:
        rows = conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s"
            " ORDER BY schemaname, tablename",
            [name],
        ).fetchall()
        tables = [PublishedTable(ref=TableRef(s, t), columns=None, row_filter=None)
                  for s, t in rows]
    return PublicationState(
        name=name, exists=True, all_tables=row[0], insert=row[1], update=row[2], delete=row[3],
        truncate=row[4], via_root=row[5], mark=row[6], tables=tuple(tables),
    )


def _published_columns(
    conn: psycopg.Connection, pub: str, schema: str, table: str, attnames: Sequence[str] | None
) -> tuple[str, ...] | None:
    """The explicit column list, or None when the table is published with every column.

    pg_publication_tables always fills attnames (with every column when there is no list), so
    the list is explicit only when pg_publication_rel.prattrs is set.
    """
    row = conn.execute(
        "SELECT pr.prattrs IS NOT NULL FROM pg_publication_rel pr"
        " JOIN pg_publication p ON p.oid = pr.prpubid"
        " JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE p.pubname = %s AND n.nspname = %s AND c.relname = %s",
        [pub, schema, table],
    ).fetchone()
    if row is None or not row[0] or attnames is None:
        return None
    return tuple(attnames)


def table_list_sql(
    refs: Sequence[TableRef], columns: Mapping[TableRef, Sequence[str]] | None = None
) -> sql.Composed:
    """`"s"."t" ("a", "b"), "s2"."t2"` for CREATE/ALTER PUBLICATION."""
    parts: list[sql.Composable] = []
    for ref in refs:
        item: sql.Composable = sql.Identifier(ref.schema, ref.name)
        cols = (columns or {}).get(ref)
        if cols:
            item = sql.SQL("{} ({})").format(item, sql.SQL(", ").join(map(sql.Identifier, cols)))
        parts.append(item)
    return sql.SQL(", ").join(parts)


def create_publication_sql(
    name: str, refs: Sequence[TableRef], columns: Mapping[TableRef, Sequence[str]] | None = None
) -> sql.Composed:
    return sql.SQL(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
    ).format(sql.Identifier(name), table_list_sql(refs, columns))


def create_publication(
    conn: psycopg.Connection,
    name: str,
    refs: Sequence[TableRef],
    *,
    mark: str,
    columns: Mapping[TableRef, Sequence[str]] | None = None,
) -> None:
    """Create and mark in one committed transaction (a slot can only be created after it)."""
    with conn.transaction():
        conn.execute(create_publication_sql(name, refs, columns))
        conn.execute(sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(name), sql.Literal(mark)))


def set_publication_tables(
    conn: psycopg.Connection,
    name: str,
    refs: Sequence[TableRef],
    columns: Mapping[TableRef, Sequence[str]] | None = None,
) -> None:
    """Make an adopted (marked) publication cover exactly `refs`, with its publish flags."""
    with conn.transaction():
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
            sql.Identifier(name), table_list_sql(refs, columns)))
        conn.execute(sql.SQL(
            "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate',"
            " publish_via_partition_root = true)").format(sql.Identifier(name)))


def drop_publication(conn: psycopg.Connection, name: str) -> bool:
    """Drop it if it exists; True when something was dropped. Idempotent."""
    with conn.transaction():
        existed = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                               [name]).fetchone() is not None
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
    return existed

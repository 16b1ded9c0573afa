"""Catalog facts about tables: one query set shared by prerequisite checks, discovery,
provisioning, table snapshots and verify reads.

`load_table_facts(conn, refs)` answers, for many tables at once and in a fixed handful of round
trips (relations, columns, indexes, partition leaves, then the column types through
`types.mapping.load_types`), everything the engine needs to decide whether a table can be
captured and how its rows are keyed: kind, persistence, owner and rights, estimated size,
columns with their PostgreSQL types, primary key, replica identity, usable unique indexes, and
partitioning.

Why `pg_catalog` and never `information_schema`: the information_schema views are filtered by
the caller's privileges (`table_constraints`, `key_column_usage`, `columns` only show objects the
current role owns or holds some privilege on). A role that lacks SELECT on a table would see it
without its primary key there and be told "add a primary key" when the real problem is a missing
GRANT. `pg_class`, `pg_attribute` and `pg_index` are readable by every role, so the facts are the
same whoever asks, and the rights are reported separately (`can_select`,
`owned_by_current_user`).

Names are matched exactly (`nspname`/`relname` equality on parameters, "C" collation of the
`name` type), so `"Odd.Name"`, `Orders` and `orders` are three different tables, as in
PostgreSQL. No SQL is built from names.

Works on PostgreSQL 13-17: `attgenerated` (12+), `pg_partition_root`/`pg_partition_tree` (12+).
`reltuples` is -1 for a never-analyzed table from 14 on; on 13 such a table reports 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from psycopg.rows import tuple_row

from cdcengine.names import TableRef
from cdcengine.sink.fold import key_type_supported
from cdcengine_postgres.types.mapping import PgType, arrow_type, load_types

if TYPE_CHECKING:
    import psycopg

__all__ = ["ColumnFacts", "TableFacts", "effective_key", "load_table_facts",
           "unkeyable_columns"]

# Relation kinds the facts cover: tables and partitioned tables (capturable), and views,
# materialized views and foreign tables (listed by discovery as not capturable).
TABLE_LIKE_RELKINDS = ("r", "p", "v", "m", "f")

_REPLICA_IDENTITY = {"d": "default", "f": "full", "i": "index", "n": "nothing"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnFacts:
    """One live column (`attnum > 0`, not dropped) as the catalog describes it."""

    name: str
    attnum: int
    type_oid: int
    type_text: str  # format_type(atttypid, atttypmod), e.g. "numeric(12,2)", "integer[]"
    not_null: bool
    generated: bool  # attgenerated = 's': never sent by COPY nor by pgoutput (PG < 18)
    pg_type: PgType  # from types.mapping.load_types
    dims: int = 0  # attndims: array dimensions as declared (int[][] -> 2; not enforced)


@dataclass(frozen=True, slots=True, kw_only=True)
class TableFacts:
    """Everything the catalog says about one table-like relation, for checks and discovery."""

    ref: TableRef
    oid: int
    relkind: str  # 'r' table, 'p' partitioned, 'v', 'm', 'f', ...
    persistence: str  # 'p' permanent, 'u' unlogged, 't' temp
    owner: str
    owned_by_current_user: bool  # pg_has_role(current_user, relowner, 'USAGE')
    can_select: bool  # has_table_privilege(oid, 'SELECT')
    estimated_rows: int | None  # reltuples (None: never analyzed); partitioned root: sum of leaves
    columns: tuple[ColumnFacts, ...]  # attnum > 0, not dropped, in attnum order
    primary_key: tuple[str, ...]  # from pg_index.indisprimary, in index order
    replica_identity: str  # "default" | "full" | "index" | "nothing" (relreplident d/f/i/n)
    identity_index: str | None  # name of the index when "index" (pg_index.indisreplident)
    identity_columns: tuple[str, ...]  # the columns an UPDATE/DELETE identifies its row by
    # (index name, key columns) of unique indexes usable as replica identity, sorted by name
    unique_indexes: tuple[tuple[str, tuple[str, ...]], ...]
    is_partition: bool  # relispartition
    partition_root: TableRef | None  # top-most ancestor when is_partition
    leaf_partitions: tuple[TableRef, ...]  # relkind 'p': its leaves, sorted

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> ColumnFacts | None:
        """The column named exactly `name`, or None."""
        for c in self.columns:
            if c.name == name:
                return c
        return None


# ---- queries ------------------------------------------------------------------------------
# Each query is static text with parameters; the relation filter is either "these exact
# (schema, name) pairs" (unnest of two text arrays) or "every user schema".

_RELATIONS_SELECT = """
SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence::text,
       pg_get_userbyid(c.relowner)::text,
       pg_has_role(current_user, c.relowner, 'USAGE'),
       has_table_privilege(c.oid, 'SELECT'),
       c.reltuples::float8, c.relreplident::text, c.relispartition,
       rn.nspname::text, rc.relname::text
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class rc ON c.relispartition AND rc.oid = pg_partition_root(c.oid)
LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
"""

_RELATIONS_BY_REF = (
    _RELATIONS_SELECT
    + """
JOIN unnest(%(schemas)s::text[], %(names)s::text[]) AS r(nsp, rel)
  ON n.nspname = r.nsp AND c.relname = r.rel
WHERE c.relkind::text = ANY(%(relkinds)s::text[])
"""
)

_RELATIONS_ALL = (
    _RELATIONS_SELECT
    + r"""
WHERE c.relkind::text = ANY(%(relkinds)s::text[])
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_toast%%'
  AND n.nspname NOT LIKE 'pg\_temp%%'
"""
)

_COLUMNS = """
SELECT a.attrelid::int8, a.attname::text, a.attnum::int4, a.atttypid::int8,
       format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated = 's',
       a.atttypmod::int4, a.attndims::int4
FROM pg_attribute a
WHERE a.attrelid = ANY(%(oids)s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

# indkey is an int2vector (0 = an expression); its first indnkeyatts entries are the key, the
# rest are INCLUDE columns, which do not take part in uniqueness or in the replica identity.
_INDEXES = """
SELECT i.indrelid::int8, ic.relname::text, i.indisprimary, i.indisreplident, i.indisunique,
       i.indisvalid AND i.indisready AND i.indislive, i.indimmediate,
       i.indpred IS NULL AND i.indexprs IS NULL, i.indnkeyatts::int4, i.indkey::int2[]
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY(%(oids)s::oid[])
"""

_LEAVES = """
SELECT p.root::int8, n.nspname::text, c.relname::text, c.reltuples::float8
FROM unnest(%(oids)s::oid[]) AS p(root),
     LATERAL pg_partition_tree(p.root) AS t
JOIN pg_class c ON c.oid = t.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.isleaf
"""


def _reltuples(value: float | None) -> int | None:
    """`reltuples` as a row estimate: None when the table was never analyzed (-1, PG14+)."""
    if value is None or value < 0:
        return None
    return round(value)


def _column_type(types: dict[int, PgType], oid: int, typmod: int, type_text: str) -> PgType:
    """The column's type with its modifier; a type dropped concurrently reads as text."""
    t = types.get(oid)
    if t is None:
        # A column's type cannot be dropped while the column exists, so this only happens
        # when the table changed between our queries: describe it as an unknown string type.
        return PgType(type_text, oid, "b", "U", typmod)
    return t.with_typmod(typmod)


def load_table_facts(
    conn: psycopg.Connection[Any], refs: Sequence[TableRef] | None = None
) -> dict[TableRef, TableFacts]:
    """Facts for the tables named by `refs`, or for every table-like relation in user schemas.

    `refs=None` covers tables, partitioned tables, partitions, views, materialized views and
    foreign tables in every schema but `pg_catalog`, `information_schema`, `pg_toast*` and
    `pg_temp*`. With `refs`, each is matched exactly (case-sensitive, no parsing); a ref that
    names no table-like relation is simply absent from the result.

    Read-only and safe in any transaction state the caller leaves the connection in (it opens
    no transaction of its own beyond what the connection's autocommit setting implies). Five
    round trips whatever the number of tables: relations, columns, indexes, partition leaves,
    types.
    """
    rows = _read_catalog(conn, refs)
    if not rows.relations:
        return {}
    types = load_types(conn, sorted({int(row[3]) for row in rows.columns}))
    columns = _columns_by_table(rows.columns, types)
    indexes = _indexes_by_table(rows.indexes)
    leaves = _leaves_by_root(rows.leaves)
    out: dict[TableRef, TableFacts] = {}
    for row in rows.relations:
        relation = _Relation(*row)
        oid = int(relation.oid)
        facts = _table_facts(relation, columns.get(oid, []), indexes.get(oid, []),
                             leaves.get(oid, []))
        out[facts.ref] = facts
    return out


class _CatalogRows(NamedTuple):
    """The raw rows of the four catalog queries (types are read afterwards)."""

    relations: list[tuple[Any, ...]]
    columns: list[tuple[Any, ...]]
    indexes: list[tuple[Any, ...]]
    leaves: list[tuple[int, str, str, float]]


class _Relation(NamedTuple):
    """One row of `_RELATIONS_SELECT`, its columns named."""

    oid: int
    nsp: str
    rel: str
    relkind: str
    persistence: str
    owner: str
    owned: bool
    can_select: bool
    reltuples: float | None
    replident: str
    is_partition: bool
    root_nsp: str | None
    root_rel: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Index:
    name: str
    primary: bool
    replident: bool
    usable_unique: bool  # unique, valid, immediate, not partial, no expression
    key: tuple[int, ...]  # key attnums (INCLUDE columns left out)


def _read_catalog(conn: psycopg.Connection[Any], refs: Sequence[TableRef] | None) -> _CatalogRows:
    """Run the relation query (these refs, or every user schema), then the columns, indexes and
    partition leaves of what it found; nothing but the relation query when it finds nothing."""
    params: dict[str, object] = {"relkinds": list(TABLE_LIKE_RELKINDS)}
    if refs is None:
        query = _RELATIONS_ALL
    else:
        unique = list(dict.fromkeys(refs))
        if not unique:
            return _CatalogRows([], [], [], [])
        query = _RELATIONS_BY_REF
        params["schemas"] = [r.schema for r in unique]
        params["names"] = [r.name for r in unique]

    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, params)
        relations = cur.fetchall()
        if not relations:
            return _CatalogRows([], [], [], [])
        oids = [int(row[0]) for row in relations]

        cur.execute(_COLUMNS, {"oids": oids})
        column_rows = cur.fetchall()

        cur.execute(_INDEXES, {"oids": oids})
        index_rows = cur.fetchall()

        partitioned = [int(row[0]) for row in relations if row[3] == "p"]
        leaf_rows: list[tuple[int, str, str, float]] = []
        if partitioned:
            cur.execute(_LEAVES, {"oids": partitioned})
            leaf_rows = [(int(r[0]), r[1], r[2], r[3]) for r in cur.fetchall()]
    return _CatalogRows(relations, column_rows, index_rows, leaf_rows)


def _columns_by_table(rows: list[tuple[Any, ...]],
                      types: dict[int, PgType]) -> dict[int, list[ColumnFacts]]:
    """Each table's live columns, in attnum order, keyed by the table's oid."""
    columns: dict[int, list[ColumnFacts]] = {}
    for relid, name, attnum, typid, type_text, not_null, generated, typmod, dims in rows:
        # load_types describes types without a modifier; numeric(12,2) vs numeric is the
        # column's atttypmod (an array column's modifier applies to its elements).
        columns.setdefault(int(relid), []).append(
            ColumnFacts(
                name=name,
                attnum=int(attnum),
                type_oid=int(typid),
                type_text=type_text,
                not_null=bool(not_null),
                generated=bool(generated),
                pg_type=_column_type(types, int(typid), int(typmod), type_text),
                dims=int(dims or 0),
            )
        )
    return columns


def _indexes_by_table(rows: list[tuple[Any, ...]]) -> dict[int, list[_Index]]:
    """Each table's indexes, keyed by the table's oid."""
    indexes: dict[int, list[_Index]] = {}
    for relid, name, primary, replident, unique, valid, immediate, plain, nkey, indkey in rows:
        indexes.setdefault(int(relid), []).append(
            _Index(
                name=name,
                primary=bool(primary),
                replident=bool(replident),
                usable_unique=bool(unique and valid and immediate and plain),
                key=tuple(int(k) for k in list(indkey)[: int(nkey)]),
            )
        )
    return indexes


def _leaves_by_root(
    rows: list[tuple[int, str, str, float]],
) -> dict[int, list[tuple[TableRef, int | None]]]:
    """Each partitioned table's leaf partitions with their row estimates, keyed by its oid."""
    leaves: dict[int, list[tuple[TableRef, int | None]]] = {}
    for root, nsp, rel, reltuples in rows:
        leaves.setdefault(root, []).append((TableRef(nsp, rel), _reltuples(reltuples)))
    return leaves


def _table_facts(relation: _Relation, columns: list[ColumnFacts], indexes: list[_Index],
                 leaves: list[tuple[TableRef, int | None]]) -> TableFacts:
    """One table's facts from its catalog rows."""
    cols = tuple(columns)
    by_attnum = {c.attnum: c for c in cols}
    primary_key = _primary_key(indexes, by_attnum)
    identity, identity_index, identity_columns = _replica_identity(
        str(relation.replident), indexes, by_attnum, primary_key)
    leaf_list = sorted(leaves, key=lambda item: item[0])
    is_partition = bool(relation.is_partition)
    ref = TableRef(relation.nsp, relation.rel)
    return TableFacts(
        ref=ref,
        oid=int(relation.oid),
        relkind=relation.relkind,
        persistence=relation.persistence,
        owner=relation.owner,
        owned_by_current_user=bool(relation.owned),
        can_select=bool(relation.can_select),
        estimated_rows=_estimated_rows(relation, leaf_list),
        columns=cols,
        primary_key=primary_key,
        replica_identity=identity,
        identity_index=identity_index,
        identity_columns=identity_columns,
        unique_indexes=_usable_unique_indexes(indexes, by_attnum),
        is_partition=is_partition,
        partition_root=(
            TableRef(relation.root_nsp, relation.root_rel)
            if is_partition and relation.root_nsp is not None and relation.root_rel is not None
            else None
        ),
        leaf_partitions=tuple(r for r, _ in leaf_list),
    )


def _primary_key(indexes: list[_Index], by_attnum: dict[int, ColumnFacts]) -> tuple[str, ...]:
    """The primary key's columns in index order; empty without one."""
    primary_key: tuple[str, ...] = ()
    for ix in indexes:
        if ix.primary:
            primary_key = _names_of(ix.key, by_attnum) or ()
    return primary_key


def _usable_unique_indexes(
    indexes: list[_Index], by_attnum: dict[int, ColumnFacts]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, key columns) of the unique indexes usable as replica identity (valid, immediate,
    no predicate or expression, every key column NOT NULL), sorted by name."""
    return tuple(
        sorted(
            (ix.name, names)
            for ix in indexes
            if ix.usable_unique
            and (names := _names_of(ix.key, by_attnum)) is not None
            and all(by_attnum[k].not_null for k in ix.key)
        )
    )


def _replica_identity(
    replident: str, indexes: list[_Index], by_attnum: dict[int, ColumnFacts],
    primary_key: tuple[str, ...],
) -> tuple[str, str | None, tuple[str, ...]]:
    """(replica identity, its index's name, the columns an UPDATE/DELETE identifies its row by)."""
    identity = _REPLICA_IDENTITY.get(replident, replident)
    identity_index: str | None = None
    identity_columns: tuple[str, ...] = ()
    if identity == "default":
        identity_columns = primary_key
    elif identity == "index":
        # An identity index that was dropped leaves relreplident = 'i' with no
        # indisreplident row; PostgreSQL then behaves as NOTHING, and so do we.
        for ix in indexes:
            if ix.replident:
                identity_index = ix.name
                identity_columns = _names_of(ix.key, by_attnum) or ()
    elif identity == "full":  # every column but generated ones, in attnum order
        identity_columns = tuple(c.name for c in by_attnum.values() if not c.generated)
    return identity, identity_index, identity_columns


def _estimated_rows(relation: _Relation,
                    leaf_list: list[tuple[TableRef, int | None]]) -> int | None:
    """The table's row estimate; a partitioned table's is the sum over its leaves."""
    if relation.relkind != "p":
        return _reltuples(relation.reltuples)
    if not leaf_list:
        return 0  # a partitioned table without partitions holds nothing
    known = [n for _, n in leaf_list if n is not None]
    return sum(known) if known else None


def _names_of(key: tuple[int, ...], by_attnum: dict[int, ColumnFacts]) -> tuple[str, ...] | None:
    """Column names of an index key, or None when it has an expression (attnum 0)."""
    if not key or any(k not in by_attnum for k in key):
        return None
    return tuple(by_attnum[k].name for k in key)


def effective_key(f: TableFacts, declared: Sequence[str] | None) -> tuple[str, ...]:
    """The columns rows are keyed on: the declared `primary_key`, else the primary key, else
    the replica identity index's columns; empty when there is none."""
    if declared:
        return tuple(declared)
    if f.primary_key:
        return f.primary_key
    return f.identity_columns if f.replica_identity == "index" else ()


def unkeyable_columns(f: TableFacts, key: Sequence[str]) -> list[ColumnFacts]:
    """The key columns whose type rows cannot be keyed on (arrays: see `key_type_supported`)."""
    cols = (f.column(name) for name in key)
    return [c for c in cols if c is not None and not key_type_supported(arrow_type(c.pg_type))]


def lacks_identity(f: TableFacts) -> bool:
    """No old-row key for UPDATE/DELETE: DEFAULT without a PK, NOTHING, or a dropped index."""
    return (
        (f.replica_identity == "default" and not f.primary_key)
        or f.replica_identity == "nothing"
        or (f.replica_identity == "index" and not f.identity_columns)
    )

"""What rows that existed before an `ALTER TABLE … ADD COLUMN` hold in the new column.

PostgreSQL writes no WAL for them: a constant ("fast") default is stored once in the catalog
(`pg_attribute.atthasmissing` / `attmissingval`) and read into old rows on the fly; a volatile
default (or an identity column) rewrites the table, and that rewrite is not logically decoded.
So the stream alone cannot tell the engine what old rows hold; this catalog read can.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from cdcengine.names import TableRef
from cdcengine.source.adapter import ColumnDefault, DefaultKind
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.mapping import load_types

DEFAULTS_QUERY = """
SELECT a.attname, a.atthasmissing, (a.attmissingval::text::text[])[1] AS missing,
       d.adbin IS NOT NULL AS has_default, a.attidentity <> '' AS identity,
       a.atttypid, a.atttypmod
  FROM pg_attribute a
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass
   AND a.attname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
"""


def added_column_defaults(conn: psycopg.Connection, ref: TableRef,
                          columns: Sequence[str]) -> dict[str, ColumnDefault]:
    rows = conn.execute(DEFAULTS_QUERY, (ref.schema, ref.name, list(columns))).fetchall()
    types = load_types(conn, {int(r[5]) for r in rows})
    out: dict[str, ColumnDefault] = {}
    for name, has_missing, missing, has_default, identity, oid, typmod in rows:
        if has_missing and missing is not None and int(oid) in types:
            pgtype = types[int(oid)].with_typmod(int(typmod))
            converted = to_arrow([missing.encode()], pgtype)
            if converted.masked:  # the Delta type cannot hold it: old rows stay null
                out[name] = ColumnDefault(kind=DefaultKind.NONE, text=missing)
            else:
                out[name] = ColumnDefault(kind=DefaultKind.FAST, value=converted.array[0],
                                          text=missing)
        elif has_missing or has_default or identity:
            # a rewrite gave each old row its own value (volatile default, identity), or a
            # missing value this read cannot decode: only a re-snapshot is exact
            out[name] = ColumnDefault(kind=DefaultKind.REWRITTEN, text=missing)
        else:
            out[name] = ColumnDefault(kind=DefaultKind.NONE)
    return out

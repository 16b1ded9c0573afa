"""PostgreSQL types → Arrow types (SPEC §6), and the catalog rows they are decided from.

`PgType` is one `pg_type` row with what it refers to resolved: an array's element, a domain's base.
`arrow_type` is the SPEC §6 mapping, a pure function of that description and of the column's type
modifier, so `tables`, the snapshot and the stream agree on one Delta schema:

| PostgreSQL                                  | Arrow                     | Delta           |
|---------------------------------------------|---------------------------|-----------------|
| bool                                        | bool                      | boolean         |
| int2 / int4 / int8                          | int16 / int32 / int64     | short/integer/long |
| float4 / float8                             | float32 / float64         | float / double  |
| numeric(p,s), 1 ≤ p ≤ 38, 0 ≤ s ≤ p         | decimal128(p,s)           | decimal(p,s)    |
| numeric unconstrained, p > 38, s < 0, s > p | string (exact text)       | string          |
| bytea                                       | binary                    | binary          |
| date                                        | date32                    | date            |
| timestamp                                   | timestamp[us]             | timestamp_ntz   |
| timestamptz                                 | timestamp[us, UTC]        | timestamp       |
| one-dimensional array of T                  | list<T>                   | array<T>        |
| domain over T                               | as T                      |                 |
| everything else (text, varchar, char, name, citext, enum, uuid, json, jsonb, xml, inet,    |
| cidr, macaddr, interval, time, timetz, ranges, multiranges, geometric, bit, varbit, money, |
| tsvector, composite, pseudo, extension types) | string (canonical text)  | string          |

Built-in types are recognised by OID (fixed below 10000 in every PostgreSQL release), never by
name: `typname` is unique only per schema, so a user's `myschema.int8` composite must not map to
int64. Extension types (citext, hstore, ...) get OIDs at CREATE EXTENSION time and fall to string.

The typmod is a *column* property (`pg_attribute.atttypmod`), not a `pg_type` one: `load_types`
returns every type with `typmod = -1`, and the caller applies a column's modifier with
`PgType.with_typmod`. A domain's own modifier (`pg_type.typtypmod`, e.g. `CREATE DOMAIN money2 AS
numeric(12,2)`) is stored on its `base`. An array column's modifier applies to its elements
(`numeric(12,2)[]` has atttypmod of numeric(12,2)).

PostgreSQL does not enforce an array column's dimensions (`attndims` is advisory): `int4[]` and
`int4[][]` are the same type. The mapping is `list<T>` for any array type; a multi-dimensional
value is the value converter's problem (SPEC §6 covers one-dimensional arrays).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

import psycopg
import pyarrow as pa
from psycopg.rows import TupleRow

__all__ = [
    "CATALOG_TYPE_QUERY",
    "PgType",
    "arrow_type",
    "decode_numeric_typmod",
    "delta_type_name",
    "load_types",
    "needs_timestamp_ntz",
]

# Built-in type OIDs (src/include/catalog/pg_type.dat; stable across releases).
BOOL_OID: Final = 16
BYTEA_OID: Final = 17
INT8_OID: Final = 20
INT2_OID: Final = 21
INT4_OID: Final = 23
FLOAT4_OID: Final = 700
FLOAT8_OID: Final = 701
DATE_OID: Final = 1082
TIMESTAMP_OID: Final = 1114
TIMESTAMPTZ_OID: Final = 1184
NUMERIC_OID: Final = 1700

# Arrow's decimal128 holds 38 significant digits.
MAX_DECIMAL128_PRECISION: Final = 38

_FIXED: Final[dict[int, pa.DataType]] = {
    BOOL_OID: pa.bool_(),
    BYTEA_OID: pa.binary(),
    INT2_OID: pa.int16(),
    INT4_OID: pa.int32(),
    INT8_OID: pa.int64(),
    FLOAT4_OID: pa.float32(),
    FLOAT8_OID: pa.float64(),
    DATE_OID: pa.date32(),
    TIMESTAMP_OID: pa.timestamp("us"),
    TIMESTAMPTZ_OID: pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True, slots=True)
class PgType:
    """One `pg_type` row, with its array element or domain base resolved.

    `typtype`: b base, c composite, d domain, e enum, p pseudo, r range, m multirange.
    `category`: `typcategory` (A array, N numeric, S string, D datetime, U user, ...); for a domain
    it is its base's category. `typmod`: the column's type modifier, -1 when none (see the module
    docstring). `element`: for an array (category A), its element type. `base`: for a domain, the
    type it constrains, carrying the domain's own typmod.
    """

    name: str
    oid: int
    typtype: str
    category: str
    typmod: int
    element: PgType | None = None
    base: PgType | None = None

    def with_typmod(self, typmod: int) -> PgType:
        """This type as used by a column whose `atttypmod` is `typmod`."""
        return self if typmod == self.typmod else replace(self, typmod=typmod)

    @property
    def is_array(self) -> bool:
        return self.category == "A" and self.element is not None


def decode_numeric_typmod(typmod: int) -> tuple[int, int] | None:
    """(precision, scale) of a numeric typmod, or None for an unconstrained numeric (-1).

    Layout (utils/adt/numeric.c, `make_numeric_typmod`): `((precision << 16) | (scale & 0x7ff))
    + VARHDRSZ`, VARHDRSZ = 4. PostgreSQL 15 allows a scale from -1000 to 1000, so the low 11
    bits are a two's-complement number, sign-extended with `(x ^ 1024) - 1024`; older releases only
    stored 0 ≤ scale ≤ precision ≤ 1000, which decodes identically.
    """
    if typmod < 4:
        return None
    raw = typmod - 4
    precision = (raw >> 16) & 0xFFFF
    scale = ((raw & 0x7FF) ^ 1024) - 1024
    return precision, scale


def _numeric_arrow(typmod: int) -> pa.DataType:
    """decimal128(p,s) when Arrow can hold every value exactly, else string (exact text)."""
    decoded = decode_numeric_typmod(typmod)
    if decoded is None:
        return pa.string()  # unconstrained: any precision and scale, and 'NaN'
    precision, scale = decoded
    if 1 <= precision <= MAX_DECIMAL128_PRECISION and 0 <= scale <= precision:
        return pa.decimal128(precision, scale)
    return pa.string()


def arrow_type(t: PgType) -> pa.DataType:
    """The Arrow type SPEC §6 assigns to a column of PostgreSQL type `t` (with its typmod)."""
    if t.typtype == "d":
        return arrow_type(t.base) if t.base is not None else pa.string()
    if t.category == "A":
        if t.element is None:
            return pa.string()
        element = t.element
        if t.typmod != -1 and element.typmod == -1:
            element = element.with_typmod(t.typmod)
        return pa.list_(arrow_type(element))
    if t.typtype != "b":  # composite, enum, range, multirange, pseudo
        return pa.string()
    if t.oid == NUMERIC_OID:
        return _numeric_arrow(t.typmod)
    return _FIXED.get(t.oid, pa.string())


def delta_type_name(t: pa.DataType) -> str:
    """Delta Lake's name for the type an Arrow type is stored as, e.g. `decimal(12,2)`.

    For people (`cdcengine tables`), not for writing schemas: deltalake derives those itself.
    A timestamp with a time zone is Delta `timestamp` (UTC-adjusted), without one
    `timestamp_ntz` (the timestampNtz table feature).
    """
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t):
        return "byte"
    if pa.types.is_int16(t):
        return "short"
    if pa.types.is_int32(t):
        return "integer"
    if pa.types.is_int64(t):
        return "long"
    if pa.types.is_float32(t):
        return "float"
    if pa.types.is_float64(t):
        return "double"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp" if t.tz is not None else "timestamp_ntz"
    if pa.types.is_decimal(t):
        return f"decimal({t.precision},{t.scale})"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"array<{delta_type_name(t.value_type)}>"
    if pa.types.is_map(t):
        return f"map<{delta_type_name(t.key_type)},{delta_type_name(t.item_type)}>"
    if pa.types.is_struct(t):
        fields = ",".join(f"{f.name}:{delta_type_name(f.type)}" for f in t)
        return f"struct<{fields}>"
    return str(t)


def needs_timestamp_ntz(t: pa.DataType | PgType) -> bool:
    """Whether a column of this type needs Delta's timestampNtz table feature (readers must
    support it): a timestamp without time zone, at any depth of lists, maps and structs."""
    at = arrow_type(t) if isinstance(t, PgType) else t
    if pa.types.is_timestamp(at):
        return at.tz is None
    if pa.types.is_list(at) or pa.types.is_large_list(at) or pa.types.is_list_view(at):
        return needs_timestamp_ntz(at.value_type)
    if pa.types.is_map(at):
        return needs_timestamp_ntz(at.key_type) or needs_timestamp_ntz(at.item_type)
    if pa.types.is_struct(at):
        return any(needs_timestamp_ntz(f.type) for f in at)
    return False


# typelem is also set on some fixed-length non-array types (name → char, point → float8), so the
# element is only followed for category 'A'; typbasetype only for domains. Read from pg_catalog, not
# information_schema, which hides types the role has no privilege on.
CATALOG_TYPE_QUERY: Final = """
SELECT t.oid::int8, t.typname::text, t.typtype::text, t.typcategory::text,
       CASE WHEN t.typcategory = 'A' THEN t.typelem::int8 ELSE 0 END,
       CASE WHEN t.typtype = 'd' THEN t.typbasetype::int8 ELSE 0 END,
       t.typtypmod::int4
FROM pg_catalog.pg_type t
WHERE t.oid = ANY(%(oids)s::int8[]::oid[])
"""

_Row = tuple[int, str, str, str, int, int, int]

# Domains over domains over arrays of domains: real schemas stay far below this.
_MAX_DEPTH: Final = 16


def load_types(conn: psycopg.Connection[TupleRow], oids: Iterable[int]) -> dict[int, PgType]:
    """`PgType`s for `oids` (and only those keys), element and base types resolved recursively.

    Runs `CATALOG_TYPE_QUERY` (parameterised, so not on a replication connection) once per level
    of nesting, usually one or two round trips. Every returned type has `typmod = -1`: apply a
    column's `atttypmod` with `PgType.with_typmod`. An OID with no `pg_type` row (a type dropped
    concurrently) is absent from the result. Read-only; runs in whatever transaction state the
    connection is in.
    """
    wanted = sorted({int(o) for o in oids})
    rows: dict[int, _Row] = {}
    todo = [o for o in wanted if o]
    depth = 0
    while todo and depth < _MAX_DEPTH:
        depth += 1
        with conn.cursor() as cur:
            cur.execute(CATALOG_TYPE_QUERY, {"oids": todo})
            fetched = cur.fetchall()
        nxt: set[int] = set()
        for row in fetched:
            oid, name, typtype, category, elem, base, typtypmod = row
            rows[int(oid)] = (
                int(oid),
                str(name),
                str(typtype),
                str(category),
                int(elem),
                int(base),
                int(typtypmod),
            )
            for ref in (int(elem), int(base)):
                if ref and ref not in rows:
                    nxt.add(ref)
        todo = sorted(nxt)

    built: dict[int, PgType] = {}

    def build(oid: int, seen: frozenset[int]) -> PgType | None:
        if oid in built:
            return built[oid]
        row = rows.get(oid)
        if row is None or oid in seen:
            return None
        _, name, typtype, category, elem, base, typtypmod = row
        seen = seen | {oid}
        element = build(elem, seen) if elem else None
        base_type = build(base, seen) if base else None
        if base_type is not None:
            base_type = base_type.with_typmod(typtypmod)
        t = PgType(name, oid, typtype, category, -1, element=element, base=base_type)
        built[oid] = t
        return t

    out: dict[int, PgType] = {}
    for oid in wanted:
        t = build(oid, frozenset())
        if t is not None:
            out[oid] = t
    return out

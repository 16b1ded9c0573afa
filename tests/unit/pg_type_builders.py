"""PgType builders shared by the type-mapping and conversion unit tests."""

from __future__ import annotations

from cdcengine_postgres.types.mapping import PgType


def base(name: str, oid: int, category: str = "U", typmod: int = -1) -> PgType:
    return PgType(name, oid, "b", category, typmod)


def array_of(element: PgType, oid: int, typmod: int = -1) -> PgType:
    return PgType("_" + element.name, oid, "b", "A", typmod, element=element)


def domain(name: str, over: PgType, oid: int = 20001) -> PgType:
    return PgType(name, oid, "d", over.category, -1, base=over)


def numeric_typmod(precision: int, scale: int) -> int:
    """What PostgreSQL 15 stores in atttypmod for numeric(precision, scale)."""
    return ((precision << 16) | (scale & 0x7FF)) + 4


BOOL = base("bool", 16, "B")
INT2 = base("int2", 21, "N")
INT4 = base("int4", 23, "N")
INT8 = base("int8", 20, "N")
FLOAT4 = base("float4", 700, "N")
FLOAT8 = base("float8", 701, "N")
NUMERIC = base("numeric", 1700, "N")

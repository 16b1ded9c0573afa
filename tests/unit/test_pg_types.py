"""SPEC §6: PostgreSQL type → Arrow type → Delta type name (no server needed).

The `PgType`s are built the way `load_types` builds them from pg_type rows (OIDs of built-in types
are fixed; extension and user types get arbitrary OIDs >= 16384).
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from pg_type_builders import (
    BOOL,
    FLOAT4,
    FLOAT8,
    INT2,
    INT4,
    INT8,
    NUMERIC,
    array_of,
    base,
    domain,
    numeric_typmod,
)

from cdcengine_postgres.types.mapping import (
    PgType,
    arrow_type,
    decode_numeric_typmod,
    delta_type_name,
    needs_timestamp_ntz,
)

TEXT = base("text", 25, "S")
BYTEA = base("bytea", 17, "U")
DATE = base("date", 1082, "D")
TIMESTAMP = base("timestamp", 1114, "D")
TIMESTAMPTZ = base("timestamptz", 1184, "D")

STRING_TYPES = [
    base("text", 25, "S"),
    base("varchar", 1043, "S", typmod=54),
    base("bpchar", 1042, "S", typmod=14),
    base("char", 18, "Z"),
    base("name", 19, "S"),
    base("citext", 16390, "S"),  # extension type: OID assigned at CREATE EXTENSION
    PgType("mood", 16400, "e", "E", -1),
    base("uuid", 2950),
    base("json", 114),
    base("jsonb", 3802),
    base("xml", 142),
    base("inet", 869, "I"),
    base("cidr", 650, "I"),
    base("macaddr", 829),
    base("interval", 1186, "T"),
    base("time", 1083, "D"),
    base("timetz", 1266, "D"),
    PgType("int4range", 3904, "r", "R", -1),
    PgType("int4multirange", 4451, "m", "R", -1),
    base("point", 600, "G"),
    base("polygon", 604, "G"),
    base("bit", 1560, "V", typmod=8),
    base("varbit", 1562, "V"),
    base("money", 790, "N"),
    base("tsvector", 3614),
    base("oid", 26, "N"),
    PgType("address", 16410, "c", "C", -1),
    PgType("record", 2249, "p", "P", -1),
    base("hstore", 16500),
]


@pytest.mark.parametrize(
    ("pg", "arrow", "delta"),
    [
        (BOOL, pa.bool_(), "boolean"),
        (INT2, pa.int16(), "short"),
        (INT4, pa.int32(), "integer"),
        (INT8, pa.int64(), "long"),
        (FLOAT4, pa.float32(), "float"),
        (FLOAT8, pa.float64(), "double"),
        (BYTEA, pa.binary(), "binary"),
        (DATE, pa.date32(), "date"),
        (TIMESTAMP, pa.timestamp("us"), "timestamp_ntz"),
        (TIMESTAMPTZ, pa.timestamp("us", tz="UTC"), "timestamp"),
        (TIMESTAMP.with_typmod(3), pa.timestamp("us"), "timestamp_ntz"),
        (NUMERIC, pa.string(), "string"),
    ],
    ids=lambda v: v.name if isinstance(v, PgType) else None,
)
def test_fixed_mapping(pg: PgType, arrow: pa.DataType, delta: str) -> None:
    assert arrow_type(pg) == arrow
    assert delta_type_name(arrow_type(pg)) == delta


@pytest.mark.parametrize("pg", STRING_TYPES, ids=lambda t: t.name)
def test_string_types(pg: PgType) -> None:
    assert arrow_type(pg) == pa.string()
    assert delta_type_name(arrow_type(pg)) == "string"


def test_builtin_types_are_recognised_by_oid_not_name() -> None:
    # A user's composite or enum named like a built-in type is still a string.
    assert arrow_type(PgType("int8", 16999, "c", "C", -1)) == pa.string()
    assert arrow_type(PgType("bool", 16998, "e", "E", -1)) == pa.string()
    assert arrow_type(base("int4", 16997, "N")) == pa.string()


@pytest.mark.parametrize(
    ("precision", "scale", "expected"),
    [
        (12, 2, pa.decimal128(12, 2)),
        (38, 0, pa.decimal128(38, 0)),
        (38, 38, pa.decimal128(38, 38)),
        (1, 0, pa.decimal128(1, 0)),
        (5, 5, pa.decimal128(5, 5)),
        (39, 2, pa.string()),  # beyond decimal128
        (1000, 0, pa.string()),
        (5, -2, pa.string()),  # PG 15: negative scale rounds to hundreds
        (3, 5, pa.string()),  # PG 15: scale > precision (0.00xyz)
        (10, -1000, pa.string()),
        (10, 1000, pa.string()),
    ],
)
def test_numeric_typmod(precision: int, scale: int, expected: pa.DataType) -> None:
    typmod = numeric_typmod(precision, scale)
    assert decode_numeric_typmod(typmod) == (precision, scale)
    assert arrow_type(NUMERIC.with_typmod(typmod)) == expected


def test_numeric_typmod_values_from_postgres() -> None:
    # atttypmod values read from a PostgreSQL 15 catalog.
    assert decode_numeric_typmod(786438) == (12, 2)  # numeric(12,2)
    assert decode_numeric_typmod(329730) == (5, -2)  # numeric(5,-2)
    assert decode_numeric_typmod(-1) is None
    assert decode_numeric_typmod(0) is None
    assert delta_type_name(arrow_type(NUMERIC.with_typmod(786438))) == "decimal(12,2)"


def test_arrays() -> None:
    assert arrow_type(array_of(INT4, 1007)) == pa.list_(pa.int32())
    assert arrow_type(array_of(TEXT, 1009)) == pa.list_(pa.string())
    assert arrow_type(array_of(TIMESTAMPTZ, 1185)) == pa.list_(pa.timestamp("us", tz="UTC"))
    assert delta_type_name(arrow_type(array_of(INT8, 1016))) == "array<long>"
    assert delta_type_name(arrow_type(array_of(TIMESTAMP, 1115))) == "array<timestamp_ntz>"
    mood = PgType("mood", 16400, "e", "E", -1)
    assert arrow_type(array_of(mood, 16401)) == pa.list_(pa.string())


def test_array_column_typmod_applies_to_elements() -> None:
    numeric_array = array_of(NUMERIC, 1231).with_typmod(numeric_typmod(12, 2))
    assert arrow_type(numeric_array) == pa.list_(pa.decimal128(12, 2))
    assert delta_type_name(arrow_type(numeric_array)) == "array<decimal(12,2)>"
    assert arrow_type(array_of(NUMERIC, 1231)) == pa.list_(pa.string())


def test_array_with_unknown_element_is_string() -> None:
    assert arrow_type(PgType("_weird", 16600, "b", "A", -1)) == pa.string()


def test_domains_map_as_their_base() -> None:
    bigid = domain("bigid", INT8)
    assert arrow_type(bigid) == pa.int64()
    money2 = domain("money2", NUMERIC.with_typmod(numeric_typmod(12, 2)))
    assert arrow_type(money2) == pa.decimal128(12, 2)
    assert arrow_type(domain("email", TEXT)) == pa.string()
    # domain over a domain, and over an array
    assert arrow_type(domain("posid", bigid, oid=20002)) == pa.int64()
    assert arrow_type(domain("ints", array_of(INT4, 1007), oid=20003)) == pa.list_(pa.int32())
    # array of a domain
    assert arrow_type(array_of(money2, 20004)) == pa.list_(pa.decimal128(12, 2))
    # a domain whose base could not be resolved
    assert arrow_type(PgType("lost", 20005, "d", "N", -1)) == pa.string()


def test_enum_is_string() -> None:
    assert arrow_type(PgType("mood", 16400, "e", "E", -1)) == pa.string()


def test_needs_timestamp_ntz() -> None:
    assert needs_timestamp_ntz(pa.timestamp("us"))
    assert not needs_timestamp_ntz(pa.timestamp("us", tz="UTC"))
    assert needs_timestamp_ntz(pa.list_(pa.timestamp("us")))
    assert needs_timestamp_ntz(pa.struct([("a", pa.int32()), ("b", pa.timestamp("us"))]))
    assert not needs_timestamp_ntz(pa.int64())
    assert needs_timestamp_ntz(TIMESTAMP)
    assert needs_timestamp_ntz(array_of(TIMESTAMP, 1115))
    assert not needs_timestamp_ntz(TIMESTAMPTZ)
    assert needs_timestamp_ntz(domain("ts", TIMESTAMP))


def test_delta_type_names_of_other_arrow_types() -> None:
    assert delta_type_name(pa.int8()) == "byte"
    assert delta_type_name(pa.large_string()) == "string"
    assert delta_type_name(pa.large_binary()) == "binary"
    assert delta_type_name(pa.map_(pa.string(), pa.int64())) == "map<string,long>"
    assert delta_type_name(pa.struct([("a", pa.int32())])) == "struct<a:integer>"
    assert delta_type_name(pa.list_(pa.list_(pa.int16()))) == "array<array<short>>"


def test_pgtype_is_frozen_and_hashable() -> None:
    t = array_of(INT4, 1007)
    assert t.is_array
    assert not INT4.is_array
    assert hash(t) == hash(array_of(INT4, 1007))
    with pytest.raises(AttributeError):
        t.typmod = 5  # type: ignore[misc]
    assert t.with_typmod(-1) is t

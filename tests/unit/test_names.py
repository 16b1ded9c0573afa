"""Table names: parsing and canonical quoting, Delta path escaping, the reserved `_cdc_` prefix,
and case collisions (SPEC §2)."""

from __future__ import annotations

import pytest

from cdcengine.names import (
    APPEND_SUFFIX,
    ENGINE_COLUMN_PREFIX,
    NameError_,
    TableRef,
    case_collisions,
    escape_path_segment,
    is_engine_column,
    pg_identifier,
    unescape_path_segment,
)


@pytest.mark.parametrize(("text", "schema", "name"), [
    ("orders", "public", "orders"),
    ("public.orders", "public", "orders"),
    ("sales.orders", "sales", "orders"),
    ("Sales.Orders", "Sales", "Orders"),  # exact, case-sensitive: no folding
    ("ORDERS", "public", "ORDERS"),
    ('"my.schema".orders', "my.schema", "orders"),
    ('"my.schema"."a.b"', "my.schema", "a.b"),
    ('sales."Big Table"', "sales", "Big Table"),
    ('"a""b".c', 'a"b', "c"),
    ('"""x"""', "public", '"x"'),
    ('"orders"', "public", "orders"),
    ("my table", "public", "my table"),
    ("tbl$1", "public", "tbl$1"),
    ("1abc", "public", "1abc"),
    ('"é"."ü"', "é", "ü"),
    ("s" * 63, "public", "s" * 63),
])
def test_parse(text: str, schema: str, name: str) -> None:
    ref = TableRef.parse(text)
    assert (ref.schema, ref.name) == (schema, name)


def test_default_schema_parameter() -> None:
    assert TableRef.parse("orders", default_schema="sales") == TableRef("sales", "orders")
    assert TableRef.parse("x.orders", default_schema="sales") == TableRef("x", "orders")


@pytest.mark.parametrize(("ref", "qualified"), [
    (TableRef("public", "orders"), "public.orders"),
    (TableRef("Sales", "Orders"), "Sales.Orders"),
    (TableRef("public", "tbl$1"), "public.tbl$1"),
    (TableRef("my.schema", "orders"), '"my.schema".orders'),
    (TableRef("sales", "Big Table"), 'sales."Big Table"'),
    (TableRef('a"b', "c"), '"a""b".c'),
    (TableRef("public", "1abc"), 'public."1abc"'),
    (TableRef("public", "a-b"), 'public."a-b"'),
    (TableRef("é", "t"), '"é".t'),
    (TableRef("public", ""), 'public.""'),
])
def test_qualified(ref: TableRef, qualified: str) -> None:
    assert ref.qualified == qualified
    assert str(ref) == qualified


@pytest.mark.parametrize("ref", [
    TableRef("public", "orders"),
    TableRef("Sales", "Orders"),
    TableRef("my.schema", "a.b"),
    TableRef('a"b', '"'),
    TableRef('""', "x.y.z"),
    TableRef("public", "my table"),
    TableRef("public", "1abc"),
    TableRef("ünï", "cödé"),
    TableRef("a/b", "../c"),
    TableRef("x", "a%2Eb"),
])
def test_qualified_round_trips(ref: TableRef) -> None:
    assert TableRef.parse(ref.qualified) == ref
    assert TableRef.parse(TableRef.parse(ref.qualified).qualified) == ref


def test_refs_are_case_sensitive_values() -> None:
    assert TableRef.parse("Orders") != TableRef.parse("orders")
    assert TableRef.parse("orders") == TableRef.parse("public.orders")
    assert TableRef.parse('"orders"') == TableRef.parse("orders")
    assert len({TableRef.parse("orders"), TableRef.parse("public.orders")}) == 1
    assert sorted([TableRef("b", "a"), TableRef("a", "z")]) == [TableRef("a", "z"),
                                                                TableRef("b", "a")]


@pytest.mark.parametrize(("text", "needle"), [
    ("a.b.c", "3 dot-separated parts"),
    ('"a".b."c"', "3 dot-separated parts"),
    ("", "non-empty"),
    ("   ", "non-empty"),
    (".orders", "empty name part"),
    ("a..b", "empty name part"),
    ("orders.", "ends with a dot"),
    ('""', "empty name part"),
    ('"orders', "unterminated double quote"),
    ('"a"".b', "unterminated double quote"),
    ('or"ders', "quote may only wrap"),
    ('orders"', "quote may only wrap"),
    ('"a"b', "expected '.'"),
    ('"a" .b', "expected '.'"),
    (" orders", "spaces"),
    ("public. orders", "spaces"),
    ('" x"', "spaces"),
    ("a\x00b", "without NUL"),
    ("s" * 64, "1-63 bytes"),
    ("é" * 32, "1-63 bytes"),  # 64 bytes in UTF-8
])
def test_parse_refusals(text: str, needle: str) -> None:
    with pytest.raises(NameError_) as info:
        TableRef.parse(text)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, 5, ["orders"]])
def test_parse_refuses_non_strings(value: object) -> None:
    with pytest.raises(NameError_, match="non-empty string"):
        TableRef.parse(value)  # type: ignore[arg-type]


# ---- Delta paths -----------------------------------------------------------------------------


def test_delta_path_layout() -> None:
    ref = TableRef("public", "orders")
    assert ref.delta_path("/lake/shop") == "/lake/shop/public/orders"
    assert ref.delta_path("/lake/shop/") == "/lake/shop/public/orders"
    assert ref.delta_path("/lake/shop", append=True) == "/lake/shop/public/orders_cdc"
    assert ref.delta_path("s3://bkt/shop") == "s3://bkt/shop/public/orders"
    assert ref.delta_path("") == "/public/orders"
    assert APPEND_SUFFIX == "_cdc"


@pytest.mark.parametrize(("segment", "escaped"), [
    ("orders", "orders"),
    ("Orders_2024-01", "Orders_2024-01"),
    ("a/b", "a~2Fb"),
    ("a.b", "a~2Eb"),
    (".", "~2E"),
    ("..", "~2E~2E"),
    ("100%", "100~25"),
    ("%2F", "~252F"),
    ("my table", "my~20table"),
    ("é", "~C3~A9"),
    ("日本", "~E6~97~A5~E6~9C~AC"),
    ("a\\b", "a~5Cb"),
    ("tbl$1", "tbl~241"),
    ('q"t', "q~22t"),
    ("a:b", "a~3Ab"),
    ("😀", "~F0~9F~98~80"),
    ("a~b", "a~7Eb"),
])
def test_escape_path_segment(segment: str, escaped: str) -> None:
    assert escape_path_segment(segment) == escaped
    assert unescape_path_segment(escaped) == segment  # reversible
    assert "/" not in escaped
    assert escaped not in (".", "..")


@pytest.mark.parametrize(("ref", "append", "tail"), [
    (TableRef("public", "../etc"), False, "/public/~2E~2E~2Fetc"),
    (TableRef("..", ".."), False, "/~2E~2E/~2E~2E"),
    (TableRef(".", "."), True, "/~2E/~2E_cdc"),
    (TableRef("my.schema", "a b"), True, "/my~2Eschema/a~20b_cdc"),
    (TableRef("s", "100%"), False, "/s/100~25"),
    (TableRef("Sales", "Straße"), False, "/Sales/Stra~C3~9Fe"),
    (TableRef("s", "a/b"), True, "/s/a~2Fb_cdc"),
])
def test_delta_path_escapes_segments(ref: TableRef, append: bool, tail: str) -> None:
    assert ref.delta_path("/lake", append=append) == "/lake" + tail


def test_distinct_refs_get_distinct_paths() -> None:
    refs = [TableRef("a.b", "c"), TableRef("a", "b.c"), TableRef("a", "b/c"),
            TableRef("a/b", "c"), TableRef("x", "a%2Eb"), TableRef("x", "a.b"),
            TableRef("x", "a b"), TableRef("x", "a%20b")]
    paths = [r.delta_path("/d") for r in refs]
    assert len(set(paths)) == len(refs)
    assert all(p.count("/") == 3 for p in paths)


# ---- columns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reserved"), [
    ("_cdc_op", True),
    ("_cdc_", True),
    ("_CDC_LSN", True),
    ("_Cdc_x", True),
    ("_cdc", False),
    ("cdc_op", False),
    ("x_cdc_op", False),
    ("__cdc_op", False),
    ("id", False),
])
def test_is_engine_column(name: str, reserved: bool) -> None:
    assert is_engine_column(name) is reserved
    assert ENGINE_COLUMN_PREFIX == "_cdc_"


@pytest.mark.parametrize(("names", "pairs"), [
    ([], []),
    (["id", "kind"], []),
    (["id", "id"], []),  # exact duplicates are not a case collision
    (["id", "ID"], [("id", "ID")]),
    (["id", "ID", "Id"], [("id", "ID"), ("id", "Id")]),
    (["Kind", "x", "kind", "KIND"], [("Kind", "kind"), ("Kind", "KIND")]),
    (("a", "b", "A", "B"), [("a", "A"), ("b", "B")]),
    (["Straße", "STRASSE"], []),  # lower(), not casefold(): distinct names stay distinct
    (["É", "é"], [("É", "é")]),
])
def test_case_collisions(names: list[str], pairs: list[tuple[str, str]]) -> None:
    assert case_collisions(names) == pairs


@pytest.mark.parametrize(("name", "shown"), [
    ("cdcengine_shop", '"cdcengine_shop"'),
    ("Shop-Pub$1", '"Shop-Pub$1"'),
    ('odd"name', '"odd""name"'),
])
def test_pg_identifiers_shown_to_people_are_always_quoted(name: str, shown: str) -> None:
    """`sweep --prune`'s manual fix printed `DROP PUBLICATION Shop-Pub$1` unquoted (issue 14)."""
    assert pg_identifier(name) == shown

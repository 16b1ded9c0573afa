"""The SQL delta-rs (DataFusion) is given: identifiers, literals, the merge's key predicate and
its assignments, and a TRUNCATE's predicate and updates. Pure string building, no deltalake.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc

from cdcengine.sink.columns import COMMITTED_AT, DELETED, DELETED_AT, LSN, UNCHANGED

_SOURCE_ALIAS = "s"
_TARGET_ALIAS = "t"


def quote_ident(name: str) -> str:
    """A column name as a delta-rs (DataFusion) SQL identifier: backticks, doubled inside."""
    return "`" + name.replace("`", "``") + "`"


def quote_text(value: str) -> str:
    """A SQL string literal (standard SQL: quotes doubled, backslash literal)."""
    return "'" + value.replace("'", "''") + "'"


def _literal(value: object) -> str | None:
    """A SQL literal for a key bound, None when the type is not handled."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return quote_text(value)
    if isinstance(value, date) and type(value) is date:
        return f"DATE '{value.isoformat()}'"
    return None


@dataclass(frozen=True, slots=True)
class _Truncate:
    """The last TRUNCATE of a batch: its commit's end LSN and time."""

    lsn: int
    committed_at_us: int

    def predicate(self, prefix: str) -> str:
        """Rows the TRUNCATE removes: older than it (a replay never touches later rows)."""
        return f"{prefix}{LSN} < {self.lsn} AND NOT {prefix}{DELETED}"

    def updates(self) -> dict[str, str]:
        stamp = (f"arrow_cast(to_timestamp_micros({self.committed_at_us}), "
                 "'Timestamp(Microsecond, Some(\"UTC\"))')")
        return {DELETED: "true", DELETED_AT: stamp, LSN: str(self.lsn), COMMITTED_AT: stamp}


def _merge_predicate(source: pa.Table, keys: list[str], *, prune: bool = True) -> str:
    """Key equality (null-safe only for key columns holding nulls), plus, for one integer,
    string or date key, the source's key range so delta-rs skips target files early."""
    s, t = _SOURCE_ALIAS, _TARGET_ALIAS
    terms: list[str] = []
    for k in keys:
        q = quote_ident(k)
        if source.column(k).null_count:
            # parenthesised: DataFusion's parser reads `a IS NOT DISTINCT FROM b AND c IS NOT
            # DISTINCT FROM d` as `a IS NOT DISTINCT FROM (b AND c) ...`, a planning error that
            # failed every MERGE of a row with two null key columns
            terms.append(f"({t}.{q} IS NOT DISTINCT FROM {s}.{q})")
        else:
            terms.append(f"{t}.{q} = {s}.{q}")
    if prune and len(keys) == 1 and source.num_rows:
        k = keys[0]
        type_ = source.schema.field(k).type
        orderable = (
            pa.types.is_integer(type_)
            or pa.types.is_string(type_)
            or pa.types.is_large_string(type_)
            or pa.types.is_date32(type_)
        )
        if orderable and not source.column(k).null_count:
            bounds = pc.min_max(source.column(k))
            low, high = _literal(bounds["min"].as_py()), _literal(bounds["max"].as_py())
            if low is not None and high is not None:
                q = quote_ident(k)
                terms.append(f"{t}.{q} >= {low} AND {t}.{q} <= {high}")
    return " AND ".join(terms)


def _value_assignments(source: pa.Table, data: list[str], keys: list[str]) -> dict[str, str]:
    """Every non-key data column from the source row, except the columns that row lists in
    `_cdc_unchanged` (per-row CASE, only for columns some row lists): those keep the target's."""
    s, t = _SOURCE_ALIAS, _TARGET_ALIAS
    maybe_unchanged: set[str] = set()
    if UNCHANGED in source.column_names:
        flat = pc.list_flatten(source.column(UNCHANGED))
        maybe_unchanged = {str(v) for v in pc.unique(flat).to_pylist() if v is not None}
    updates: dict[str, str] = {}
    key_set = set(keys)
    for c in data:
        if c in key_set:
            continue
        q = quote_ident(c)
        if c in maybe_unchanged:
            updates[q] = (
                f"CASE WHEN array_contains({s}.{UNCHANGED}, {quote_text(c)}) "
                f"THEN {t}.{q} ELSE {s}.{q} END"
            )
        else:
            updates[q] = f"{s}.{q}"
    return updates


def _insert_assignments(data: list[str]) -> dict[str, str]:
    s = _SOURCE_ALIAS
    values = {quote_ident(c): f"{s}.{quote_ident(c)}" for c in data}
    values[LSN] = f"{s}.{LSN}"
    values[COMMITTED_AT] = f"{s}.{COMMITTED_AT}"
    values[DELETED] = "false"
    values[DELETED_AT] = "NULL"
    return values

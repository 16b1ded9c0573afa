"""`cdcengine verify`: compare source tables with their Delta tables and report the drift.

What it finds is what the stream cannot carry: rows changed behind the engine's back in Delta,
rows lost to a partition-level TRUNCATE/DETACH (never published), a table that stopped, a copy
that went wrong. The remedy for a drifted table is always `cdcengine resync --source S --table T`.

How one table is verified, while the daemon keeps streaming (no pause, no lock):

1. The adapter reads the source table under a snapshot exported by a temporary logical slot
   (`SourceAdapter.verify_reader`): exactly the transactions whose commit end LSN is <= its
   consistent point C are visible (the same rule as a table snapshot, SPEC §8). Every row becomes
   (key, one hash per compared column) in a DuckDB scratch database on disk, so memory stays
   bounded by DuckDB's memory limit whatever the table's size.
2. Wait (bounded) until Delta holds every change with end LSN <= C: the table's applied version
   (its txn action) is >= C, or the slot's confirmed position is >= C (SPEC §5: the slot is
   confirmed up to L only once every change <= L is durable; an idle table's version does not
   move, the slot's does). Never caught up within the wait: reported as `not_caught_up`, not as
   differences.
3. Read one Delta snapshot (the version observed in step 2 or later) the same way: key, column
   hashes, `_cdc_lsn`, `_cdc_deleted`. A key whose Delta row has `_cdc_lsn` > C changed after
   the source snapshot: it is *in flux*, excluded from both sides and counted. A row with
   `_cdc_deleted` (and `_cdc_lsn` <= C) counts as absent.
4. Compare: row counts, then a full outer join on the key. `missing_in_delta` (in the source at
   C, absent in Delta), `extra_in_delta` (live in Delta at <= C, absent in the source) and
   `different` (same key, some column hash differs, with the differing column names), each
   counted and with up to `examples` keys, smallest first.

Append-mode tables (no consolidated copy) are compared with the state rebuilt from the change
log: the last change per key among changes with `_cdc_lsn` <= C (after the last truncate),
deleted when it is a `D`. That state is exact at C, so nothing is in flux there except keys
whose last change has an unresolved unchanged-TOAST column (`_cdc_unchanged`), which cannot be
compared and are counted as in flux.

Hashes: both sides are Arrow with the engine's types (SPEC §6), and every value is hashed by
DuckDB as `hash(v IS NULL, v::VARCHAR)`: identical values give identical hashes whatever the
physical Arrow type (string/large_string/string_view, int32 vs a widened int64, list field
names), NULL differs from ''. A 64-bit hash per column: a real difference goes unnoticed with
probability ~2^-64 per row.

Why not key-ordered ranges merged in the order each side sorts: PostgreSQL orders text keys by
collation, inet/interval/numeric-as-text keys by their type, Arrow/DuckDB by bytes; a merge
would see phantom differences wherever the two orders disagree. A hash join needs no shared
order, and DuckDB runs it out of core.

This module is engine-neutral: it sees the source only through the adapter seam.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import structlog

from cdcengine.lsn import format_lsn
from cdcengine.sink.columns import DELETED, LSN, OP, SEQ, UNCHANGED

if TYPE_CHECKING:
    import duckdb

    from cdcengine.config import SourceConfig, TableConfig
    from cdcengine.sink.delta.read import DeltaSnapshot
    from cdcengine.source.adapter import SourceAdapter

log = structlog.get_logger("cdcengine.control.verify")

DEFAULT_EXAMPLES = 20
DEFAULT_WAIT_S = 60.0
DEFAULT_MEMORY_LIMIT = "512MB"

EQUAL = "equal"
DIFFERENT = "different"
NOT_CAUGHT_UP = "not_caught_up"
NO_DELTA_TABLE = "no_delta_table"


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RowDifference:
    """One key present on both sides whose values differ, and in which columns."""

    key: dict[str, object]
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """What the comparison of one table found (counts, and up to N example keys per kind).

    `source_rows`: rows of the source snapshot; `delta_rows`: live Delta rows at <= C;
    `rows_compared`: source rows whose key was not in flux; `in_flux`: keys changed in Delta
    after C (or not comparable), left out of both sides.
    """

    source_rows: int = 0
    delta_rows: int = 0
    rows_compared: int = 0
    in_flux: int = 0
    missing_in_delta: int = 0
    extra_in_delta: int = 0
    different: int = 0
    missing_examples: tuple[dict[str, object], ...] = ()
    extra_examples: tuple[dict[str, object], ...] = ()
    different_examples: tuple[RowDifference, ...] = ()
    columns_missing_in_delta: tuple[str, ...] = ()  # compared columns Delta does not have
    rechecked: bool = False  # missing keys were confirmed by a second pass (`begin_recheck`)
    transient: int = 0  # keys missing in the first pass only: changed meanwhile, not drift

    @property
    def differences(self) -> int:
        return (self.missing_in_delta + self.extra_in_delta + self.different
                + len(self.columns_missing_in_delta))


@dataclass(frozen=True, slots=True, kw_only=True)
class TableVerify:
    """The verdict for one table: `status` is equal | different | not_caught_up |
    no_delta_table; `ok` only when equal."""

    table: str
    mode: str
    status: str
    kind: str  # the Delta table compared: consolidated, or append (state rebuilt from the log)
    message: str
    consistent_point: str | None = None  # C: the source snapshot's position
    applied_lsn: str | None = None  # the Delta table's applied version when it was read
    delta_version: int | None = None
    key: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    comparison: Comparison | None = None
    fix: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == EQUAL

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"ok": self.ok}


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """`verify(cfg, table=None)`: one `TableVerify` per verified table; `ok` when all equal."""

    source: str
    tables: tuple[TableVerify, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    @property
    def differences(self) -> int:
        return sum(t.comparison.differences for t in self.tables if t.comparison is not None)

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "ok": self.ok, "differences": self.differences,
                "tables": [t.to_dict() for t in self.tables]}


def resync_fix(source: str, table: str) -> str:
    return f"cdcengine resync --source {source} --table {table}"


# ---- the comparison (pure: Arrow in, Comparison out) ----------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _hash_list(columns: Sequence[str]) -> str:
    """DuckDB expression: the list of per-column hashes, in `columns` order."""
    if not columns:
        return "[]::UBIGINT[]"
    parts = [f"hash({_ident(c)} IS NULL, {_ident(c)}::VARCHAR)" for c in columns]
    return "[" + ", ".join(parts) + "]::UBIGINT[]"


def _json_safe(value: object) -> object:
    """A key value as JSON can hold it (and a person can read it)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def format_key(key: dict[str, object]) -> str:
    """`id=5` or `(a=1, b='x')` for a report line."""
    parts = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in key.items()]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


class Comparer:
    """Compares one table: feed the source snapshot's Arrow chunks (`add_source`), then
    `compare` with the Delta table (a pyarrow Table, Dataset or RecordBatchReader).

    `key` and `columns` name the compared columns (key included in `columns` or not: keys are
    never compared as values). Work happens in a DuckDB database in a scratch folder (`workdir`,
    default a temporary one), spilling to disk beyond `memory_limit`. Use as a context manager.
    """

    def __init__(self, key: Sequence[str], columns: Sequence[str], *,
                 schema: pa.Schema | None = None, examples: int = DEFAULT_EXAMPLES,
                 memory_limit: str = DEFAULT_MEMORY_LIMIT, workdir: str | Path | None = None
                 ) -> None:
        import duckdb

        if not key:
            raise ValueError("verify needs key columns")
        self.key = tuple(key)
        self.values = tuple(c for c in columns if c not in self.key)
        self.examples = examples
        self._tmp = tempfile.TemporaryDirectory(prefix="cdcengine-verify-", dir=workdir)
        self.con: duckdb.DuckDBPyConnection = duckdb.connect(str(Path(self._tmp.name) / "v.db"))
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET temp_directory = '{Path(self._tmp.name) / 'spill'}'")
        self.con.execute("SET preserve_insertion_order = false")
        self._have_src = False
        self._source_rows = 0
        self._confirm = False  # a recheck: only keys missing in the first pass may be missing
        if schema is not None:
            self.add_source(schema.empty_table())

    def __enter__(self) -> Comparer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            self._tmp.cleanup()

    def _keys_sql(self, prefix: str = "") -> str:
        return ", ".join(prefix + _ident(k) for k in self.key)

    def add_source(self, chunk: pa.Table) -> None:
        """One chunk of source rows (any order; each key once over all chunks)."""
        missing = [c for c in (*self.key, *self.values) if c not in chunk.column_names]
        if missing:
            raise ValueError(f"source chunk lacks columns {missing}")
        # every identifier in these statements is quoted by _ident; numbers are ints
        select = f"SELECT {self._keys_sql()}, {_hash_list(self.values)} AS hc FROM chunk"  # noqa: S608
        self.con.register("chunk", chunk)
        try:
            if self._have_src:
                self.con.execute(f"INSERT INTO src {select}")
            else:
                self.con.execute(f"CREATE TABLE src AS {select}")
                self._have_src = True
        finally:
            self.con.unregister("chunk")
        self._source_rows += chunk.num_rows

    def begin_recheck(self) -> None:
        """Keep the keys the last `compare` found missing in Delta, and start over with a new
        source snapshot (`add_source`) and `compare`: a key then counts as missing only when it
        is missing in both passes.

        Why: a row inserted before C and deleted after C can vanish from Delta without a trace
        whose `_cdc_lsn` would mark it in flux (hard deletes, or an insert and a delete folded
        into one Delta commit). At a later snapshot such a key is gone from the source too, so a
        second look tells it from a row really lost; the other kinds need no second look.
        """
        on = " AND ".join(f"s.{_ident(k)} = d.{_ident(k)}" for k in self.key)
        first = _ident(self.key[0])
        self.con.execute(
            f"CREATE OR REPLACE TABLE confirm AS SELECT {self._keys_sql('s.')} "  # noqa: S608
            f"FROM src s LEFT JOIN dst d ON {on} "
            f"WHERE d.{first} IS NULL OR (NOT d.flux AND d.deleted)")
        self.con.execute("DROP TABLE src")
        self.con.execute("DROP TABLE dst")
        self._have_src = False
        self._source_rows = 0
        self._confirm = True

    def compare(self, delta: Any, *, upto: int, kind: str = "consolidated") -> Comparison:
        """Compare the source rows fed so far with `delta` as of position `upto` (C)."""
        if not self._have_src:
            raise ValueError("no source schema: call add_source (or pass schema=) first")
        names = set(_schema_of(delta).names)
        lacking = [k for k in self.key if k not in names]
        if lacking:
            raise ValueError(f"the Delta table lacks key columns {lacking}")
        missing_cols = tuple(c for c in self.values if c not in names)
        values = tuple(c for c in self.values if c in names)
        if missing_cols:
            # compare what both sides have; the missing columns are reported as differences
            keep = [i + 1 for i, c in enumerate(self.values) if c in names]
            self.con.execute(f"CREATE OR REPLACE TABLE src AS SELECT {self._keys_sql()}, "  # noqa: S608
                             f"list_select(hc, {keep})::UBIGINT[] AS hc FROM src")
        self.con.register("delta", delta)
        try:
            if kind == "append":
                self._load_append(names, values, upto)
            else:
                self._load_consolidated(names, values, upto)
        finally:
            self.con.unregister("delta")
        return self._diff(values, missing_cols)

    def _load_consolidated(self, names: set[str], values: Sequence[str], upto: int) -> None:
        deleted = f"coalesce({_ident(DELETED)}, false)" if DELETED in names else "false"
        lsn = _ident(LSN) if LSN in names else "0"
        self.con.execute(
            f"CREATE OR REPLACE TABLE dst AS SELECT {self._keys_sql()}, "  # noqa: S608
            f"{_hash_list(values)} AS hc, {lsn} > {int(upto)} AS flux, "
            f"{deleted} AS deleted FROM delta")

    def _load_append(self, names: set[str], values: Sequence[str], upto: int) -> None:
        for col in (LSN, SEQ, OP):
            if col not in names:
                raise ValueError(f"the append table lacks {col}")
        keys = self._keys_sql()
        self.con.execute(
            "CREATE OR REPLACE TEMP TABLE log AS SELECT "  # noqa: S608
            f"{keys}, {_hash_list(values)} AS hc, {LSN} AS lsn, {SEQ} AS seq, "
            f"{OP} AS op, "
            + (f"coalesce(len({UNCHANGED}), 0) > 0" if UNCHANGED in names else "false")
            + f" AS unresolved FROM delta WHERE {LSN} <= {int(upto)}")
        trunc = self.con.execute("SELECT lsn, seq FROM log WHERE op = 'T' "
                                 "ORDER BY lsn DESC, seq DESC LIMIT 1").fetchone()
        after = (f"WHERE lsn > {int(trunc[0])} OR (lsn = {int(trunc[0])} AND seq > "
                 f"{int(trunc[1])})" if trunc else "")
        self.con.execute(
            f"CREATE OR REPLACE TABLE dst AS SELECT {keys}, hc, unresolved AS flux, "  # noqa: S608
            f"op = 'D' AS deleted FROM (SELECT * FROM log {after}) WHERE op <> 'T' "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY lsn DESC, seq DESC) = 1")
        self.con.execute("DROP TABLE log")

    def _diff(self, values: Sequence[str], missing_cols: tuple[str, ...]) -> Comparison:
        con = self.con
        on = " AND ".join(f"s.{_ident(k)} = d.{_ident(k)}" for k in self.key)
        first = _ident(self.key[0])
        order = self._keys_sql("s.")
        n = int(self.examples)

        def count(sql: str) -> int:
            row = con.execute(sql).fetchone()
            return int(row[0]) if row else 0

        in_flux = count("SELECT count(*) FROM dst WHERE flux")
        delta_rows = count("SELECT count(*) FROM dst WHERE NOT flux AND NOT deleted")
        source_rows = count("SELECT count(*) FROM src")
        flux_src = count(f"SELECT count(*) FROM src s JOIN dst d ON {on} WHERE d.flux")  # noqa: S608
        missing_sql = (f"FROM src s LEFT JOIN dst d ON {on} "
                       f"WHERE (d.{first} IS NULL OR (NOT d.flux AND d.deleted))")
        transient = 0
        if self._confirm:
            seen = " AND ".join(f"c.{_ident(k)} = s.{_ident(k)}" for k in self.key)
            missing_sql += f" AND EXISTS (SELECT 1 FROM confirm c WHERE {seen})"  # noqa: S608
        extra_sql = (f"FROM dst s LEFT JOIN src d ON {on} "
                     f"WHERE NOT s.flux AND NOT s.deleted AND d.{first} IS NULL")
        diff_sql = (f"FROM src s JOIN dst d ON {on} "
                    "WHERE NOT d.flux AND NOT d.deleted AND s.hc IS DISTINCT FROM d.hc")
        missing = count(f"SELECT count(*) {missing_sql}")
        if self._confirm:
            transient = count("SELECT count(*) FROM confirm") - missing
        extra = count(f"SELECT count(*) {extra_sql}")
        different = count(f"SELECT count(*) {diff_sql}")

        def rows(sql: str) -> list[dict[str, object]]:
            cur = con.execute(sql)
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        def keys_of(sql: str) -> tuple[dict[str, object], ...]:
            return tuple({k: _json_safe(v) for k, v in row.items()}
                         for row in rows(f"SELECT {order} {sql} ORDER BY {order} LIMIT {n}"))

        diffs: list[RowDifference] = []
        if different and n:
            for row in rows(f"SELECT {order}, s.hc AS s_hc, d.hc AS d_hc {diff_sql} "
                            f"ORDER BY {order} LIMIT {n}"):
                s_hc, d_hc = row.pop("s_hc") or [], row.pop("d_hc") or []
                cols = tuple(c for c, a, b in zip(values, s_hc, d_hc, strict=False)  # type: ignore[call-overload]
                             if a != b)
                diffs.append(RowDifference(key={k: _json_safe(v) for k, v in row.items()},
                                           columns=cols))
        return Comparison(
            source_rows=source_rows, delta_rows=delta_rows,
            rows_compared=source_rows - flux_src, in_flux=in_flux, transient=transient,
            missing_in_delta=missing, extra_in_delta=extra, different=different,
            missing_examples=keys_of(missing_sql) if missing and n else (),
            extra_examples=keys_of(extra_sql) if extra and n else (),
            different_examples=tuple(diffs), columns_missing_in_delta=missing_cols,
            rechecked=self._confirm)


def _schema_of(delta: Any) -> pa.Schema:
    schema = delta.schema
    return schema if isinstance(schema, pa.Schema) else pa.schema(schema)


def compare_tables(
    source: pa.Table | Iterable[pa.Table],
    delta: Any,
    *,
    key: Sequence[str],
    columns: Sequence[str],
    upto: int,
    kind: str = "consolidated",
    examples: int = DEFAULT_EXAMPLES,
) -> Comparison:
    """Compare source rows (a table or chunks) with a Delta table's rows as of position `upto`."""
    chunks = [source] if isinstance(source, pa.Table) else list(source)
    if not chunks:
        raise ValueError("compare_tables needs at least one source chunk (it gives the schema)")
    with Comparer(key, columns, examples=examples) as cmp:
        for chunk in chunks:
            cmp.add_source(chunk)
        return cmp.compare(delta, upto=upto, kind=kind)


# ---- one table, end to end ------------------------------------------------------------------


def verify_table(
    adapter: SourceAdapter,
    source: SourceConfig,
    table: TableConfig,
    *,
    confirmed_lsn: Callable[[], int | None],
    wait_s: float = DEFAULT_WAIT_S,
    examples: int = DEFAULT_EXAMPLES,
    poll_s: float = 0.5,
    enabled: bool = True,
) -> TableVerify:
    """Verify one table (see the module docstring). Raises a `CDCError` when the source cannot
    be read; a destination that cannot be read raises too (the caller reports it). `enabled`:
    whether CDC was ever enabled for the source (the fix for a missing Delta table differs)."""
    from cdcengine.sink.base import TableKind
    from cdcengine.sink.delta import DeltaSink

    started = time.monotonic()
    mode = str(table.mode)
    kind = (TableKind.CONSOLIDATED if table.mode.writes_consolidated else TableKind.APPEND)
    sink = DeltaSink.for_source(source)  # its reader: the source's destination and options
    path = sink.path(table.ref, kind)
    app_id = sink.app_id(table.ref, kind)
    fix = resync_fix(source.name, table.name)
    base: dict[str, Any] = {"table": table.name, "mode": mode, "kind": str(kind)}

    def done(**kw: Any) -> TableVerify:
        return TableVerify(**base, **kw, duration_s=round(time.monotonic() - started, 3))

    def load() -> DeltaSnapshot | None:
        return sink.reader.open_path(path)

    if load() is None and not enabled:
        return done(status=NO_DELTA_TABLE,
                    fix=f"cdcengine enable --source {source.name}, then cdcengine run",
                    message=f"no Delta {kind} table at {path}: CDC was never enabled for "
                            f"source {source.name}, so nothing has been captured")
    if load() is None:
        return done(status=NO_DELTA_TABLE, fix=f"cdcengine run --source {source.name}",
                    message=f"no Delta {kind} table yet at {path}: the table's snapshot has "
                            "not been written (is the daemon running?)")

    def caught_up(upto: int) -> tuple[DeltaSnapshot | None, int | None, int | None]:
        """Wait until Delta holds every change <= upto: (table, applied, confirmed); the
        table is None when the wait ran out."""
        deadline = time.monotonic() + wait_s
        while True:
            confirmed = confirmed_lsn()  # read before the Delta log: then it covers that read
            dt = load()
            applied = dt.transaction_version(app_id) if dt is not None else None
            if dt is not None and applied is not None and (
                    applied >= upto or (confirmed is not None and confirmed >= upto)):
                return dt, applied, confirmed
            if time.monotonic() >= deadline:
                return None, applied, confirmed
            time.sleep(poll_s)

    cmp: Comparer | None = None
    try:
        for attempt in (1, 2):
            with adapter.verify_reader(source, table) as reader:
                upto = reader.consistent_point
                base.update(key=tuple(reader.key), columns=tuple(reader.columns),
                            consistent_point=format_lsn(upto))
                if cmp is None:
                    cmp = Comparer(reader.key, reader.columns, examples=examples)
                else:
                    cmp.begin_recheck()
                for chunk in reader.chunks():
                    cmp.add_source(chunk)
            # the source snapshot is released; now wait for Delta to hold everything <= C
            dt, applied, confirmed = caught_up(upto)
            if dt is None:
                seen = format_lsn(applied) if applied is not None else "none"
                return done(status=NOT_CAUGHT_UP,
                            applied_lsn=format_lsn(applied) if applied is not None else None,
                            fix=f"run the daemon (cdcengine run --source {source.name}) and "
                                "verify again, or wait longer (--wait)",
                            message=f"Delta has not caught up with the source snapshot at "
                                    f"{format_lsn(upto)} within {wait_s:g} s (applied {seen}"
                                    + (f", slot confirmed {format_lsn(confirmed)}"
                                       if confirmed is not None else "") + ")")
            result = cmp.compare(dt.dataset(), upto=upto, kind=str(kind))
            if not result.missing_in_delta or attempt == 2:
                break
            log.info("verify_recheck", source=source.name, table=table.name,
                     missing=result.missing_in_delta)
    finally:
        if cmp is not None:
            cmp.close()
    common: dict[str, Any] = {"applied_lsn": format_lsn(applied), "delta_version": dt.version,
                              "comparison": result}
    log.info("verify_table", source=source.name, table=table.name, lsn=format_lsn(upto),
             differences=result.differences, in_flux=result.in_flux,
             rows=result.rows_compared)
    if result.differences == 0:
        return done(status=EQUAL, **common,
                    message=f"equal: {result.rows_compared:,} rows compared at "
                            f"{format_lsn(upto)}, {result.in_flux:,} in flux")
    parts = [f"{n:,} {what}" for n, what in (
        (result.missing_in_delta, "missing in Delta"), (result.extra_in_delta, "extra in Delta"),
        (result.different, "different")) if n]
    if result.columns_missing_in_delta:
        parts.append("columns missing in Delta: " + ", ".join(result.columns_missing_in_delta))
    return done(status=DIFFERENT, fix=fix, **common,
                message=f"{result.differences:,} difference(s): " + ", ".join(parts))

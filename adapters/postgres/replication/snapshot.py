"""Table snapshots under a snapshot exported by a temporary slot (SPEC §8).

`TableSnapshot` creates a TEMPORARY logical slot with `(SNAPSHOT 'export')` on a replication
connection, imports that snapshot into a REPEATABLE READ transaction on a second connection and
copies the table with `COPY (SELECT …) TO STDOUT` (text format), yielding typed Arrow tables of
bounded size. The table's version is the temporary slot's consistent point C: the stream (from the
persistent slot) must apply only this table's changes that commit after C.

Creating the slot waits until every transaction holding an xid (in any database of the server)
has ended: a transaction left open elsewhere holds the snapshot up. While it waits, the blocking
backends are logged every `WAIT_REPORT_S` (`snapshot_waiting_for_transactions`), and a stop
cancels the creation (which leaves no slot behind).

Why a temporary slot per snapshot: it exports a snapshot consistent with an exact LSN, and it
disappears by itself with its connection, so a crash leaves nothing behind. The exported snapshot
lives only while the exporting connection stays idle in its transaction, which is why that
connection is held open until the copy is done and runs no other command.

Chunked, parallel form (driven by `cdcengine.pipeline.snapshots`):
- `layout()`: the columns, the chunk key (the first key column, when its type orders sensibly:
  numbers, strings, dates/times, uuid) and the leaves read (a partitioned table's leaf
  partitions, each copied on its own; else the table itself);
- `plan(chunk_rows)`: per leaf, key ranges [lo, hi) of about `chunk_rows` rows each, cut at
  the key's `pg_stats` histogram bounds (or at quantiles of a row sample when the leaf has no
  histogram); a leaf without a usable key, or with at most `chunk_rows` rows, is one chunk;
- `open_workers(n)`: n connections (the first is the session's own) each importing the exported
  snapshot (`SET TRANSACTION SNAPSHOT`), so every chunk reads the same consistent state;
- `copy_chunk(chunk, worker=i)`: `COPY (SELECT cols FROM leaf WHERE key >= lo AND key < hi)`,
  streamed in pieces of at most `piece_rows` rows / `chunk_bytes` text bytes, converted to Arrow
  in the calling thread (the Arrow kernels release the GIL, so workers overlap).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import psycopg
import pyarrow as pa
import structlog
from psycopg import sql

from cdcengine.config import SourceConfig, TableConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import parse_lsn
from cdcengine.names import TableRef
from cdcengine.pipeline.snapshots import ranges_from_points, split_points
from cdcengine.source.adapter import ChunkRange, SnapshotLayout, SnapshotStopped
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.control.catalog import ColumnFacts, TableFacts, load_table_facts
from cdcengine_postgres.control.slots import (
    WaitAbandoned,
    blocking_backends,
    run_watched,
    temp_slot_name,
)
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.replication.copy_reader import (
    CopyPiece,
    bound_malloc_retention,
    read_copy,
)
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.copy_binary import (
    TEXT_CAST_SQL,
    BinaryColumn,
    decode_copy_binary,
    plan_binary,
    wire_order,
)
from cdcengine_postgres.types.copy_text import parse_copy_text

log = structlog.get_logger("cdcengine.postgres.snapshot")

DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024  # text bytes per Arrow piece at most: bounded memory
DEFAULT_PIECE_ROWS = 100_000  # rows per Arrow piece at most
SAMPLE_VALUES_PER_CHUNK = 50  # key sample size per planned chunk when there is no histogram
MAX_SAMPLE = 100_000
WAIT_REPORT_S = 10.0  # how often a snapshot held up by running transactions says so
_ORDERED_CATEGORIES = frozenset({"N", "S", "D"})  # numeric, string, date/time (pg_type)
_END = object()


class TableSnapshot:
    """One table's consistent copy. Use as a context manager.

    After `__enter__`: `consistent_point` (int LSN C) and `columns` (the captured columns, in
    table order: generated columns are not captured, `columns` selection applied, key kept).
    `copy_format`: 'auto' copies as binary COPY when every column can be decoded from it exactly
    (`types.copy_binary`), else as text; 'text' always as text. `copy_format` (after
    `__enter__`): which one it is.
    `masked` counts values the Arrow types could not hold, per column; `rows` counts rows
    converted (both totals over every worker).
    """

    def __init__(self, source: SourceConfig, table: TableConfig, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 piece_rows: int = DEFAULT_PIECE_ROWS,
                 stop: threading.Event | None = None,
                 copy_format: str = "auto") -> None:
        if copy_format not in ("auto", "text"):
            raise ValueError("copy_format must be 'auto' (binary where exact) or 'text'")
        self.source, self.table, self._stop = source, table, stop
        self._copy_format_wanted = copy_format
        self._what = f"snapshot of {table.name}"  # names the table in every error
        self.chunk_bytes, self.piece_rows = chunk_bytes, piece_rows
        self.consistent_point = 0
        self.columns: tuple[ColumnFacts, ...] = ()
        self.key: tuple[str, ...] = ()
        self.masked: dict[str, int] = {}
        self.rows = 0
        self._lock = threading.Lock()
        self._rconn: psycopg.Connection[Any] | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._workers: list[psycopg.Connection[Any]] = []
        self._snapshot_name = ""
        self._facts: TableFacts | None = None
        self._chunk_key: ColumnFacts | None = None
        self._layout: SnapshotLayout | None = None
        self._binary: list[BinaryColumn] | None = None  # set: COPY binary (see `_copy_format`)
        self._wire: list[BinaryColumn] = []  # `_binary` in the order selected (`wire_order`)
        self._unwire: list[int] = []  # for each of `_binary`, its place in `_wire`
        self._utf8 = False  # text arrives valid UTF-8 (see `decode_copy_binary`)

    def __enter__(self) -> TableSnapshot:
        secrets = self.source.secrets()
        bound_malloc_retention()  # bounded RSS however many pieces go through (see there)
        try:
            self._rconn = connect_source(self.source, replication=True)
            row = self._create_slot(temp_slot_name(self.source.slot_name, "snapshot"))
            self.consistent_point, self._snapshot_name = parse_lsn(row[1]), row[2]
            self._conn = self._import_snapshot()
            with translate_errors(secrets=secrets, context=f"{self._what}: reading the catalog"):
                facts = load_table_facts(self._conn, [self.table.ref]).get(self.table.ref)
            if facts is None:
                raise CDCError(f"table {self.table.name} does not exist (any more)",
                               reason=Reason.PREREQUISITES_FAILED)
            self._facts = facts
            wanted = self.table.columns
            self.key = tuple(self.table.primary_key or facts.primary_key
                             or facts.identity_columns)
            self.columns = tuple(c for c in facts.columns if not c.generated and (
                wanted is None or c.name in wanted or c.name in self.key))
            self._workers = [self._conn]
            self._binary = self._copy_format()
            order = wire_order(self._binary or [])
            self._wire = [(self._binary or [])[i] for i in order]
            self._unwire = sorted(range(len(order)), key=order.__getitem__)
            params = self._conn.info.parameter_status
            self._utf8 = params("server_encoding") == params("client_encoding") == "UTF8"
        except BaseException:
            self.close()
            raise
        return self

    def _create_slot(self, slot: str) -> tuple[Any, ...]:
        """The temporary slot exporting the snapshot; while its creation waits, what holds it
        up is reported every `WAIT_REPORT_S` and a stop cancels it."""
        rconn, secrets = self._rconn, self.source.secrets()
        assert rconn is not None
        pid = rconn.info.backend_pid
        report_at = [WAIT_REPORT_S]

        def create() -> Any:
            with translate_errors(secrets=secrets, context=f"{self._what}: creating its slot"):
                # simple query protocol only on a replication connection; name: [a-z0-9_]
                return rconn.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL "
                                     "pgoutput (SNAPSHOT 'export')").fetchone()

        def keep_waiting(waited_s: float) -> bool:
            if self._stop is not None and self._stop.is_set():
                return False
            if waited_s >= report_at[0]:
                report_at[0] += WAIT_REPORT_S
                self._report_wait(pid, waited_s)
            return True

        try:
            row = run_watched(rconn, create, keep_waiting=keep_waiting)
        except WaitAbandoned as exc:
            raise SnapshotStopped(f"the snapshot of {self.table.name} was stopped while "
                                  "waiting for running transactions") from exc
        assert row is not None
        return tuple(row)

    def _report_wait(self, pid: int, waited_s: float) -> None:
        try:
            with connect_source(self.source, autocommit=True) as c:
                blockers = [b.describe() for b in blocking_backends(c, pid)]
        except (psycopg.Error, CDCError) as exc:  # the report is best effort
            blockers = [f"(not readable: {type(exc).__name__})"]
        log.warning("snapshot_waiting_for_transactions", source=self.source.name,
                    table=self.table.name, waited_s=round(waited_s), blockers=blockers,
                    fix="a snapshot starts once the transactions running when it began have "
                        "ended: let these commit or roll back (or end them with "
                        "pg_terminate_backend(pid))")

    def _import_snapshot(self) -> psycopg.Connection[Any]:
        secrets = self.source.secrets()
        conn = connect_source(self.source, autocommit=False)
        try:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with translate_errors(secrets=secrets, context=f"{self._what}: importing it"):
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(self._snapshot_name)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _copy_format(self) -> list[BinaryColumn] | None:
        """The columns' binary-COPY decoders, or None to copy as text (see `types.copy_binary`):
        binary COPY is decoded column-wise without per-value Python work and costs the server
        less; text stays for tables with a column whose `::text` would not be its output text."""
        assert self._conn is not None
        if self._copy_format_wanted == "text":
            return None
        plan = plan_binary([(c.name, c.pg_type) for c in self.columns])
        why = "a domain over a type read as text" if plan is None else ""
        if plan is not None:
            cast = sorted({c.pg_type.oid for c in plan if c.as_text})
            if cast:
                with translate_errors(secrets=self.source.secrets(),
                                      context=f"{self._what}: reading casts to text"):
                    rows = self._conn.execute(TEXT_CAST_SQL, [cast]).fetchall()
                if rows:
                    plan = None
                    why = "a column whose cast to text is not its output function"
        log.info("snapshot_copy_format", source=self.source.name, table=self.table.name,
                 format="text" if plan is None else "binary",
                 **({"reason": why} if plan is None else {}))
        return plan

    @property
    def copy_format(self) -> str:
        return "text" if self._binary is None else "binary"

    def _select_list(self) -> sql.Composable:
        if self._binary is None:
            return sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        return sql.SQL(", ").join(  # in wire order (see `copy_binary.wire_order`)
            sql.SQL("{}::text").format(sql.Identifier(c.name)) if c.as_text
            else sql.Identifier(c.name) for c in self._wire)

    def _copy_query(self, ref: TableRef, where: sql.Composable) -> sql.Composable:
        return sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT{}").format(
            self._select_list(), sql.Identifier(ref.schema, ref.name), where,
            sql.SQL("" if self._binary is None else " (FORMAT binary)"))

    # ---- layout and plan ----------------------------------------------------------------------
    def layout(self) -> SnapshotLayout:
        if self._layout is None:
            facts, conn = self._facts, self._conn
            assert facts is not None, "use TableSnapshot as a context manager"
            assert conn is not None
            chunk_key = None
            if self.key:
                col = next((c for c in self.columns if c.name == self.key[0]), None)
                if col is not None and self._orderable(col):
                    chunk_key = col
            self._chunk_key = chunk_key
            leaves = (tuple(r.qualified for r in facts.leaf_partitions)
                      if facts.relkind == "p" else (facts.ref.qualified,))
            self._layout = SnapshotLayout(
                columns=tuple(c.name for c in self.columns), key=self.key,
                chunk_key=None if chunk_key is None else chunk_key.name, leaves=leaves)
        return self._layout

    def _orderable(self, col: ColumnFacts) -> bool:
        assert self._conn is not None
        with translate_errors(secrets=self.source.secrets(),
                              context=f"{self._what}: reading the key type"):
            row = self._conn.execute("SELECT typcategory, typname FROM pg_type WHERE oid = %s",
                                     [col.type_oid]).fetchone()
        return row is not None and (row[0] in _ORDERED_CATEGORIES or row[1] == "uuid")

    def plan(self, chunk_rows: int) -> list[ChunkRange]:
        """Key-range chunks of about `chunk_rows` rows, per leaf, numbered from 0."""
        layout = self.layout()
        out: list[ChunkRange] = []
        with translate_errors(secrets=self.source.secrets(), context=f"{self._what}: planning"):
            for leaf in layout.leaves:
                ref = TableRef.parse(leaf)
                estimate = self._estimate_rows(ref)
                bounds: list[tuple[str | None, str | None]] = [(None, None)]
                if self._chunk_key is not None and estimate > chunk_rows:
                    n = math.ceil(estimate / chunk_rows)
                    values = self._histogram(ref) or self._sample(ref, n, estimate)
                    points = split_points(values, n)
                    if self._increasing(points):
                        bounds = ranges_from_points(points)
                    else:  # never overlapping ranges: one chunk rather than rows twice
                        log.warning("snapshot_plan_unordered", table=self.table.name,
                                    leaf=leaf, points=len(points))
                per = max(1, estimate // len(bounds)) if estimate else 0
                for lo, hi in bounds:
                    out.append(ChunkRange(id=len(out), leaf=leaf, lo=lo, hi=hi,
                                          estimated_rows=per))
        return out

    def _increasing(self, points: list[str]) -> bool:
        """Are the cut points strictly increasing under the key's own ordering (the one the
        chunks' WHERE clauses compare with)? Overlapping ranges would copy rows twice."""
        if len(points) < 2:
            return True
        assert self._conn is not None
        assert self._chunk_key is not None
        row = self._conn.execute(sql.SQL(
            "SELECT bool_and(a < b) FROM (SELECT p::{t} AS a, lead(p::{t}) OVER (ORDER BY i) AS b"
            " FROM unnest({v}::text[]) WITH ORDINALITY AS x (p, i)) s WHERE b IS NOT NULL"
        ).format(t=sql.SQL(self._chunk_key.type_text), v=sql.Literal(points))).fetchone()
        return bool(row and row[0])

    def _estimate_rows(self, ref: TableRef) -> int:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s", [ref.schema, ref.name]).fetchone()
        if row is not None and row[0] is not None and row[0] >= 0:
            return int(row[0])
        counted = self._conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(ref.schema, ref.name))).fetchone()
        return int(counted[0]) if counted else 0

    def _histogram(self, ref: TableRef) -> list[str]:
        assert self._conn is not None
        assert self._chunk_key is not None
        row = self._conn.execute(
            "SELECT histogram_bounds::text FROM pg_stats WHERE schemaname = %s"
            " AND tablename = %s AND attname = %s AND NOT inherited",
            [ref.schema, ref.name, self._chunk_key.name]).fetchone()
        if row is None or row[0] is None:
            return []
        rows = self._conn.execute(sql.SQL(
            "SELECT u::text FROM unnest({}::{}[]) WITH ORDINALITY AS x (u, i) ORDER BY i"
        ).format(sql.Literal(row[0]), sql.SQL(self._chunk_key.type_text))).fetchall()
        return [r[0] for r in rows if r[0] is not None]

    def _sample(self, ref: TableRef, chunks: int, estimate: int) -> list[str]:
        """Sorted key values of a row sample (a leaf never analyzed has no histogram)."""
        assert self._conn is not None
        assert self._chunk_key is not None
        want = min(MAX_SAMPLE, chunks * SAMPLE_VALUES_PER_CHUNK)
        percent = min(100.0, 100.0 * want / max(estimate, 1))
        key = sql.Identifier(self._chunk_key.name)
        # The output column gets its own name: `SELECT id::text ... ORDER BY id` sorts by the
        # *output* column (as text: 27686 after 260226), which made overlapping chunk ranges
        # that copied rows twice.
        rows = self._conn.execute(sql.SQL(
            "SELECT {k}::text AS sampled FROM {t} TABLESAMPLE BERNOULLI ({p}) "
            "WHERE {k} IS NOT NULL ORDER BY {k}").format(
                k=key, t=sql.Identifier(ref.schema, ref.name), p=sql.Literal(percent))).fetchall()
        return [r[0] for r in rows]

    # ---- copying ------------------------------------------------------------------------------
    def empty(self) -> pa.Table:
        """The typed empty table of the captured columns."""
        return self._convert(CopyPiece(b""))

    def open_workers(self, n: int) -> int:
        """Up to `n` connections importing the exported snapshot (the first: the session's)."""
        assert self._conn is not None, "use TableSnapshot as a context manager"
        # end the planning queries' statement state; the transaction (and snapshot) stays
        while len(self._workers) < max(1, n):
            self._workers.append(self._import_snapshot())
        return len(self._workers)

    def copy_chunk(self, chunk: ChunkRange, *, worker: int = 0) -> Iterator[pa.Table]:
        """The chunk's rows as typed Arrow tables of bounded size (at least one, maybe empty).

        Each worker connection must be used by one thread at a time."""
        conn = self._workers[worker]
        ref = TableRef.parse(chunk.leaf)
        yield from self._copy(conn, self._copy_query(ref, self._where(chunk)))

    def _where(self, chunk: ChunkRange) -> sql.Composable:
        if chunk.lo is None and chunk.hi is None:
            return sql.SQL("")
        col = self._chunk_key
        if col is None:
            raise ValueError(f"{self.table.name}: a key-range chunk needs a usable key")
        key, type_ = sql.Identifier(col.name), sql.SQL(col.type_text)
        conds: list[sql.Composable] = []
        if chunk.lo is not None:
            conds.append(sql.SQL("{} >= {}::{}").format(key, sql.Literal(chunk.lo), type_))
        if chunk.hi is not None:
            below = sql.SQL("{} < {}::{}").format(key, sql.Literal(chunk.hi), type_)
            if chunk.lo is None:  # a declared key may hold nulls: the first chunk takes them
                below = sql.SQL("({} OR {} IS NULL)").format(below, key)
            conds.append(below)
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)

    def chunks(self) -> Iterator[pa.Table]:
        """The whole table on the session's connection, as Arrow tables of bounded size."""
        assert self._conn is not None, "use TableSnapshot as a context manager"
        yield from self._copy(self._conn, self._copy_query(self.table.ref, sql.SQL("")))

    def _copy(self, conn: psycopg.Connection[Any], query: sql.Composable) -> Iterator[pa.Table]:
        """Run the COPY in a reader thread (so the server keeps sending while this thread
        converts and the caller writes) handing raw pieces over a queue of two: bounded memory."""
        pieces: queue.Queue[object] = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    pieces.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                with translate_errors(secrets=self.source.secrets(),
                                      context=f"copying table {self.table.name}"):
                    done = read_copy(conn, query.as_bytes(conn), binary=self._binary is not None,
                                     piece_rows=self.piece_rows, piece_bytes=self.chunk_bytes,
                                     put=put)
                if done:
                    put(_END)
            except BaseException as exc:  # noqa: BLE001 - raised in the consuming thread
                put(exc)

        reader = threading.Thread(target=read, name="snapshot-copy", daemon=True)
        reader.start()
        yielded = False
        try:
            while True:
                item = pieces.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, CopyPiece)
                yield self._convert(item)
                yielded = True
            if not yielded:
                yield self._convert(CopyPiece(b""))
        finally:
            if reader.is_alive():  # abandoned mid-copy: stop the server sending
                stop.set()
                with contextlib.suppress(Exception):
                    conn.cancel_safe()
            reader.join()

    def _convert(self, piece: CopyPiece) -> pa.Table:
        if self._binary is not None:
            wire = decode_copy_binary(piece.data, piece.row_lengths, self._wire,
                                      utf8=self._utf8)
            converted = [wire[at] for at in self._unwire]
        else:
            converted = [to_arrow(values, col.pg_type) for col, values in zip(
                self.columns, parse_copy_text(piece.data, len(self.columns)), strict=True)]
        arrays: list[pa.Array] = []
        masked: dict[str, int] = {}
        for col, done in zip(self.columns, converted, strict=True):
            if done.masked:
                masked[col.name] = done.masked
            arrays.append(done.array)
        table = pa.Table.from_arrays(arrays, names=[c.name for c in self.columns])
        with self._lock:
            self.rows += table.num_rows
            for name, count in masked.items():
                self.masked[name] = self.masked.get(name, 0) + count
        return table

    def close(self) -> None:
        """Ends the read transactions and the exporting connection (its temporary slot goes)."""
        for conn in (*self._workers, self._conn, self._rconn):
            if conn is not None and not conn.closed:
                conn.close()
        self._workers = []
        self._conn = self._rconn = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

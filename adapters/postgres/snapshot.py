"""Initial table snapshots under a snapshot exported by a temporary slot (SPEC §8, simple form).

`TableSnapshot` creates a TEMPORARY logical slot with `(SNAPSHOT 'export')` on a replication
connection, imports that snapshot into a REPEATABLE READ transaction on a second connection and
copies the table with `COPY (SELECT …) TO STDOUT` (text format), yielding typed Arrow chunks of
bounded size. The table's version is the temporary slot's consistent point C: the stream (from the
persistent slot) must apply only this table's changes that commit after C.

Why a temporary slot per snapshot: it exports a snapshot consistent with an exact LSN, and it
disappears by itself with its connection, so a crash leaves nothing behind. The exported snapshot
lives only while the exporting connection stays idle in its transaction, which is why that
connection is held open until the copy is done and runs no other command.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import TracebackType

import psycopg
import pyarrow as pa
from psycopg import sql

from cdcengine.config import SourceConfig, TableConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import parse_lsn
from cdcengine_postgres.catalog import ColumnFacts, load_table_facts
from cdcengine_postgres.connection import connect
from cdcengine_postgres.convert import parse_copy_text, to_arrow
from cdcengine_postgres.errors import translate_errors

DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024  # text bytes per Arrow chunk: bounded memory


def temp_slot_name(slot_name: str) -> str:
    """A unique temporary slot name derived from the source's slot (≤ 63 chars)."""
    return f"{slot_name[:44]}_snap_{uuid.uuid4().hex[:12]}"


class TableSnapshot:
    """One table's consistent copy. Use as a context manager; iterate `chunks()` once.

    After `__enter__`: `consistent_point` (int LSN C) and `columns` (the captured columns, in
    table order: generated columns are not captured, `columns` selection applied, key kept).
    `masked` counts values the Arrow types could not hold, per column.
    """

    def __init__(self, source: SourceConfig, table: TableConfig, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.source, self.table, self.chunk_bytes = source, table, chunk_bytes
        self.consistent_point = 0
        self.columns: tuple[ColumnFacts, ...] = ()
        self.key: tuple[str, ...] = ()
        self.masked: dict[str, int] = {}
        self.rows = 0
        self._rconn: psycopg.Connection | None = None
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> TableSnapshot:
        secrets = self.source.secrets()
        try:
            self._rconn = connect(self.source.dsn, replication=True, secrets=secrets)
            slot = temp_slot_name(self.source.slot_name)
            with translate_errors(secrets=secrets, context="creating the snapshot slot"):
                # simple query protocol only on a replication connection; the name is [a-z0-9_]
                row = self._rconn.execute(
                    f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput "
                    "(SNAPSHOT 'export')").fetchone()
            assert row is not None
            self.consistent_point, snapshot_name = parse_lsn(row[1]), row[2]
            self._conn = connect(self.source.dsn, autocommit=False, secrets=secrets)
            self._conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self._conn.read_only = True
            with translate_errors(secrets=secrets, context="importing the snapshot"):
                self._conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(snapshot_name)))
                facts = load_table_facts(self._conn, [self.table.ref]).get(self.table.ref)
            if facts is None:
                raise CDCError(f"table {self.table.name} does not exist (any more)",
                               reason=Reason.PREREQUISITES_FAILED)
            wanted = self.table.columns
            self.key = tuple(self.table.primary_key or facts.primary_key
                             or facts.identity_columns)
            self.columns = tuple(c for c in facts.columns if not c.generated and (
                wanted is None or c.name in wanted or c.name in self.key))
        except BaseException:
            self.close()
            raise
        return self

    def chunks(self) -> Iterator[pa.Table]:
        """Typed Arrow chunks of about `chunk_bytes` of text each, in table scan order."""
        assert self._conn is not None, "use TableSnapshot as a context manager"
        names = [c.name for c in self.columns]
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.Identifier(self.table.ref.schema, self.table.ref.name))
        buf = bytearray()
        with translate_errors(secrets=self.source.secrets(), context="copying the table"), \
                self._conn.cursor().copy(query) as copy:
            for data in copy:  # one CopyData message per row: the unavoidable per-row step
                buf += data
                if len(buf) >= self.chunk_bytes:
                    yield self._convert(bytes(buf))
                    buf.clear()
        if buf or self.rows == 0:
            yield self._convert(bytes(buf))

    def _convert(self, chunk: bytes) -> pa.Table:
        raw = parse_copy_text(chunk, len(self.columns))
        arrays: list[pa.Array] = []
        for col, values in zip(self.columns, raw, strict=True):
            done = to_arrow(values, col.pg_type)
            if done.masked:
                self.masked[col.name] = self.masked.get(col.name, 0) + done.masked
            arrays.append(done.array)
        table = pa.Table.from_arrays(arrays, names=[c.name for c in self.columns])
        self.rows += table.num_rows
        return table

    def close(self) -> None:
        """Ends the read transaction and the exporting connection (its temporary slot goes)."""
        for conn in (self._conn, self._rconn):
            if conn is not None and not conn.closed:
                conn.close()
        self._conn = self._rconn = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


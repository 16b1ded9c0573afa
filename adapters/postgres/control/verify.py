"""The source side of `cdcengine verify`: one table read under an exactly positioned snapshot.

`VerifyRead` creates a TEMPORARY logical slot with `(SNAPSHOT 'export')` on a replication
connection, imports that snapshot into a REPEATABLE READ, read-only transaction, then drops the
exporting connection (and with it the temporary slot: the importing transaction keeps the
snapshot, and no WAL is held back while the table is read). The slot's consistent point C is
exact: the snapshot sees precisely the transactions whose commit end LSN is <= C — the rule the
engine's table snapshots follow (SPEC §8), so a Delta row with `_cdc_lsn <= C` must equal the
source row seen here, once Delta holds every change up to C. (`pg_current_wal_lsn()` read inside
a plain REPEATABLE READ transaction would not be exact: a transaction whose commit record is
already in WAL can still be invisible to a snapshot taken a moment later.)

The table is read with `COPY (SELECT …) TO STDOUT` (text format) and converted by the engine's
own mapping (`convert.to_arrow`, SPEC §6), so values are typed exactly as the Delta table holds
them; chunks are bounded in size. Rows come in no particular order (the comparison joins on the
key). Same columns as a snapshot: generated columns are not captured, the table's `columns`
selection applies, key columns always kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

import psycopg
import pyarrow as pa
from psycopg import sql

from cdcengine.config import SourceConfig, TableConfig
from cdcengine.errors import CDCError, Reason
from cdcengine.lsn import parse_lsn
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.control.catalog import ColumnFacts, load_table_facts
from cdcengine_postgres.control.slots import temp_slot_name
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.copy_text import parse_copy_text
from cdcengine_postgres.types.mapping import arrow_type

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024  # COPY text bytes per Arrow chunk: bounded memory


class VerifyRead:
    """One table's rows at an exact position. Use as a context manager; iterate `chunks()` once.

    After `__enter__`: `consistent_point` (int LSN C), `key`, `columns` (captured column names,
    table order), `schema` (their Arrow types). `masked` counts values the types cannot hold
    (nulls in Delta too), `rows` the rows read so far.
    """

    def __init__(self, source: SourceConfig, table: TableConfig, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.source, self.table, self.chunk_bytes = source, table, chunk_bytes
        self.consistent_point = 0
        self.key: tuple[str, ...] = ()
        self.columns: tuple[str, ...] = ()
        self.schema = pa.schema([])
        self.masked: dict[str, int] = {}
        self.rows = 0
        self._facts: tuple[ColumnFacts, ...] = ()
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> VerifyRead:
        secrets = self.source.secrets()
        rconn = None
        try:
            rconn = connect_source(self.source, replication=True,
                                   application_name="cdcengine verify")
            slot = temp_slot_name(self.source.slot_name, "verify")
            with translate_errors(secrets=secrets, context="creating the verify snapshot slot"):
                # simple query protocol only on a replication connection; the name is [a-z0-9_]
                row = rconn.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput "
                                    "(SNAPSHOT 'export')").fetchone()
            assert row is not None
            self.consistent_point, snapshot_name = parse_lsn(row[1]), row[2]
            self._conn = connect_source(self.source, autocommit=False,
                                        application_name="cdcengine verify")
            self._conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self._conn.read_only = True
            with translate_errors(secrets=secrets, context="importing the verify snapshot"):
                self._conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(snapshot_name)))
                facts = load_table_facts(self._conn, [self.table.ref]).get(self.table.ref)
        except BaseException:
            self.close()
            raise
        finally:
            # the imported snapshot lives on in our transaction: release the slot at once
            if rconn is not None and not rconn.closed:
                rconn.close()
        try:
            if facts is None:
                raise CDCError(f"table {self.table.name} does not exist (any more)",
                               reason=Reason.PREREQUISITES_FAILED)
            self.key = tuple(self.table.primary_key or facts.primary_key
                             or facts.identity_columns)
            if not self.key:
                raise CDCError(f"table {self.table.name} has no key to compare rows by (no "
                               "primary key or replica identity index)",
                               reason=Reason.PREREQUISITES_FAILED,
                               fix="Declare `primary_key` for the table in the config.")
            absent = [k for k in self.key if facts.column(k) is None]
            if absent:
                raise CDCError(f"table {self.table.name}: key column(s) {', '.join(absent)} "
                               "do not exist", reason=Reason.PREREQUISITES_FAILED)
            wanted = self.table.columns
            self._facts = tuple(c for c in facts.columns if not c.generated and (
                wanted is None or c.name in wanted or c.name in self.key))
            self.columns = tuple(c.name for c in self._facts)
            self.schema = pa.schema([pa.field(c.name, arrow_type(c.pg_type))
                                     for c in self._facts])
        except BaseException:
            self.close()
            raise
        return self

    def chunks(self) -> Iterator[pa.Table]:
        """Typed Arrow chunks of about `chunk_bytes` of COPY text each (at least one)."""
        assert self._conn is not None, "use VerifyRead as a context manager"
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
            sql.SQL(", ").join(map(sql.Identifier, self.columns)),
            sql.Identifier(self.table.ref.schema, self.table.ref.name))
        buf = bytearray()
        yielded = False
        with translate_errors(secrets=self.source.secrets(), context="reading the table"), \
                self._conn.cursor().copy(query) as copy:
            for data in copy:
                buf += data
                if len(buf) >= self.chunk_bytes:
                    yield self._convert(bytes(buf))
                    yielded = True
                    buf.clear()
        if buf or not yielded:
            yield self._convert(bytes(buf))

    def _convert(self, chunk: bytes) -> pa.Table:
        raw = parse_copy_text(chunk, len(self._facts))
        arrays: list[pa.Array] = []
        for col, values in zip(self._facts, raw, strict=True):
            done = to_arrow(values, col.pg_type)
            if done.masked:
                self.masked[col.name] = self.masked.get(col.name, 0) + done.masked
            arrays.append(done.array)
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self.rows += table.num_rows
        return table

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

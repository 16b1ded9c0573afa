"""`PostgresChanges`: the change-stream session the core pipeline drives.

It stacks the replication stream (socket, keepalives, standby status), the transaction assembler
(only committed transactions leave it; streamed chunks spilled and replayed) and the type
catalog (a converter per relation column, text → Arrow). The core sees engine-neutral events and
converters; it never sees psycopg.

The reading thread's hot path is here: frames come in bursts (`ReplicationStream.read_payloads`)
and plain Inserts -- almost everything a bulk load sends -- bypass the per-message decoder: a
run of them is handed on as one `packed.InsertRun` of raw messages, whose columns are split in
bulk when the batch is converted (see `packed.py`).
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pyarrow as pa

from cdcengine.config import SourceConfig
from cdcengine.events import Event, Relation
from cdcengine_postgres.connection import connect
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.replication.packed import INSERT_HEADER, InsertRun
from cdcengine_postgres.replication.stream import ReplicationStream
from cdcengine_postgres.replication.transactions import TransactionAssembler
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.mapping import PgType, load_types

DRAIN_FRAMES = 2000  # frames per `events` call at most, so the caller still gets control

ColumnConverter = Callable[[Sequence[bytes | None] | pa.Array], tuple[pa.Array, int]]

_RELID = struct.Struct(">I").unpack_from
_INSERT = 0x49  # 'I'
_NEW_TUPLE = 0x4E  # 'N'
_STREAM_START = 0x53  # 'S'
_STREAM_STOP = 0x45  # 'E'
_RELATION = 0x52  # 'R'
_STREAM_COMMIT = 0x63  # 'c': replays a streamed transaction, its Relation messages included

# The primary key of a relation, in key order (pg_index.indkey order).
_PRIMARY_KEY_SQL = (
    "SELECT a.attname FROM pg_index i"
    " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)"
    " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
    " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.pos"
)


class PostgresChanges:
    """Open with `with`; then `events(timeout_s)` yields committed transactions' events.

    `set_flush_lsn` tells the server what is durable (sent with the next status update);
    `keepalive_lsn` is the server's position for confirming an idle stream. On a reconnect make a
    new session: in-progress streamed transactions are discarded with the old one.
    """

    def __init__(self, source: SourceConfig, *, start_lsn: int = 0, proto_version: int = 2,
                 spill_dir: Path | None = None, status_interval_s: float = 10.0) -> None:
        self.source = source
        self._own_spill = spill_dir is None
        self._spill = Path(spill_dir or tempfile.mkdtemp(prefix="cdcengine-spill-"))
        self._proto_version, self._status_interval_s = proto_version, status_interval_s
        self._stream = self._new_stream(start_lsn)
        self._assembler = TransactionAssembler(self._spill)
        self._in_block = False  # between Stream Start and Stream Stop
        self._types: dict[int, PgType] = {}
        self._primary_keys: dict[int, tuple[str, ...]] = {}  # relid -> key, for FULL tables

    def _new_stream(self, start_lsn: int) -> ReplicationStream:
        source = self.source
        return ReplicationStream(
            source.dsn, slot=source.slot_name, publications=[source.publication_name],
            start_lsn=start_lsn, proto_version=self._proto_version, secrets=source.secrets(),
            status_interval_s=min(self._status_interval_s, source.replication_timeout_s / 3),
            silence_timeout_s=float(source.replication_timeout_s),
            application_name=f"cdcengine:{source.name}")

    def __enter__(self) -> PostgresChanges:
        try:
            self._stream.start()
        except BaseException:
            self.close()
            raise
        return self

    def stream_from(self, start_lsn: int) -> None:
        """Start streaming at `start_lsn` in a session that has only decoded so far (a
        catch-up, `catchup.py`): the decoder's relation keys and type cache stay."""
        self._stream = self._new_stream(start_lsn)
        self.__enter__()

    def events(self, timeout_s: float) -> Iterator[Event]:
        """Events of whatever arrives within `timeout_s` (nothing when the stream is idle),
        then of every frame already buffered, up to `DRAIN_FRAMES`: the caller's per-read
        bookkeeping runs once per drain, not once per row.

        Consecutive plain Inserts into one relation (outside streamed blocks) come out as one
        `InsertRun` of their raw messages, decoded later, column by column, for a whole batch
        (`packed.py`); everything else goes through the transaction assembler one message at a
        time. Per Insert this loop does one prefix comparison and one append.
        """
        payloads = self._stream.read_payloads(timeout_s, DRAIN_FRAMES)
        if payloads:
            yield from self.decode(payloads)

    def decode(self, payloads: list[bytes]) -> Iterator[Event]:
        """The events of raw pgoutput messages, whichever way they arrived (the replication
        stream, or a catch-up's peek of the slot: `catchup.py`)."""
        feed = self._assembler.feed
        run: list[bytes] | None = None
        prefix = b""  # 'I' relid 'N' of the current run
        for payload in payloads:
            if run is not None:
                if payload.startswith(prefix):
                    run.append(payload)
                    continue
                yield _run(prefix, run)
                run = None
            kind = payload[0]
            if kind == _INSERT and not self._in_block and len(payload) >= INSERT_HEADER \
                    and payload[5] == _NEW_TUPLE:
                prefix = payload[:6]
                run = [payload]
                continue
            if kind in (_RELATION, _STREAM_COMMIT):
                yield from self._keyed(feed(payload))
            else:
                yield from feed(payload)
            # the assembler accepted it: follow its stream blocks (it raises on any misuse)
            if kind == _STREAM_START:
                self._in_block = True
            elif kind == _STREAM_STOP:
                self._in_block = False
        if run is not None:
            yield _run(prefix, run)

    def _keyed(self, events: Iterable[Event]) -> Iterator[Event]:
        """Relations keyed on what identifies a row. Under REPLICA IDENTITY FULL pgoutput flags
        every column as part of the identity, which is no key at all: an update of any column
        would look like a new row, and NULLs would make rows unmatchable. Such a relation is
        keyed on the table's primary key instead (when it has one; the old rows FULL sends are
        complete, so they still carry it). Looked up once per relation and session."""
        for event in events:
            if type(event) is Relation and event.replica_identity == "full":
                key = self._primary_key(event.relid)
                if key:
                    columns = tuple(dataclasses.replace(c, key=c.name in key)
                                    for c in event.columns)
                    event = dataclasses.replace(event, columns=columns)
            yield event

    def _primary_key(self, relid: int) -> tuple[str, ...]:
        key = self._primary_keys.get(relid)
        if key is None:
            secrets = self.source.secrets()
            with connect(self.source.dsn, secrets=secrets) as conn, \
                    translate_errors(secrets=secrets, context="reading the primary key"):
                rows = conn.execute(_PRIMARY_KEY_SQL, [relid]).fetchall()
            key = self._primary_keys[relid] = tuple(r[0] for r in rows)
        return key

    def set_flush_lsn(self, lsn: int) -> None:
        self._stream.set_flush_lsn(lsn)

    def send_status(self) -> None:
        self._stream.send_status(force=True)

    @property
    def keepalive_lsn(self) -> int:
        return self._stream.keepalive_lsn

    @property
    def draining(self) -> bool:
        return False  # a stream never waits for the core

    def converters(self, relation: Relation) -> list[ColumnConverter]:
        """One text→Arrow converter per column, from the catalog's types (cached by oid)."""
        missing = {c.type_oid for c in relation.columns} - set(self._types)
        if missing:
            with connect(self.source.dsn, secrets=self.source.secrets()) as conn, \
                    translate_errors(secrets=self.source.secrets(), context="reading types"):
                self._types.update(load_types(conn, missing))
        out: list[ColumnConverter] = []
        for col in relation.columns:
            pgtype = self._types[col.type_oid].with_typmod(col.typmod)
            out.append(_converter(pgtype))
        return out

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._assembler.close()
            if self._own_spill:
                shutil.rmtree(self._spill, ignore_errors=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _run(prefix: bytes, payloads: list[bytes]) -> InsertRun:
    return InsertRun(_RELID(prefix, 1)[0], payloads)


def _converter(pgtype: PgType) -> ColumnConverter:
    def convert(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
        done = to_arrow(values, pgtype)
        return done.array, done.masked

    return convert

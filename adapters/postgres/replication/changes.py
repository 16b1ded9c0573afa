"""`PostgresChanges`: the change-stream session the core pipeline drives.

It stacks the replication stream (socket, keepalives, standby status), the transaction assembler
(only committed transactions leave it; streamed chunks spilled and replayed) and the type
catalog (a converter per relation column, text → Arrow). The core sees engine-neutral events and
converters; it never sees psycopg.

The reading thread's hot path is here: frames come in bursts (`ReplicationStream.read_payloads`)
and changes -- almost everything a bulk load, update or delete sends -- bypass the per-message
decoder: a run of them is handed on as one `packed.ChangeRun` of raw messages, whose columns are
split in bulk when the batch is converted (see `packed.py`).
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
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.replication.packed import CHANGE_HEADER, PACKABLE, ChangeRun
from cdcengine_postgres.replication.pgoutput import decode
from cdcengine_postgres.replication.stream import ReplicationStream
from cdcengine_postgres.replication.transactions import TransactionAssembler
from cdcengine_postgres.types.convert import to_arrow
from cdcengine_postgres.types.mapping import PgType, load_types

DRAIN_FRAMES = 2000  # frames per `events` call at most, so the caller still gets control

ColumnConverter = Callable[[Sequence[bytes | None] | pa.Array], tuple[pa.Array, int]]

_RELID = struct.Struct(">I").unpack_from
_CHANGE_KINDS = frozenset(b"IUD")
_NOT_INSERT, _HAS_OLD = 1, 2  # packing flags of a message (`_prefixes`)
RUN_LIMIT = 4096  # changes per run at most: the batcher budgets memory per run
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
        self._assembler = TransactionAssembler(self._spill, raw_changes=True)
        self._in_block = False  # between Stream Start and Stream Stop
        self._types: dict[int, PgType] = {}
        self._primary_keys: dict[int, tuple[str, ...]] = {}  # relid -> key, for FULL tables
        self._tables: dict[bytes, dict[bytes, int]] = {}  # relid bytes -> `_prefixes`

    def _new_stream(self, start_lsn: int) -> ReplicationStream:
        source = self.source
        return ReplicationStream(
            source.dsn, slot=source.slot_name, publications=[source.publication_name],
            start_lsn=start_lsn, proto_version=self._proto_version, secrets=source.secrets(),
            tunnel=source.ssh_tunnel,
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

        Consecutive changes into one relation (outside streamed blocks, and in a streamed
        transaction's replay) come out as one `ChangeRun` of their raw messages, decoded later,
        column by column, for a whole batch (`packed.py`); everything else goes through the
        transaction assembler one message at a time.
        """
        payloads = self._stream.read_payloads(timeout_s, DRAIN_FRAMES)
        if payloads:
            yield from self.decode(payloads)

    def decode(self, payloads: list[bytes]) -> Iterator[Event]:
        """The events of raw pgoutput messages, whichever way they arrived (the replication
        stream, or a catch-up's peek of the slot: `catchup.py`)."""
        return self._pack(payloads, replay=False)

    def _pack(self, items: Iterable[bytes | Event], *, replay: bool) -> Iterator[Event]:
        """Runs of packable changes (`packed.PACKABLE`) into one relation as `ChangeRun`s,
        everything else through the assembler (or, in a streamed transaction's replay, whose
        changes come undecoded, through `decode`). Per change this loop does one slice, one
        dict lookup and two appends."""
        feed = self._assembler.feed
        run: list[bytes] | None = None
        table: dict[bytes, int] = {}  # the run's relation: message prefix -> packing flags
        mix = 0
        for item in items:
            if run is not None:
                if type(item) is bytes:
                    flags = table.get(item[:6])
                    if flags is not None and len(run) < RUN_LIMIT:
                        run.append(item)
                        mix |= flags
                        continue
                yield _run(run, mix)
                run = None
            if type(item) is not bytes:  # a replay's decoded event
                yield from self._keyed((item,)) if type(item) is Relation else (item,)
                continue
            kind = item[0]
            if kind in _CHANGE_KINDS and (replay or not self._in_block) \
                    and len(item) >= CHANGE_HEADER:
                table = self._prefixes(item[1:5])
                flags = table.get(item[:6])
                if flags is not None:
                    run, mix = [item], flags
                    continue
            if replay:  # a change not packed (an update that changed its key)
                yield decode(item, in_stream=False)  # type: ignore[misc]
            elif kind == _STREAM_COMMIT:
                yield from self._pack(feed(item), replay=True)
            elif kind == _RELATION:
                yield from self._keyed(feed(item))  # type: ignore[arg-type]
            else:
                yield from feed(item)  # type: ignore[misc]
            # the assembler accepted it: follow its stream blocks (it raises on any misuse)
            if kind == _STREAM_START:
                self._in_block = True
            elif kind == _STREAM_STOP:
                self._in_block = False
        if run is not None:
            yield _run(run, mix)

    def _prefixes(self, relid: bytes) -> dict[bytes, int]:
        """Message prefix (kind, relid, marker) -> packing flags, for one relation."""
        table = self._tables.get(relid)
        if table is None:
            table = self._tables[relid] = {
                bytes((kind,)) + relid + bytes((marker,)):
                    (0 if op == b"I"[0] else _NOT_INSERT) | (_HAS_OLD if marker == 0x4F
                                                          and kind == 0x55 else 0)
                for (kind, marker), op in PACKABLE.items()}
        return table

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
            with connect_source(self.source) as conn, \
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
            with connect_source(self.source) as conn, \
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


def _run(payloads: list[bytes], mix: int) -> ChangeRun:
    relid = _RELID(payloads[0], 1)[0]
    if not mix:
        return ChangeRun.inserts(relid, payloads)
    return ChangeRun(relid, payloads, has_old=bool(mix & _HAS_OLD))


def _converter(pgtype: PgType) -> ColumnConverter:
    def convert(values: Sequence[bytes | None] | pa.Array) -> tuple[pa.Array, int]:
        done = to_arrow(values, pgtype)
        return done.array, done.masked

    return convert

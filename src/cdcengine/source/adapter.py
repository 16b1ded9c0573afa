"""The seam between the engine-neutral core and a source engine (PostgreSQL first).

The core sees only `SourceAdapter` and the dataclasses below; it never imports a driver. An
adapter lives in its own package under `adapters/` (PostgreSQL: `cdcengine_postgres`) and is found
through `cdcengine.source.registry.adapter_for(source)`. Every dataclass here is JSON-safe through
`dataclasses.asdict` and holds no secret.

Error contract for every method: a source that cannot be reached raises a `CDCError` subclass
(`SourceUnreachable` with reason `auth_failed`, `connection_failed`, `host_unreachable`,
`ssl_required`, `dsn_invalid`, …); driver exceptions never escape an adapter.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    import pyarrow as pa

    from cdcengine.config import SourceConfig, TableConfig
    from cdcengine.events import Event, Relation
    from cdcengine.names import TableRef
    from cdcengine.pipeline.batcher import ColumnConverter


class Severity(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"

    @property
    def symbol(self) -> str:
        return {"ok": "✅", "warning": "⚠️", "error": "❌"}[self.value]


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One prerequisite check. `ok` is False only for `error` (a warning does not block)."""

    name: str
    severity: Severity
    message: str
    fix: str = ""
    table: str | None = None
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "ok", self.severity is not Severity.ERROR)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnInfo:
    name: str
    source_type: str  # as the source prints it, e.g. "numeric(12,2)", "integer[]"
    delta_type: str  # e.g. "decimal(12,2)", "array<integer>", "timestamp_ntz"
    nullable: bool
    primary_key: bool = False
    generated: bool = False  # generated columns are not captured (not sent by COPY nor WAL)
    captured: bool = True
    note: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TableInfo:
    """What a user looks at before choosing a table (`cdcengine tables`)."""

    schema: str
    name: str
    qualified: str
    kind: str  # "table" | "partitioned table" | "partition" | "view" | …
    estimated_rows: int | None
    columns: tuple[ColumnInfo, ...]
    primary_key: tuple[str, ...]
    replica_identity: str  # "default" | "full" | "index" | "nothing"
    replica_identity_columns: tuple[str, ...]
    partitioned: bool
    partition_of: str | None
    capturable: bool
    reasons: tuple[str, ...] = ()  # why not capturable
    notes: tuple[str, ...] = ()  # capturable, but worth knowing (timestampNtz, partition DDL)
    configured: bool = False  # listed in the source's `tables`

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceIdentity:
    """Who the source is: a changed identity means restored/failed over/recreated."""

    system_identifier: str
    timeline: int
    server_version: int
    database: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotInfo:
    name: str
    exists: bool
    active: bool = False
    active_pid: int | None = None
    plugin: str | None = None
    temporary: bool = False
    confirmed_flush_lsn: str | None = None  # X/Y text at the edge; ints inside the engine
    restart_lsn: str | None = None
    lag_bytes: int | None = None  # current WAL position − confirmed_flush_lsn
    retained_wal_bytes: int | None = None  # current WAL position − restart_lsn (fills the disk)
    wal_status: str | None = None  # reserved | extended | unreserved | lost
    safe_wal_size: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicationInfo:
    name: str
    exists: bool
    tables: tuple[str, ...] = ()
    owned: bool | None = None  # carries this install's mark (None: does not exist)
    mark: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthProbe:
    """One reading of what the lag policy needs (SPEC §7), taken on one connection."""

    slot: SlotInfo
    temporary_slots: tuple[SlotInfo, ...] = ()  # the engine's snapshot/verify slots right now
    publication: PublicationInfo
    retention_cap_mb: int | None = None  # max_slot_wal_keep_size; None when unlimited
    # configured tables that no longer exist under their name (dropped or renamed): they stop
    # alone, they do not break the source
    gone_tables: tuple[str, ...] = ()

    @property
    def retained_wal_bytes(self) -> int | None:
        """The most WAL any of the source's slots holds back: what fills the disk."""
        values = [s.retained_wal_bytes for s in (self.slot, *self.temporary_slots)
                  if s.exists and s.retained_wal_bytes is not None]
        return max(values) if values else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionResult:
    slot_created: bool
    slot_adopted: bool
    publication_created: bool
    publication_adopted: bool
    consistent_point: str | None  # X/Y; None when an existing slot was adopted
    identity: SourceIdentity


@dataclass(frozen=True, slots=True, kw_only=True)
class TeardownResult:
    slot_dropped: bool
    publication_dropped: bool
    terminated_pids: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()  # what was left alone and why


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRange:
    """One chunk of a table snapshot: the rows of `leaf` (the table itself, or one partition of
    a partitioned table) whose chunk key lies in [lo, hi). Bounds are the key's values as the
    source prints them (text; compared by the source, in the key's own type and collation);
    None is unbounded (the first chunk also takes rows whose key is null)."""

    id: int
    leaf: str  # "schema.name"
    lo: str | None = None
    hi: str | None = None
    estimated_rows: int = 0

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "leaf": self.leaf, "lo": self.lo, "hi": self.hi,
                "rows": self.estimated_rows}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ChunkRange:
        lo, hi, rows, id_ = data.get("lo"), data.get("hi"), data.get("rows", 0), data["id"]
        return cls(id=int(id_), leaf=str(data["leaf"]),  # type: ignore[call-overload]
                   lo=None if lo is None else str(lo), hi=None if hi is None else str(hi),
                   estimated_rows=int(rows))  # type: ignore[call-overload]


class DefaultKind(enum.StrEnum):
    """What rows that existed before an `ADD COLUMN` hold in it (`ColumnDefault.kind`)."""

    NONE = "none"  # no default: they hold NULL, which the stream already implies
    # a constant default stored once in the catalog: they hold `ColumnDefault.value`
    FAST = "fast"
    # a volatile default or an identity column: the table was rewritten and each row got its
    # own value, which only a re-snapshot can read
    REWRITTEN = "rewritten"


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnDefault:
    """What rows that existed before an `ADD COLUMN` hold in it without any WAL saying so.

    `kind`: see `DefaultKind`; for `fast`, `value` is the default, typed as the column's Delta
    type."""

    kind: DefaultKind
    value: pa.Scalar | None = None
    text: str | None = None  # the source's text form of the default, for messages


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotLayout:
    """What a chunk plan depends on; a resumed snapshot needs the same layout as its plan.

    `chunk_key`: the key column ranges are cut on (None: no usable key, so the table is read
    as one chunk per leaf and an interrupted snapshot restarts the table). `leaves`: what is
    read, "schema.name" each (a partitioned table's leaf partitions, else the table itself).
    """

    columns: tuple[str, ...]
    key: tuple[str, ...]
    chunk_key: str | None
    leaves: tuple[str, ...]

    @property
    def resumable(self) -> bool:
        return self.chunk_key is not None


class SnapshotStopped(Exception):
    """A snapshot session was stopped before it reached its consistent point."""


class SnapshotSession(Protocol):
    """One table's consistent copy (a context manager). After entering: `consistent_point`
    (int LSN C: the stream applies this table's changes after C only), `key`, and `chunks()`
    yielding typed Arrow tables of the captured columns; `masked` counts nulled values.

    Chunked, parallel form (`pipeline.snapshots` drives it): `layout()`, `plan(chunk_rows)`,
    then `open_workers(n)` (each worker a connection importing the same exported snapshot) and
    `copy_chunk(chunk, worker=i)` from up to n threads at once, one per worker, each yielding
    the chunk's rows as typed Arrow tables of bounded size. `empty()` is the typed empty table.
    `rows` and `masked` are totals over everything copied (thread-safe).
    """

    consistent_point: int
    key: tuple[str, ...]
    masked: dict[str, int]
    rows: int

    def __enter__(self) -> SnapshotSession: ...
    def __exit__(self, *exc: object) -> None: ...
    def chunks(self) -> Iterator[pa.Table]: ...
    def layout(self) -> SnapshotLayout: ...
    def plan(self, chunk_rows: int) -> list[ChunkRange]: ...
    def empty(self) -> pa.Table: ...
    def open_workers(self, n: int) -> int: ...
    def copy_chunk(self, chunk: ChunkRange, *, worker: int) -> Iterator[pa.Table]: ...


class VerifyReader(Protocol):
    """One table's rows at an exact source position, for `verify` (a context manager).

    After entering: `consistent_point` (int LSN C: exactly the transactions with commit end LSN
    <= C are visible), `key` (the columns rows are matched by), `columns` (the captured column
    names) and `schema` (their Arrow types, SPEC §6); `chunks()` yields typed Arrow tables of
    those columns in no particular order, bounded in size."""

    consistent_point: int
    key: tuple[str, ...]
    columns: tuple[str, ...]
    schema: pa.Schema

    def __enter__(self) -> VerifyReader: ...
    def __exit__(self, *exc: object) -> None: ...
    def chunks(self) -> Iterator[pa.Table]: ...


class ChangeSession(Protocol):
    """The live change stream (a context manager): committed transactions' events in order."""

    def __enter__(self) -> ChangeSession: ...
    def __exit__(self, *exc: object) -> None: ...
    def events(self, timeout_s: float) -> Iterator[Event]: ...
    def converters(self, relation: Relation) -> Sequence[ColumnConverter]: ...
    def set_flush_lsn(self, lsn: int) -> None: ...
    def send_status(self) -> None: ...
    @property
    def keepalive_lsn(self) -> int: ...
    @property
    def draining(self) -> bool:
        """True while the session waits for everything it delivered to become durable before
        it reads on (a catch-up chunk's end): the core should write what it buffers now."""
        ...


class SourceAdapter(Protocol):
    """What the core needs from a source engine's control plane.

    Implementations are stateless between calls (each call opens and closes its connections),
    so they are safe to use from a web request. Snapshot and streaming join this seam with the
    streaming engine.
    """

    def check_prerequisites(
        self, source: SourceConfig, *, install_id: str, known_slot: bool = False
    ) -> list[Check]:
        """Run every check and return them all (never stops at the first failure).

        `known_slot`: the state store records that this install created the source's slot, so
        an existing slot of that name is ours (not a conflict).
        Raises only when the source cannot be reached at all.
        """
        ...

    def discover_tables(self, source: SourceConfig) -> list[TableInfo]:
        """Every user table of the source's database, with whether (and why not) capturable."""
        ...

    def provision(
        self,
        source: SourceConfig,
        *,
        install_id: str,
        known_slot: bool = False,
        slot_wait_s: float = 30.0,
    ) -> ProvisionResult:
        """Create (or adopt, when provably ours) the publication and the slot.

        Managed: publication (marked with `install_id`) then slot. Self-managed: the slot only;
        the user's publication is never created or altered. On failure, exactly what this call
        created is dropped again before the error is raised. Slot creation waits at most
        `slot_wait_s` for running transactions and then raises `SlotCreationBlocked` naming them.
        """
        ...

    def undo_provision(self, source: SourceConfig, result: ProvisionResult) -> None:
        """Drop what `result` says `provision` created (a later step of enable failed)."""
        ...

    def teardown(
        self,
        source: SourceConfig,
        *,
        install_id: str,
        known_slot: bool = False,
        wait_s: float = 10.0,
    ) -> TeardownResult:
        """Drop what the engine owns (managed: slot + marked publication; self-managed: slot).

        Idempotent. A slot held by another backend is freed by terminating that walsender, with a
        bounded wait. Something that is not provably ours is left alone and said so in `notes`.
        """
        ...

    def slot_status(self, source: SourceConfig) -> SlotInfo:
        """The slot's live state, lag and retained WAL (SPEC §7 inputs)."""
        ...

    def publication_status(
        self, source: SourceConfig, *, install_id: str | None = None
    ) -> PublicationInfo:
        """The publication and its tables; `owned` tells whether it carries `install_id`'s mark."""
        ...

    def probe_health(self, source: SourceConfig, *, install_id: str | None = None
                     ) -> HealthProbe:
        """The slot (and the engine's temporary slots), the publication and the server's WAL
        retention cap, read together for one pass of the lag policy."""
        ...

    def identify(self, source: SourceConfig) -> SourceIdentity: ...

    def snapshot(self, source: SourceConfig, table: TableConfig, *,
                 stop: threading.Event | None = None) -> SnapshotSession:
        """A consistent copy of one table under a snapshot exported by a temporary slot.

        The exporting connection stays open (and idle) until the session is left, so workers
        opened by `open_workers` import exactly the same snapshot. Entering waits until the
        transactions running at that moment have ended (reported while it lasts); `stop` set
        meanwhile cancels the wait and entering raises `SnapshotStopped`."""
        ...

    def verify_reader(self, source: SourceConfig, table: TableConfig) -> VerifyReader:
        """The table's rows under a snapshot at an exact position (see `VerifyReader`)."""
        ...

    def changes(self, source: SourceConfig, *, start_lsn: int = 0,
                spill_dir: Path | None = None, catchup: bool = False) -> ChangeSession:
        """The change stream from the source's slot (start 0: where the slot confirmed).

        `catchup`: the caller confirms everything durable as it goes (nothing held), so a
        slot far behind (`catchup_threshold_mb`) may be read faster than streaming first; the
        session then waits for durability at its chunks' ends (`ChangeSession.draining`) and
        switches to streaming by itself."""
        ...

    def added_column_defaults(self, source: SourceConfig, ref: TableRef,
                              columns: Sequence[str]) -> dict[str, ColumnDefault]:
        """For columns just added to `ref`: what the rows that existed before hold in them
        (see `ColumnDefault`). A column no longer in the table is left out."""
        ...

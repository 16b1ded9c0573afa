"""The seam between the engine-neutral core and a source engine (PostgreSQL first).

The core sees only `SourceAdapter` and the dataclasses below; it never imports a driver. An
adapter lives in its own package under `adapters/` (PostgreSQL: `cdcengine_postgres`) and is found
through `cdcengine.registry.adapter_for(source)`. Every dataclass here is JSON-safe through
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
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    import pyarrow as pa

    from cdcengine.batcher import ColumnConverter
    from cdcengine.config import SourceConfig, TableConfig
    from cdcengine.events import Event, Relation


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


class SnapshotSession(Protocol):
    """One table's consistent copy (a context manager). After entering: `consistent_point`
    (int LSN C: the stream applies this table's changes after C only), `key`, and `chunks()`
    yielding typed Arrow tables of the captured columns; `masked` counts nulled values."""

    consistent_point: int
    key: tuple[str, ...]
    masked: dict[str, int]
    rows: int

    def __enter__(self) -> SnapshotSession: ...
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

    def identify(self, source: SourceConfig) -> SourceIdentity: ...

    def snapshot(self, source: SourceConfig, table: TableConfig) -> SnapshotSession:
        """A consistent copy of one table under a snapshot exported by a temporary slot."""
        ...

    def changes(self, source: SourceConfig, *, start_lsn: int = 0,
                spill_dir: Path | None = None) -> ChangeSession:
        """The change stream from the source's slot (start 0: where the slot confirmed)."""
        ...

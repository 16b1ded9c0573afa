"""Engine-neutral change events: what a source adapter hands the core, transaction by transaction.

Contract (the adapter guarantees it, the core relies on it):
- Only committed transactions reach the core, in commit order, each as `Begin`, then its changes
  in WAL order, then `Commit`. In-progress chunks of large transactions (PostgreSQL's protocol v2
  streaming), aborted subtransactions and aborted transactions are resolved inside the adapter.
- A `Relation` event precedes the first change of a relation in a session and is repeated when
  the relation's shape changes; changes refer to relations by `relid`.
- Column values travel as the source's text form (`bytes`), `None` for SQL NULL, or the
  `UNCHANGED` marker for an unchanged TOASTed value that the source did not send. `UNCHANGED` is
  never NULL: the sink must keep the stored value.
- LSNs are ints. `Commit.end_lsn` is the transaction's position: everything at or below it is
  applied once that transaction is durable.
- Consecutive changes to one relation may arrive packed, as one `PackedChanges` (a subclass
  the adapter defines), instead of one event each: same rows, same order, same meaning. The
  core keeps such a run as it is and asks the adapter's class for the rows' text columns only
  when it converts them (`PackedChanges.columns`: whole columns at once, no Python object per
  value), which is what makes bulk inserts, updates and deletes cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

if TYPE_CHECKING:
    import pyarrow as pa


@final
class _Unchanged:
    """Marker for an unchanged TOASTed column value (pgoutput's 'u')."""

    __slots__ = ()
    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __bool__(self) -> bool:
        # falsy like None, so `filter(None, row)` keeps only sent values (cheap size sums)
        return False

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

Value = bytes | None | _Unchanged
Row = tuple[Value, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelationColumn:
    name: str
    type_oid: int
    typmod: int
    key: bool  # part of the replica identity (pgoutput flag bit 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Relation:
    relid: int
    schema: str
    name: str
    replica_identity: str  # "default" | "nothing" | "full" | "index"
    columns: tuple[RelationColumn, ...]

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Begin:
    xid: int
    final_lsn: int  # LSN of the commit record
    commit_ts_us: int  # microseconds since the Unix epoch, UTC


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    xid: int
    commit_lsn: int
    end_lsn: int  # the transaction's position: confirm/skip decisions use this
    commit_ts_us: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Insert:
    relid: int
    new: Row


@dataclass(frozen=True, slots=True, kw_only=True)
class Update:
    relid: int
    new: Row
    old: Row | None = None  # 'K' (key columns only, others None) or 'O' (full row) or absent
    old_is_key: bool = False  # True for 'K': only identity columns are meaningful in `old`


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    relid: int
    old: Row
    old_is_key: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Truncate:
    relids: tuple[int, ...]
    cascade: bool = False
    restart_identity: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A logical decoding message (pg_logical_emit_message), transactional ones in order."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class PackedColumns:
    """The text columns of packed changes (`PackedChanges.columns`), one value per change."""

    columns: list[pa.Array]  # binary, null for SQL NULL and for an unchanged TOASTed value
    # per change, the indices of the columns holding an unchanged TOASTed value (list<int32>,
    # null when none); None when no change has any
    unchanged: pa.Array | None = None


class PackedChanges:
    """`count` consecutive changes to relation `relid`, in the adapter's packed form.

    Equivalent to `count` Insert/Update/Delete events in order (within one transaction), one
    row each: `ops` holds each change's `_cdc_op` letter (b"I", b"U", b"D"); an update's row is
    its new row (under REPLICA IDENTITY FULL with unchanged TOASTed values taken from the old
    row), a delete's its old row. The adapter never packs an update that changed its key (two
    rows); when `has_old` (some updates carry the whole old row), the core asks `keeps_keys`
    with its key before keeping the run packed, and otherwise takes its `events()`.

    The core never looks inside: it keeps runs as they are and, when it converts a table's
    rows, hands every run of one class to that class's `columns`, which returns the text
    columns of all their rows at once; `rows` gives the same rows as `Row` tuples for the
    cases that need them one by one. `nbytes` is the packed size, for the core's memory budget.
    """

    __slots__ = ("count", "has_old", "nbytes", "ops", "relid")

    relid: int
    count: int
    nbytes: int
    ops: bytes
    has_old: bool

    def rows(self) -> list[Row]:
        """The run's rows as the core keeps them (UNCHANGED markers included; decoding errors
        raise)."""
        raise NotImplementedError

    def events(self) -> list[Change]:
        """The run's changes as events, one by one (decoding errors raise)."""
        raise NotImplementedError

    def keeps_keys(self, key_idx: Sequence[int]) -> bool:
        """False when an update of the run changes a value of the columns at `key_idx` (it
        would make two rows), or when that cannot be told column-wise."""
        raise NotImplementedError

    @classmethod
    def columns(cls, runs: Sequence[PackedChanges], ncols: int) -> PackedColumns | None:
        """The rows of `runs` (all of this class, in order) as `ncols` Arrow binary columns of
        text values, or None when any row has another number of columns or a value that is not
        plain text, NULL or unchanged (then the caller goes through `rows`)."""
        raise NotImplementedError


Change = Insert | Update | Delete | Truncate
Event = (
    Relation | Begin | Commit | Insert | PackedChanges | Update | Delete | Truncate | Message
)

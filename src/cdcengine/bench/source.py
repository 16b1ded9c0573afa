"""The seam between `cdcengine bench` and a source engine's bench part.

The harness (engine-neutral) drives a `BenchSource`, which an adapter provides through
`cdcengine.source.registry.bench_for` (PostgreSQL: `cdcengine_postgres.bench.source:open_bench`).
The source side owns everything engine-specific: the server, the table, writing each workload's
backlog, the consumers' slots, the raw-limit baselines (as commands the harness times as
processes) and the source-side checksum. The harness owns the clock, the engine process, Delta,
statistics and the report.

The bench table is always `t(id bigint pk, a int, b text, c timestamptz, d numeric(12,2), e jsonb,
f boolean, g double precision)`; `b` is 64 hex characters and `e` a small object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

#: The checksum's fields, the same on both sides (see `cdcengine.bench.checks`).
CHECKSUM_FIELDS: tuple[str, ...] = (
    "rows", "sum_id", "sum_a", "sum_d", "sum_len_b", "count_f", "sum_c_us", "sum_len_e")


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a workload wrote while no consumer was reading.

    `floor_lsn`: the WAL insert position read inside the last transaction just before its
    commit: every change is applied once a Delta table's largest `_cdc_lsn` is >= it (the last
    transaction's commit comes after it, every earlier transaction's end before it).
    `end_lsn`: the WAL insert position after the last commit (`--endpos` of a streaming peer).
    `ops`: changes per operation ('I', 'U', 'D'), what an append table must hold.
    """

    floor_lsn: int
    end_lsn: int
    ops: Mapping[str, int] = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return sum(self.ops.values())


@dataclass(frozen=True, slots=True)
class SteadyStats:
    """What a fixed-rate workload did: changes committed, and its source WAL position over time
    (`(time.monotonic(), lsn)` after each commit), from which the harness computes lag."""

    updates: int
    deletes: int
    seconds: float
    wal: list[tuple[float, int]]
    error: str | None = None


class BenchSource(Protocol):
    """A source engine's bench part. Each method opens its own connection(s)."""

    @property
    def dsn(self) -> str: ...

    @property
    def description(self) -> str:
        """Where the source is, for people (no secrets)."""
        ...

    def facts(self) -> dict[str, object]:
        """Version and the settings that matter for the figures (fsync, wal settings, ...)."""
        ...

    def create_table(self, table: str, rows: int = 0) -> None:
        """(Re)create the bench table `table` (schema-qualified) holding ids 1..rows."""
        ...

    def max_id(self, table: str) -> int: ...

    def create_publication(self, name: str, table: str) -> None: ...

    def create_slot(self, name: str) -> None:
        """A logical slot for a baseline (the engine provisions its own with `enable`)."""
        ...

    def drop_slots(self, prefix: str) -> None:
        """Drop every inactive slot and publication whose name starts with `prefix`."""
        ...

    def insert_backlog(self, table: str, rows: int, txn_rows: int) -> Backlog:
        """Insert ids max+1.. in `txn_rows`-row transactions (one transaction: `txn_rows` >=
        `rows`)."""
        ...

    def update_delete_backlog(self, table: str, updates: int, deletes: int, *,
                              keys: str = "random") -> Backlog:
        """`updates` rows updated in one transaction, then `deletes` rows deleted in another;
        `keys`: 'random' over the whole table or 'recent' (the highest ids)."""
        ...

    def checksum(self, table: str) -> dict[str, str]:
        """The `CHECKSUM_FIELDS` of the table's rows, as text."""
        ...

    def current_lsn(self) -> int: ...

    def stream_baseline(self, slot: str, publication: str, end_lsn: int) -> list[str]:
        """argv of the streaming protocol's raw limit: read `slot` up to `end_lsn`, discard."""
        ...

    def sql_decode_baseline(self, slot: str, publication: str) -> list[str]:
        """argv of the SQL-decoding limit: every change of `slot` through the SQL interface."""
        ...

    def copy_baseline(self, table: str) -> list[str]:
        """argv of the bulk-read limit: the whole table out in the fastest format, discarded."""
        ...

    def baseline_env(self) -> dict[str, str]:
        """Environment for the baseline commands (e.g. the password; never printed)."""
        ...

    def latency_load(self, table: str, *, rate: int, seconds: float) -> dict[str, object]:
        """Run small one-row transactions at `rate`/s for `seconds` (blocks); what it did."""
        ...

    def steady_load(self, table: str, *, rate: int, seconds: float,
                    stop: threading.Event) -> SteadyStats:
        """Random updates/deletes at `rate` changes/s for `seconds` (blocks)."""
        ...

    def close(self) -> None: ...


class BenchFactory(Protocol):
    def __call__(self, dsn: str | None, *, say: Callable[[str], None]) -> BenchSource: ...


__all__ = ["CHECKSUM_FIELDS", "Backlog", "BenchFactory", "BenchSource", "SteadyStats"]

"""Versioned schema of the state store, in SQL both SQLite and PostgreSQL accept.

Each migration runs once, in version order, inside the transaction that records it in
`schema_migrations`, so a crash mid-migration leaves the previous version intact. Migrations are
never edited once released; a change is a new, higher version. Timestamps are epoch seconds
(DOUBLE PRECISION, UTC) so lease expiry compares as numbers across processes and machines;
booleans are INTEGER 0/1; LSNs are BIGINT.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdcengine.errors import Reason, StateStoreError


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


BOOTSTRAP = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL)"
)
"""Created before anything else, so the current version can always be read."""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="meta, sources, source tables, settings overrides, leases",
        statements=(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            """CREATE TABLE sources (
                name TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                enabled INTEGER NOT NULL,
                management_mode TEXT,
                slot_name TEXT,
                publication_name TEXT,
                consistent_point BIGINT,
                system_identifier TEXT,
                timeline INTEGER,
                enabled_at DOUBLE PRECISION,
                updated_at DOUBLE PRECISION NOT NULL,
                broken_reason TEXT,
                broken_message TEXT,
                broken_at DOUBLE PRECISION,
                paused_reason TEXT,
                paused_message TEXT,
                paused_at DOUBLE PRECISION)""",
            """CREATE TABLE source_tables (
                source TEXT NOT NULL REFERENCES sources (name) ON DELETE CASCADE,
                name TEXT NOT NULL,
                mode TEXT NOT NULL,
                state TEXT NOT NULL,
                reason TEXT,
                remedy TEXT,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (source, name))""",
            """CREATE TABLE settings (
                source TEXT NOT NULL REFERENCES sources (name) ON DELETE CASCADE,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (source, key))""",
            """CREATE TABLE leases (
                source TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                purpose TEXT NOT NULL,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                acquired_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL)""",
        ),
    ),
    Migration(
        version=2,
        description="snapshot chunk progress (display only: the Delta log is the truth)",
        statements=(
            """CREATE TABLE snapshot_chunks (
                source TEXT NOT NULL,
                table_name TEXT NOT NULL,
                chunk_id INTEGER NOT NULL,
                attempt BIGINT NOT NULL,
                leaf TEXT NOT NULL,
                lo TEXT,
                hi TEXT,
                estimated_rows BIGINT NOT NULL,
                state TEXT NOT NULL,
                rows_copied BIGINT NOT NULL,
                lsn BIGINT,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (source, table_name, chunk_id))""",
            """CREATE TABLE snapshot_progress (
                source TEXT NOT NULL,
                table_name TEXT NOT NULL,
                attempt BIGINT NOT NULL,
                resumed INTEGER NOT NULL,
                chunks_total INTEGER NOT NULL,
                chunks_done INTEGER NOT NULL,
                rows_total BIGINT NOT NULL,
                rows_done BIGINT NOT NULL,
                rows_copied BIGINT NOT NULL,
                rows_per_s DOUBLE PRECISION,
                eta_s DOUBLE PRECISION,
                finished INTEGER NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (source, table_name))""",
        ),
    ),
    Migration(
        version=3,
        description="run history: runs, per-run table totals, recent batches (bounded)",
        # Ids are assigned by the store under its write lock (MAX + 1): SQLite and PostgreSQL
        # share no auto-increment syntax. Totals live on the run (`runs`, `run_tables`) so that
        # pruning old `run_batches` rows never changes what a run reports.
        statements=(
            """CREATE TABLE runs (
                id BIGINT PRIMARY KEY,
                source TEXT NOT NULL,
                kind TEXT NOT NULL,
                holder TEXT NOT NULL,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                ended_at DOUBLE PRECISION,
                status TEXT NOT NULL,
                error_reason TEXT,
                error_message TEXT,
                batches BIGINT NOT NULL,
                first_lsn BIGINT,
                last_lsn BIGINT,
                last_batch_at DOUBLE PRECISION)""",
            "CREATE INDEX runs_by_source ON runs (source, id)",
            """CREATE TABLE run_tables (
                run_id BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
                table_name TEXT NOT NULL,
                row_count BIGINT NOT NULL,
                PRIMARY KEY (run_id, table_name))""",
            """CREATE TABLE run_batches (
                source TEXT NOT NULL,
                seq BIGINT NOT NULL,
                run_id BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
                recorded_at DOUBLE PRECISION NOT NULL,
                first_lsn BIGINT,
                last_lsn BIGINT NOT NULL,
                table_rows TEXT NOT NULL,
                duration_s DOUBLE PRECISION NOT NULL,
                commit_latency_s DOUBLE PRECISION,
                PRIMARY KEY (source, seq))""",
            "CREATE INDEX run_batches_by_run ON run_batches (run_id, seq)",
        ),
    ),
    Migration(
        version=4,
        description="table options as `enable` registered them (columns, declared key)",
        # JSON text, NULL: registered before version 4 (the config file is then the only
        # source of a table's options). A running pipeline builds a table `enable` added while
        # it streams from these.
        statements=("ALTER TABLE source_tables ADD COLUMN options TEXT",),
    ),
    Migration(
        version=5,
        description="a daemon watchdog's stall record per source (issue 12, defect 4)",
        # beside `state`, not in it: the stored state stays what the pipeline does and shows
        # again once the stall clears. `stalled_detail` is JSON (message, stuck work, threads,
        # the recording daemon's host and pid).
        statements=(
            "ALTER TABLE sources ADD COLUMN stalled_since DOUBLE PRECISION",
            "ALTER TABLE sources ADD COLUMN stalled_at DOUBLE PRECISION",
            "ALTER TABLE sources ADD COLUMN stalled_detail TEXT",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


def pending_migrations(current: int | None) -> tuple[Migration, ...]:
    """The migrations a database at version `current` (None: empty) still needs, in order.

    Refuses a database newer than this code: running old code on it could silently drop or
    misread state that a newer cdcengine relies on.
    """
    current = current or 0
    if current > LATEST_VERSION:
        raise StateStoreError(
            f"the state store is at schema version {current}, written by a newer cdcengine "
            f"(this one knows up to {LATEST_VERSION}); upgrade cdcengine",
            reason=Reason.STATE_STORE_FAILED,
            retryable=False,
            fix="Upgrade cdcengine to the version that wrote this state store.",
        )
    return tuple(m for m in MIGRATIONS if m.version > current)

"""`PostgresAdapter`: the PostgreSQL implementation of `cdcengine.source.adapter.SourceAdapter`.

A thin facade: each method opens its own short-lived connections (safe from a web request) and
delegates to the module that owns the concern.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdcengine.source.adapter import (
    Check,
    ColumnDefault,
    HealthProbe,
    ProvisionResult,
    PublicationInfo,
    SlotInfo,
    SourceIdentity,
    TableInfo,
    TeardownResult,
)
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.control import discovery, health, prerequisites, provision
from cdcengine_postgres.control.publications import publication_info, read_publication
from cdcengine_postgres.control.slots import read_slot
from cdcengine_postgres.control.verify import VerifyRead
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.replication.catchup import CatchupChanges
from cdcengine_postgres.replication.changes import PostgresChanges
from cdcengine_postgres.replication.snapshot import TableSnapshot
from cdcengine_postgres.types import defaults

if TYPE_CHECKING:
    import threading
    from collections.abc import Sequence
    from pathlib import Path

    from cdcengine.config import SourceConfig, TableConfig
    from cdcengine.names import TableRef


class PostgresAdapter:
    engine = "postgres"

    def check_prerequisites(
        self, source: SourceConfig, *, install_id: str, known_slot: bool = False
    ) -> list[Check]:
        return prerequisites.check_prerequisites(source, install_id=install_id,
                                                 known_slot=known_slot)

    def discover_tables(self, source: SourceConfig) -> list[TableInfo]:
        with connect_source(source) as conn, \
                translate_errors(secrets=source.secrets(), context="reading the catalog"):
            return discovery.discover_tables(conn, source)

    def provision(
        self, source: SourceConfig, *, install_id: str, known_slot: bool = False,
        slot_wait_s: float = 30.0,
    ) -> ProvisionResult:
        return provision.provision(source, install_id=install_id, known_slot=known_slot,
                                   slot_wait_s=slot_wait_s)

    def undo_provision(self, source: SourceConfig, result: ProvisionResult) -> None:
        provision.undo_provision(source, result)

    def teardown(
        self, source: SourceConfig, *, install_id: str, known_slot: bool = False,
        wait_s: float = 10.0,
    ) -> TeardownResult:
        return provision.teardown(source, install_id=install_id, known_slot=known_slot,
                                  wait_s=wait_s)

    def slot_status(self, source: SourceConfig) -> SlotInfo:
        with connect_source(source) as conn, \
                translate_errors(secrets=source.secrets(), context="reading the slot"):
            return read_slot(conn, source.slot_name).info

    def publication_status(self, source: SourceConfig, *, install_id: str | None = None
                           ) -> PublicationInfo:
        with connect_source(source) as conn, \
                translate_errors(secrets=source.secrets(), context="reading the publication"):
            return publication_info(read_publication(conn, source.publication_name),
                                    install_id=install_id, source=source.name)

    def probe_health(self, source: SourceConfig, *, install_id: str | None = None
                     ) -> HealthProbe:
        with connect_source(source) as conn, \
                translate_errors(secrets=source.secrets(), context="reading the slot's health"):
            return health.probe(conn, source, install_id=install_id)

    def identify(self, source: SourceConfig) -> SourceIdentity:
        return provision.identify(source)

    def snapshot(self, source: SourceConfig, table: TableConfig, *,
                 stop: threading.Event | None = None) -> TableSnapshot:
        return TableSnapshot(source, table, stop=stop)

    def verify_reader(self, source: SourceConfig, table: TableConfig) -> VerifyRead:
        return VerifyRead(source, table)

    def changes(self, source: SourceConfig, *, start_lsn: int = 0,
                spill_dir: Path | None = None,
                catchup: bool = False) -> PostgresChanges | CatchupChanges:
        if catchup and source.catchup_threshold_mb > 0:
            return CatchupChanges(source, start_lsn=start_lsn, spill_dir=spill_dir)
        return PostgresChanges(source, start_lsn=start_lsn, spill_dir=spill_dir)

    def added_column_defaults(self, source: SourceConfig, ref: TableRef,
                              columns: Sequence[str]) -> dict[str, ColumnDefault]:
        with connect_source(source) as conn, \
                translate_errors(secrets=source.secrets(), context="reading column defaults"):
            return defaults.added_column_defaults(conn, ref, columns)

"""What every prerequisite check reads: one connection and the facts gathered once up front
(server version, the connecting role, the tables' catalog facts, the slot, the publication)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdcengine.config import ManagementMode, SourceConfig
from cdcengine.names import TableRef
from cdcengine.source.adapter import Severity
from cdcengine_postgres.control.catalog import TableFacts, load_table_facts
from cdcengine_postgres.control.publications import PublicationState, read_publication
from cdcengine_postgres.control.slots import SlotState, read_slot

__all__ = ["ERR", "OK", "WARN", "CheckContext", "gather_context"]

OK, WARN, ERR = Severity.OK, Severity.WARNING, Severity.ERROR


@dataclass(slots=True, kw_only=True)
class CheckContext:
    conn: psycopg.Connection
    source: SourceConfig
    install_id: str
    known_slot: bool
    version: int
    user: str
    database: str
    superuser: bool
    facts: dict[TableRef, TableFacts]  # the configured tables and their partitions' leaves
    slot: SlotState
    publication: PublicationState

    def q(self, *parts: str | TableRef) -> str:
        """Quoted SQL identifier text for a fix message."""
        out = []
        for p in parts:
            ident = (sql.Identifier(p.schema, p.name) if isinstance(p, TableRef)
                     else sql.Identifier(p))
            out.append(ident.as_string(self.conn))
        return ".".join(out)

    @property
    def managed(self) -> bool:
        return self.source.management_mode is ManagementMode.MANAGED


def gather_context(conn: psycopg.Connection, source: SourceConfig, install_id: str,
                   known_slot: bool) -> CheckContext:
    """Read the facts every check shares, once, on `conn`."""
    row = conn.execute(
        "SELECT current_setting('server_version_num')::int, current_user, current_database(),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
    ).fetchone()
    assert row is not None
    refs = [tc.ref for tc in source.table_configs]
    facts = load_table_facts(conn, refs)
    # A partitioned root's leaves too: UPDATE/DELETE on a leaf need the leaf's own replica
    # identity (the root's does not cascade), so the identity check reads each leaf's facts.
    leaves = sorted({leaf for f in facts.values() for leaf in f.leaf_partitions} - facts.keys(),
                    key=lambda r: (r.schema, r.name))
    if leaves:
        facts.update(load_table_facts(conn, leaves))
    return CheckContext(
        conn=conn, source=source, install_id=install_id, known_slot=known_slot,
        version=row[0], user=row[1], database=row[2], superuser=bool(row[3]),
        facts=facts, slot=read_slot(conn, source.slot_name),
        publication=read_publication(conn, source.publication_name),
    )

"""One reading for the lag policy (SPEC §7): the source's slot, the engine's temporary slots,
the publication and `max_slot_wal_keep_size`, on one short-lived connection."""

from __future__ import annotations

import psycopg

from cdcengine.config import SourceConfig
from cdcengine.source.adapter import HealthProbe
from cdcengine_postgres.control.publications import publication_info, read_publication
from cdcengine_postgres.control.slots import read_slot, read_temp_slots


def retention_cap_mb(conn: psycopg.Connection) -> int | None:
    """`max_slot_wal_keep_size` in MB; None when unlimited (-1)."""
    row = conn.execute(
        "SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'"
    ).fetchone()
    cap = int(row[0]) if row and row[0] is not None else None
    return cap if cap is not None and cap >= 0 else None


def gone_tables(conn: psycopg.Connection, source: SourceConfig) -> tuple[str, ...]:
    """The configured tables that no longer exist under their name (dropped or renamed)."""
    refs = [tc.ref for tc in source.table_configs]
    rows = conn.execute(
        "SELECT s, t FROM unnest(%s::text[], %s::text[]) AS u(s, t)"
        " WHERE to_regclass(format('%%I.%%I', s, t)) IS NULL",
        [[r.schema for r in refs], [r.name for r in refs]]).fetchall()
    gone = {(s, t) for s, t in rows}
    return tuple(r.qualified for r in refs if (r.schema, r.name) in gone)


def probe(conn: psycopg.Connection, source: SourceConfig, *, install_id: str | None
          ) -> HealthProbe:
    info = publication_info(read_publication(conn, source.publication_name),
                            install_id=install_id, source=source.name)
    return HealthProbe(slot=read_slot(conn, source.slot_name).info,
                       temporary_slots=tuple(read_temp_slots(conn, source.slot_name)),
                       publication=info, retention_cap_mb=retention_cap_mb(conn),
                       gone_tables=gone_tables(conn, source))

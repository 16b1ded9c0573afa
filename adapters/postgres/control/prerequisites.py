"""Prerequisite checks for a PostgreSQL source: each a small named function returning `Check`s.

Every check runs and is reported, even after others failed; each failure says what is wrong and
the exact fix (identifiers quoted with `psycopg.sql`). A check that cannot even run (say, a
catalog query is denied) reports itself as failed with the classified reason instead of aborting
the others. Only an unreachable source raises.

Catalog facts come from pg_catalog (`catalog.load_table_facts`), never information_schema,
which hides rows the user has no privilege on.

This module runs the checks in their reported order; they live by subject in `server_checks`
(server and role), `replication_checks` (slots, WAL senders, the publication, lag thresholds)
and `table_checks` (each configured table), and read what `check_context` gathered once.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from cdcengine.config import SourceConfig
from cdcengine.source.adapter import Check
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.control.check_context import ERR, CheckContext, gather_context
from cdcengine_postgres.control.replication_checks import (
    check_lag_thresholds,
    check_publication,
    check_replication_connection,
    check_replication_slots,
    check_slot,
    check_wal_senders,
)
from cdcengine_postgres.control.server_checks import (
    check_create_privilege,
    check_encryption,
    check_not_standby,
    check_replication_privilege,
    check_server_version,
    check_wal_level,
)
from cdcengine_postgres.control.table_checks import check_tables
from cdcengine_postgres.errors import postgres_error

__all__ = ["check_prerequisites"]


def check_prerequisites(
    source: SourceConfig, *, install_id: str, known_slot: bool = False
) -> list[Check]:
    secrets = source.secrets()
    with connect_source(source) as conn:
        ctx = gather_context(conn, source, install_id, known_slot)
        checks: list[Check] = []
        for fn in _CHECKS:
            try:
                checks.extend(fn(ctx))
            except psycopg.Error as exc:
                err = postgres_error(exc, secrets=secrets, context=fn.__name__)
                checks.append(Check(name=fn.__name__.removeprefix("check_"), severity=ERR,
                                    message=f"could not run this check: {err.message}",
                                    fix=err.fix))
        return checks


_CHECKS: tuple[Callable[[CheckContext], list[Check]], ...] = (
    check_server_version,
    check_not_standby,
    check_encryption,
    check_wal_level,
    check_replication_privilege,
    check_create_privilege,
    check_replication_slots,
    check_wal_senders,
    check_replication_connection,
    check_slot,
    check_tables,
    check_publication,
    check_lag_thresholds,
)

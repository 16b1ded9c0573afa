"""Provisioning and teardown of a source's publication and slot (enable / disable).

Rules, in the order they are applied:
1. Decide before touching anything. An existing publication is adopted only when it carries this
   install's mark for this source; an existing slot only when it is provably ours (the state store
   recorded it, or our marked publication names it), inactive, a pgoutput slot of this database,
   and not invalidated. Anything else is refused without a change.
2. Managed: publication first (created and marked in one committed transaction), then the slot
   (slot creation is impossible inside a transaction that wrote). Self-managed: the slot only.
3. On any failure, drop exactly what this call created, then raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress

import psycopg
import structlog

from cdcengine.config import ManagementMode, SourceConfig
from cdcengine.errors import CDCError, Reason, ReplicationResourceError
from cdcengine.names import TableRef
from cdcengine.source.adapter import ProvisionResult, SourceIdentity, TeardownResult
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.control.catalog import TableFacts, load_table_facts
from cdcengine_postgres.control.publications import (
    PublicationState,
    create_publication,
    drop_publication,
    mark_text,
    read_publication,
    set_publication_tables,
)
from cdcengine_postgres.control.slots import SlotState, create_slot, drop_slot, read_slot
from cdcengine_postgres.errors import translate_errors

log = structlog.get_logger("cdcengine.postgres.provision")


def identify(source: SourceConfig) -> SourceIdentity:
    """IDENTIFY_SYSTEM over a replication connection: system identifier and timeline."""
    with connect_source(source, replication=True) as rconn, \
            translate_errors(secrets=source.secrets(), context="IDENTIFY_SYSTEM"):
        row = rconn.execute("IDENTIFY_SYSTEM").fetchone()
        assert row is not None
        return SourceIdentity(system_identifier=str(row[0]), timeline=int(row[1]),
                              server_version=rconn.info.server_version, database=str(row[3]))


def publication_columns(
    source: SourceConfig, facts: dict[TableRef, TableFacts], version: int
) -> dict[TableRef, list[str]]:
    """Column lists to publish (PG15+): the selected columns plus the replica identity.

    No list under REPLICA IDENTITY FULL: PostgreSQL then rejects UPDATE/DELETE unless the list
    covers every column, so the engine filters columns itself instead.
    """
    out: dict[TableRef, list[str]] = {}
    if version < 150000:
        return out
    for tc in source.table_configs:
        f = facts.get(tc.ref)
        if tc.columns is None or f is None or f.replica_identity == "full":
            continue
        cols = [c for c in tc.columns if f.column(c) is not None and not f.column(c).generated]
        cols += [c for c in f.identity_columns if c not in cols]
        out[tc.ref] = cols
    return out


def _slot_refusal(
    source: SourceConfig, slot: SlotState, pub: PublicationState, *, install_id: str,
    known_slot: bool, database: str,
) -> CDCError | None:
    """Why an existing slot may not be adopted, or None when it may."""
    name = source.slot_name
    ours = known_slot or (
        source.management_mode is ManagementMode.MANAGED
        and pub.marked_by(install_id, source.name) and pub.marked_slot == name)
    if not ours:
        return ReplicationResourceError(
            f"A replication slot named {name!r} already exists and this install did not create "
            "it; it was left untouched.", reason=Reason.SLOT_EXISTS)
    # An enabled source's slot is busy when its own daemon streams; nothing about the slot
    # changes here, so that is no conflict. A fresh adoption needs it idle.
    if slot.info.active and not known_slot:
        return ReplicationResourceError(
            f"Replication slot {name!r} is in use by backend pid {slot.info.active_pid}.",
            reason=Reason.SLOT_IN_USE)
    if slot.slot_type != "logical" or slot.info.plugin != "pgoutput" or slot.database != database:
        return ReplicationResourceError(
            f"Replication slot {name!r} is not a pgoutput logical slot of database {database!r}.",
            reason=Reason.SLOT_EXISTS)
    if slot.info.wal_status == "lost":
        return ReplicationResourceError(
            f"Replication slot {name!r} was invalidated by PostgreSQL; it cannot be adopted.",
            reason=Reason.SLOT_INVALIDATED)
    return None


def provision(
    source: SourceConfig, *, install_id: str, known_slot: bool = False, slot_wait_s: float = 30.0
) -> ProvisionResult:
    secrets = source.secrets()
    identity = identify(source)
    managed = source.management_mode is ManagementMode.MANAGED
    refs = [tc.ref for tc in source.table_configs]
    created_pub = created_slot = adopted_pub = adopted_slot = False
    consistent_point: str | None = None
    with connect_source(source) as conn:
        try:
            with translate_errors(secrets=secrets, context="reading slot and publication"):
                pub = read_publication(conn, source.publication_name)
                slot = read_slot(conn, source.slot_name)
                facts = load_table_facts(conn, refs)
            # 1. decide, changing nothing
            if managed and pub.exists and not pub.marked_by(install_id, source.name):
                raise ReplicationResourceError(
                    f"A publication named {source.publication_name!r} already exists and was not "
                    "created by this install; it was left untouched.",
                    reason=Reason.PUBLICATION_EXISTS)
            if not managed and not pub.exists:
                raise ReplicationResourceError(
                    f"Publication {source.publication_name!r} does not exist; in self_managed "
                    "mode you create it (run `cdcengine check` for the statement).",
                    reason=Reason.PUBLICATION_MISSING)
            if slot.exists:
                refusal = _slot_refusal(source, slot, pub, install_id=install_id,
                                        known_slot=known_slot, database=identity.database)
                if refusal is not None:
                    raise refusal
            # 2. act
            if managed:
                columns = publication_columns(source, facts, conn.info.server_version)
                with translate_errors(secrets=secrets, context="creating the publication"):
                    if pub.exists:
                        set_publication_tables(conn, source.publication_name, refs, columns)
                        adopted_pub = True
                        log.info("publication_adopted", source=source.name,
                                 publication=source.publication_name)
                    else:
                        create_publication(conn, source.publication_name, refs,
                                           mark=mark_text(install_id, source.name,
                                                          source.slot_name),
                                           columns=columns)
                        created_pub = True
                        log.info("publication_created", source=source.name,
                                 publication=source.publication_name, tables=len(refs))
            if slot.exists:
                adopted_slot = True
                log.info("slot_adopted", source=source.name, slot=source.slot_name)
            else:
                with translate_errors(secrets=secrets, context="creating the replication slot"):
                    consistent_point = create_slot(
                        lambda: connect_source(source), source.slot_name,
                        wait_s=slot_wait_s)
                created_slot = True
                log.info("slot_created", source=source.name, slot=source.slot_name,
                         lsn=consistent_point)
        except BaseException:
            # 3. undo exactly what this call created
            _undo(conn, source, slot_created=created_slot, publication_created=created_pub)
            raise
    return ProvisionResult(slot_created=created_slot, slot_adopted=adopted_slot,
                           publication_created=created_pub, publication_adopted=adopted_pub,
                           consistent_point=consistent_point, identity=identity)


def undo_provision(source: SourceConfig, result: ProvisionResult) -> None:
    """Drop what `result` says was created (used when a later step, e.g. the state store, fails)."""
    with connect_source(source) as conn:
        _undo(conn, source, slot_created=result.slot_created,
              publication_created=result.publication_created)


def _undo(conn: psycopg.Connection, source: SourceConfig, *, slot_created: bool,
          publication_created: bool) -> None:
    """Best effort: a failure here is logged, and the original error is what the caller sees."""
    if slot_created:
        with suppress(psycopg.Error, CDCError):
            drop_slot(conn, source.slot_name, wait_s=10)
            log.info("slot_rolled_back", source=source.name, slot=source.slot_name)
    if publication_created:
        with suppress(psycopg.Error):
            drop_publication(conn, source.publication_name)
            log.info("publication_rolled_back", source=source.name,
                     publication=source.publication_name)


def teardown(
    source: SourceConfig, *, install_id: str, known_slot: bool = False, wait_s: float = 10.0
) -> TeardownResult:
    secrets = source.secrets()
    managed = source.management_mode is ManagementMode.MANAGED
    notes: list[str] = []
    slot_dropped = pub_dropped = False
    terminated: Sequence[int] = ()
    with connect_source(source) as conn, \
            translate_errors(secrets=secrets, context="dropping slot and publication"):
        pub = read_publication(conn, source.publication_name)
        slot = read_slot(conn, source.slot_name)
        pub_ours = pub.exists and pub.marked_by(install_id, source.name)
        slot_ours = known_slot or (managed and pub_ours and pub.marked_slot == source.slot_name)
        if slot.exists and slot_ours:
            slot_dropped, terminated = drop_slot(conn, source.slot_name, wait_s=wait_s)
        elif slot.exists:
            notes.append(f"replication slot {source.slot_name} was not created by this install; "
                         "left untouched")
        if managed and pub_ours:
            pub_dropped = drop_publication(conn, source.publication_name)
            log.info("publication_dropped", source=source.name,
                     publication=source.publication_name)
        elif managed and pub.exists:
            notes.append(f"publication {source.publication_name} does not carry this install's "
                         "mark; left untouched")
    return TeardownResult(slot_dropped=slot_dropped, publication_dropped=pub_dropped,
                          terminated_pids=tuple(terminated), notes=tuple(notes))

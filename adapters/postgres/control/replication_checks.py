"""Prerequisite checks of what replication needs: free slots and WAL senders, a working
replication connection, the slot and the publication (ours, or usable as they are), and the lag
thresholds against the server's WAL retention cap."""

from __future__ import annotations

from psycopg import sql

from cdcengine.control.lag import effective_thresholds
from cdcengine.source.adapter import Check
from cdcengine_postgres.connection import connect_source
from cdcengine_postgres.control.check_context import ERR, OK, WARN, CheckContext
from cdcengine_postgres.control.health import retention_cap_mb
from cdcengine_postgres.control.publications import table_list_sql

__all__ = ["SLOTS_NEEDED", "check_lag_thresholds", "check_publication",
           "check_replication_connection", "check_replication_slots", "check_slot",
           "check_wal_senders"]

# one persistent slot, plus one temporary slot per running table snapshot (SPEC §8)
SLOTS_NEEDED = 2


def check_replication_slots(ctx: CheckContext) -> list[Check]:
    row = ctx.conn.execute(
        "SELECT current_setting('max_replication_slots')::int,"
        " (SELECT count(*) FROM pg_replication_slots)::int").fetchone()
    assert row is not None
    max_slots, used = row
    have_own = ctx.slot.exists and _slot_is_ours(ctx)
    need = SLOTS_NEEDED - (1 if have_own else 0)
    free = max_slots - used
    if free >= need:
        return [Check(name="replication_slots", severity=OK,
                      message=f"{free} of {max_slots} replication slots free ({need} needed: "
                              "one persistent, one temporary per table snapshot).")]
    return [Check(name="replication_slots", severity=ERR,
                  message=f"Only {max(free, 0)} of {max_slots} replication slots are free; "
                          f"{need} are needed (one persistent, one temporary per snapshot).",
                  fix=f"ALTER SYSTEM SET max_replication_slots = {used + SLOTS_NEEDED + 2}; "
                      "then restart PostgreSQL (or drop unused slots from "
                      "pg_replication_slots).")]


def check_wal_senders(ctx: CheckContext) -> list[Check]:
    row = ctx.conn.execute(
        "SELECT current_setting('max_wal_senders')::int,"
        " (SELECT count(*) FROM pg_stat_replication)::int").fetchone()
    assert row is not None
    max_senders, used = row
    need = SLOTS_NEEDED - (1 if ctx.slot.info.active and _slot_is_ours(ctx) else 0)
    free = max_senders - used
    if free >= need:
        return [Check(name="wal_senders", severity=OK,
                      message=f"{free} of {max_senders} WAL senders free ({need} needed).")]
    return [Check(name="wal_senders", severity=ERR,
                  message=f"Only {max(free, 0)} of {max_senders} WAL senders are free; {need} "
                          "are needed (one for streaming, one per table snapshot).",
                  fix=f"ALTER SYSTEM SET max_wal_senders = {used + SLOTS_NEEDED + 2}; then "
                      "restart PostgreSQL.")]


def check_replication_connection(ctx: CheckContext) -> list[Check]:
    try:
        with connect_source(ctx.source, replication=True) as rconn:
            row = rconn.execute("IDENTIFY_SYSTEM").fetchone()
    except Exception as exc:  # noqa: BLE001 - every failure here is a reportable ❌
        from cdcengine.errors import classify_error

        err = classify_error(exc)
        return [Check(name="replication_connection", severity=ERR,
                      message="A replication connection could not be opened "
                              f"({err.reason}: {err.message}). Connection poolers refuse "
                              "replication connections; the role needs REPLICATION; and "
                              "max_wal_senders must have room.",
                      fix="Connect to PostgreSQL directly (not through a pooler) with a role "
                          "that has REPLICATION, and allow it in pg_hba.conf.")]
    sysid = row[0] if row else "?"
    return [Check(name="replication_connection", severity=OK,
                  message=f"Replication connection works (system identifier {sysid}).")]


def check_slot(ctx: CheckContext) -> list[Check]:
    name = ctx.source.slot_name
    st = ctx.slot
    if not st.exists:
        return [Check(name="slot", severity=OK,
                      message=f"Replication slot {name} does not exist yet; enable creates it.")]
    problems = []
    if st.slot_type != "logical" or st.info.plugin != "pgoutput":
        problems.append(f"it is a {st.slot_type} slot with plugin {st.info.plugin}, "
                        "not a pgoutput logical slot")
    if st.database not in (None, ctx.database):
        problems.append(f"it belongs to database {st.database}, not {ctx.database}")
    if st.info.wal_status == "lost":
        problems.append("PostgreSQL invalidated it (wal_status = lost)")
    if not _slot_is_ours(ctx):
        problems.insert(0, "this install did not create it")
        if st.info.active:
            problems.append(f"it is in use by backend pid {st.info.active_pid}")
    if problems:
        return [Check(name="slot", severity=ERR,
                      message=f"Replication slot {name} already exists, but "
                              + "; ".join(problems) + ".",
                      fix="Set another slot_name, or drop that slot if nothing uses it: "
                          f"SELECT pg_drop_replication_slot('{name}');")]
    if st.info.active:
        return [Check(name="slot", severity=WARN,
                      message=f"Replication slot {name} is ours and in use by pid "
                              f"{st.info.active_pid} (a running daemon?).")]
    return [Check(name="slot", severity=OK,
                  message=f"Replication slot {name} exists and is this install's: enable "
                          "adopts it.")]


def _slot_is_ours(ctx: CheckContext) -> bool:
    return ctx.known_slot or (
        ctx.managed
        and ctx.publication.marked_by(ctx.install_id, ctx.source.name)
        and ctx.publication.marked_slot == ctx.source.slot_name
    )


def check_publication(ctx: CheckContext) -> list[Check]:
    pub, name = ctx.publication, ctx.source.publication_name
    pub_q = ctx.q(name)
    refs = [tc.ref for tc in ctx.source.table_configs]
    if ctx.managed:
        if not pub.exists:
            return [Check(name="publication", severity=OK,
                          message=f"Publication {name} does not exist yet; enable creates it.")]
        if pub.marked_by(ctx.install_id, ctx.source.name):
            return [Check(name="publication", severity=OK,
                          message=f"Publication {name} exists and carries this install's mark: "
                                  "enable adopts it.")]
        return [Check(name="publication", severity=ERR,
                      message=f"Publication {name} already exists and was not created by this "
                              "install (no matching cdcengine mark); it is left untouched.",
                      fix="Set another publication_name, or use management_mode = "
                          "\"self_managed\" to use it as is.")]
    existing = [r for r in refs if r in ctx.facts]
    create = sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
                     ).format(sql.Identifier(name), table_list_sql(existing or refs))
    if not pub.exists:
        return [Check(name="publication", severity=ERR,
                      message=f"Publication {name} does not exist (self_managed mode: you own "
                              "it).", fix=create.as_string(ctx.conn) + ";")]
    out: list[Check] = []
    published = {t.ref for t in pub.tables}
    # Without publish_via_partition_root, pg_publication_tables lists a root's leaves instead.
    missing = [r for r in existing if r not in published and not (
        ctx.facts[r].leaf_partitions and set(ctx.facts[r].leaf_partitions) <= published)]
    if missing:
        out.append(Check(name="publication_tables", severity=ERR,
                         message=f"Publication {name} does not cover "
                                 f"{', '.join(r.qualified for r in missing)}.",
                         fix=f"ALTER PUBLICATION {pub_q} ADD TABLE "
                             f"{table_list_sql(missing).as_string(ctx.conn)};"))
    flags = [op for op, on in (("insert", pub.insert), ("update", pub.update),
                               ("delete", pub.delete), ("truncate", pub.truncate)) if not on]
    if flags:
        out.append(Check(name="publication_operations", severity=ERR,
                         message=f"Publication {name} does not publish {', '.join(flags)}.",
                         fix=f"ALTER PUBLICATION {pub_q} SET (publish = 'insert, update, "
                             "delete, truncate');"))
    partitioned = [r for r in existing if ctx.facts[r].relkind == "p"]
    if partitioned and not pub.via_root:
        out.append(Check(name="publication_partition_root", severity=ERR,
                         message=f"Publication {name} has publish_via_partition_root = false, "
                                 "but partitioned table(s) "
                                 f"{', '.join(r.qualified for r in partitioned)} must be "
                                 "published through their root.",
                         fix=f"ALTER PUBLICATION {pub_q} SET (publish_via_partition_root = "
                             "true);"))
    if not out:
        out.append(Check(name="publication", severity=OK,
                         message=f"Publication {name} covers every table and publishes insert, "
                                 "update, delete and truncate."))
    return out


def check_lag_thresholds(ctx: CheckContext) -> list[Check]:
    s = ctx.source
    t = effective_thresholds(s.lag_warning_threshold_mb, s.lag_critical_threshold_mb,
                             retention_cap_mb(ctx.conn))
    if t.cap_mb is None:
        return [Check(name="lag_thresholds", severity=OK,
                      message=f"Retained WAL: warning at {t.warning_mb} MB, critical at "
                              f"{t.critical_mb} MB (max_slot_wal_keep_size unlimited).")]
    if t.critical_below_warning:
        return [Check(name="lag_thresholds", severity=WARN,
                      message=f"max_slot_wal_keep_size is {t.cap_mb} MB, so the effective "
                              f"critical threshold is {t.critical_mb} MB (80 %), at or below "
                              f"the warning threshold {t.warning_mb} MB; the engine uses "
                              f"{t.critical_mb} MB.",
                      fix="Lower lag_warning_threshold_mb below it (cdcengine settings), or "
                          "raise max_slot_wal_keep_size.")]
    lowered = (f", lowered from {t.configured_critical_mb} MB to 80 % of max_slot_wal_keep_size "
               f"({t.cap_mb} MB)") if t.lowered_by_cap else ""
    return [Check(name="lag_thresholds", severity=OK,
                  message=f"Retained WAL: warning at {t.warning_mb} MB, critical at "
                          f"{t.critical_mb} MB{lowered}.")]

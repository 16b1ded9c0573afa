"""`cdcengine sweep --prune`: drop what the engine provisioned for sources that left the config.

A source this state store recorded as enabled, managed, and no longer configured still owns a
slot that retains WAL forever. Its DSN left with it (the state store never keeps secrets), so
prune looks for it through the databases of the sources still configured: it drops a slot and
publication only where the publication carries this install's mark for exactly that source and
slot — never anything else. What it cannot find or prove is reported with the SQL to run.
A self-managed source's slot is reported, not dropped: without our publication mark nothing
proves which cluster's slot of that name is ours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from cdcengine.config import SourceConfig
from cdcengine.errors import LeaseHeld, classify_error
from cdcengine.names import pg_identifier
from cdcengine.source.registry import adapter_for
from cdcengine.state.base import SourceRecord, StateStore

log = structlog.get_logger("cdcengine.control.prune")


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneReport:
    source: str
    slot_name: str | None
    publication_name: str | None
    slot_dropped: bool = False
    publication_dropped: bool = False
    message: str = ""


def removed_sources(configs: Sequence[SourceConfig], store: StateStore) -> list[SourceRecord]:
    configured = {c.name for c in configs}
    return [r for r in store.list_sources() if r.enabled and r.name not in configured]


def prune_removed(configs: Sequence[SourceConfig], store: StateStore
                  ) -> tuple[list[PruneReport], list[str]]:
    """(what was pruned or left, with why; names that failed)."""
    reports: list[PruneReport] = []
    failed: list[str] = []
    for rec in removed_sources(configs, store):
        try:
            with store.lease(rec.name, purpose="prune", ttl_s=120.0, wait_s=0):
                reports.append(_prune_one(rec, configs, store))
        except LeaseHeld as held:
            failed.append(rec.name)
            reports.append(_report(rec, f"not pruned: {held.message}"))
        except Exception as exc:  # noqa: BLE001 - reported per source; the others go on
            err = classify_error(exc)
            failed.append(rec.name)
            reports.append(_report(rec, f"not pruned: {err.message}"))
    return reports, failed


def _report(rec: SourceRecord, message: str, **kw: bool) -> PruneReport:
    return PruneReport(source=rec.name, slot_name=rec.slot_name,
                       publication_name=rec.publication_name, message=message, **kw)


def _manual(rec: SourceRecord) -> str:
    return (f"connect to its database and run SELECT pg_drop_replication_slot('{rec.slot_name}')"
            + (f"; DROP PUBLICATION {pg_identifier(rec.publication_name)}"
               if rec.management_mode == "managed" else ""))


def _prune_one(rec: SourceRecord, configs: Sequence[SourceConfig],
               store: StateStore) -> PruneReport:
    if rec.management_mode != "managed" or not (rec.slot_name and rec.publication_name):
        return _report(rec, "self-managed: its slot is left alone; if it is no longer used, "
                            + _manual(rec))
    install_id = store.install_id()
    seen: set[str] = set()
    for cfg in configs:
        if cfg.dsn in seen:
            continue
        seen.add(cfg.dsn)
        target = dataclasses.replace(cfg, name=rec.name, slot_name=rec.slot_name,
                                     publication_name=rec.publication_name,
                                     management_mode="managed")  # type: ignore[arg-type]
        adapter = adapter_for(target)
        try:
            pub = adapter.publication_status(target, install_id=install_id)
        except Exception as exc:  # noqa: BLE001 - another configured database may have it
            log.warning("prune_database_unreachable", source=rec.name, via=cfg.name,
                        reason=str(classify_error(exc).reason))
            continue
        if not (pub.exists and pub.owned and (pub.mark or "").endswith(f"slot={rec.slot_name}")):
            continue
        td = adapter.teardown(target, install_id=install_id, known_slot=True)
        store.record_disabled(rec.name)
        log.info("source_pruned", source=rec.name, slot=rec.slot_name,
                 publication=rec.publication_name, slot_dropped=td.slot_dropped,
                 publication_dropped=td.publication_dropped)
        return _report(rec, f"pruned through the database of source {cfg.name!r}",
                       slot_dropped=td.slot_dropped, publication_dropped=td.publication_dropped)
    return _report(rec, "no configured source reaches a database holding its marked "
                        "publication; nothing was dropped. If it still exists, " + _manual(rec))

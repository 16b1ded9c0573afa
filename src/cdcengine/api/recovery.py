"""Operator actions after a failure (SPEC §3, §7): `repair_cdc` and `resume_cdc`.

`repair` is for a source whose changes were (or may have been) lost — slot dropped, invalidated
or auto-dropped, publication gone, the database restored elsewhere, or a self-managed slot
retaining too much WAL. It recreates the slot (and, managed, the publication), queues a
re-snapshot of every table — each swapped into its existing Delta tables in one commit at the new
snapshot's position (SPEC §8) — and clears the broken marker last, so a crash part-way leaves the
source broken and `repair` can simply run again. The process that streams the source (a running
daemon waiting on the marker, or the next `run`) performs the re-snapshots.

`resume` is for a pause (auth, permission: nothing lost): it re-probes the source and clears
the pause; streaming continues from the slot, no re-snapshot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import structlog

from cdcengine.api.leases import COMMAND_LEASE_TTL_S
from cdcengine.api.setup import refuse_failed_checks
from cdcengine.config import SourceConfig
from cdcengine.control.health import resources_lost
from cdcengine.errors import (
    CDCError,
    NotEnabled,
    Reason,
    ReplicationResourceError,
)
from cdcengine.lsn import parse_lsn
from cdcengine.pipeline.resync import request_resync
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, as_enabled, open_store
from cdcengine.state.base import SourceRecord, StateStore, hold_lease
from cdcengine.state.settings import with_overrides

log = structlog.get_logger("cdcengine.api.recovery")


@dataclass(frozen=True, slots=True, kw_only=True)
class RepairResult:
    source: str
    was: str  # the broken reason (or what the probe found) that made the repair necessary
    slot_created: bool
    publication_created: bool
    consistent_point: str | None
    tables: tuple[str, ...]  # queued for re-snapshot

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeResult:
    source: str
    was: str  # the pause reason cleared

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _enabled(store: StateStore, source: SourceConfig) -> SourceRecord:
    rec = store.get_source(source.name)
    if not (rec and rec.enabled):
        raise NotEnabled(f"source {source.name!r}: CDC is not enabled; run `cdcengine enable`.")
    return rec


def repair_cdc(source: SourceConfig, *, state: StateArg = None, slot_wait_s: float = 30.0,
               drop_wait_s: float = 10.0) -> RepairResult:
    """Recreate what was lost and re-snapshot every table (see the module doc). Refuses
    (`nothing_to_repair`, changing nothing) when the source is not broken and its slot and
    publication are in place."""
    with open_store(state) as store, hold_lease(store, source.name, purpose="repair",
                                            ttl_s=COMMAND_LEASE_TTL_S + slot_wait_s, wait_s=0):
        rec = _enabled(store, source)
        eff = as_enabled(rec, with_overrides(source, store))
        adapter = adapter_for(source)
        install_id = store.install_id()
        was = rec.broken.reason if rec.broken else None
        if was is None:
            probe = adapter.probe_health(eff, install_id=install_id)
            lost = resources_lost(store, eff, probe)
            if lost is None:
                raise CDCError(f"source {source.name!r} is not broken and its slot and "
                               "publication are in place: nothing to repair.",
                               reason=Reason.NOTHING_TO_REPAIR)
            was = str(lost[0])
        checks = adapter.check_prerequisites(eff, install_id=install_id, known_slot=True)
        # the slot is what repair replaces: its own check may fail (lost, in the way)
        refuse_failed_checks(source, checks, action="repair", ignore=frozenset({"slot"}))
        # The old slot (if any is left) describes a position the Delta tables cannot trust.
        adapter.teardown(eff, install_id=install_id, known_slot=True, wait_s=drop_wait_s)
        result = adapter.provision(eff, install_id=install_id, known_slot=False,
                                   slot_wait_s=slot_wait_s)
        try:
            configured = {tc.name for tc in source.table_configs}
            for tr in store.list_tables(source.name):
                if tr.name not in configured:
                    store.remove_table(source.name, tr.name)
            for tc in source.table_configs:
                request_resync(store, source.name, tc)
            lsn = result.consistent_point
            store.record_reprovisioned(
                source.name, consistent_point=parse_lsn(lsn) if lsn else None,
                system_identifier=result.identity.system_identifier,
                timeline=result.identity.timeline)
            store.clear_broken(source.name)  # last: until here a rerun of repair is the fix
        except BaseException:
            adapter.undo_provision(eff, result)
            raise
        log.warning("source_repaired", source=source.name, was=was,
                    slot=eff.slot_name, consistent_point=lsn,
                    tables=[tc.name for tc in source.table_configs])
        return RepairResult(source=source.name, was=was, slot_created=result.slot_created,
                            publication_created=result.publication_created,
                            consistent_point=lsn,
                            tables=tuple(tc.name for tc in source.table_configs))


def resume_cdc(source: SourceConfig, *, state: StateArg = None) -> ResumeResult:
    """Clear a pause after re-probing the source (SPEC §3). Refuses, changing nothing, when the
    source is not paused, when it is broken (repair first), when the probe still fails (the
    pause's cause is not fixed) or when the slot or publication is gone."""
    with open_store(state) as store, hold_lease(store, source.name, purpose="resume",
                                            ttl_s=COMMAND_LEASE_TTL_S, wait_s=0):
        rec = _enabled(store, source)
        if rec.broken is not None:
            raise CDCError(f"source {source.name!r} is broken ({rec.broken.reason}); resume "
                           "cannot help.", reason=Reason.NOTHING_TO_REPAIR, retryable=False,
                           fix="Run `cdcengine repair` for this source.")
        if rec.paused is None:
            raise CDCError(f"source {source.name!r} is not paused: nothing to resume.",
                           reason=Reason.NOTHING_TO_REPAIR, retryable=False,
                           fix="Nothing to do; `cdcengine status` shows the source's state.")
        eff = as_enabled(rec, with_overrides(source, store))
        adapter = adapter_for(source)
        install_id = store.install_id()
        checks = adapter.check_prerequisites(eff, install_id=install_id, known_slot=True)
        refuse_failed_checks(source, checks, action="resume")
        probe = adapter.probe_health(eff, install_id=install_id)
        lost = resources_lost(store, eff, probe)
        if lost is not None:
            raise ReplicationResourceError(f"source {source.name!r}: {lost[1]}",
                                           reason=lost[0],
                                           fix="Run `cdcengine repair` for this source.")
        store.clear_paused(source.name)
        log.info("source_resumed", source=source.name, was=rec.paused.reason)
        return ResumeResult(source=source.name, was=rec.paused.reason)

"""Setting a source up and taking it down (SPEC §3 `check`, `tables`, `enable`, `disable`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import structlog

from cdcengine.api.leases import COMMAND_LEASE_TTL_S, enable_lease
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, PrerequisitesFailed, Reason, ReplicationResourceError
from cdcengine.lsn import parse_lsn
from cdcengine.sink.destination import check_destination
from cdcengine.source.adapter import Check, ProvisionResult, SourceAdapter, TableInfo
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, as_enabled, open_store
from cdcengine.state.base import SourceRecord, StateStore, TableOptions, hold_lease
from cdcengine.state.settings import IMMUTABLE_KEYS, with_overrides

log = structlog.get_logger("cdcengine.api")


@dataclass(frozen=True, slots=True, kw_only=True)
class EnableResult:
    source: str
    already_enabled: bool
    management_mode: str
    slot_name: str
    publication_name: str
    slot_created: bool
    slot_adopted: bool
    publication_created: bool
    publication_adopted: bool
    consistent_point: str | None
    tables: tuple[str, ...]
    checks: tuple[Check, ...] = ()
    # on an enabled source: the table list's changes (a table whose mode changed is `changed`)
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    daemon_running: bool = False  # a running daemon takes the changes up while it streams

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DisableResult:
    source: str
    already_disabled: bool
    slot_dropped: bool
    publication_dropped: bool
    terminated_pids: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def known_slot(rec: SourceRecord | None, source: SourceConfig) -> bool:
    """The state store recorded that this install created the source's slot."""
    return bool(rec and rec.enabled and rec.slot_name == source.slot_name)


def check_prerequisites(source: SourceConfig, *, state: StateArg = None) -> list[Check]:
    """Every prerequisite check, all reported (SPEC §3 `check`). Raises only when unreachable."""
    with open_store(state) as store:
        rec = store.get_source(source.name)
        checks = adapter_for(source).check_prerequisites(
            as_enabled(rec, with_overrides(source, store)), install_id=store.install_id(),
            known_slot=known_slot(rec, source))
    return [*checks, *check_destination(source.name, source.destination,
                                          source.destination_options)]


def discover_tables(source: SourceConfig) -> list[TableInfo]:
    """The source database's tables and whether (and why not) each can be captured."""
    return adapter_for(source).discover_tables(source)


def refuse_failed_checks(source: SourceConfig, checks: Sequence[Check], *,
                         action: str | None = None,
                         ignore: frozenset[str] = frozenset()) -> None:
    """`PrerequisitesFailed` (carrying every check) when a check not in `ignore` failed."""
    failed = [c for c in checks if not c.ok and c.name not in ignore]
    if failed:
        names = ", ".join(sorted({c.name + (f" ({c.table})" if c.table else "")
                                  for c in failed}))
        refused = f"{action} refused: " if action else ""
        raise PrerequisitesFailed(
            f"source {source.name!r}: {refused}{len(failed)} prerequisite check(s) failed: "
            f"{names}. Nothing was changed.", checks=list(checks))


# ---- enable ---------------------------------------------------------------------------------


def enable_cdc(
    source: SourceConfig, *, state: StateArg = None, slot_wait_s: float = 30.0
) -> EnableResult:
    """Provision CDC for a source: re-run the checks, then publication (managed) and slot.

    Safe to call repeatedly: on an enabled source it adopts what exists, brings the managed
    publication's table list in line with the config, registers the tables (added, removed, mode
    changed: `added` / `removed` / `changed`), and returns `already_enabled=True` — also while a
    daemon streams the source (`daemon_running`): that daemon snapshots added tables beside its
    stream and stops writing removed ones within seconds. It refuses (changing nothing) when any
    check fails (`PrerequisitesFailed` with `.checks`), when slot name, publication name or mode
    differ from what was enabled (`immutable_setting`), when a slot or publication of that name
    is not provably this install's, and when an enabled source lost its slot (that needs
    `repair`, which re-snapshots; recreating the slot silently would leave a gap). It never
    removes tables from Delta, never drops anything it did not create, and on failure undoes
    exactly what it created.
    """
    with open_store(state) as store, enable_lease(store, source.name, slot_wait_s) as leased:
        rec = store.get_source(source.name)
        enabled = bool(rec and rec.enabled)
        if rec is not None and rec.enabled:
            _refuse_immutable_changes(source, rec)
        adapter = adapter_for(source)
        install_id = store.install_id()
        known = known_slot(rec, source)
        checks = adapter.check_prerequisites(source, install_id=install_id, known_slot=known)
        refuse_failed_checks(source, checks)
        if enabled:
            _refuse_lost_slot(adapter, source)
        provisioned = adapter.provision(source, install_id=install_id, known_slot=known,
                                        slot_wait_s=slot_wait_s)
        had = {t.name: t.mode for t in store.list_tables(source.name)} if enabled else {}
        try:
            _register_tables(store, source, provisioned, had, first_enable=not enabled)
        except BaseException:
            adapter.undo_provision(source, provisioned)
            raise
        log.info("cdc_enabled", source=source.name, slot=source.slot_name,
                 publication=source.publication_name, slot_created=provisioned.slot_created,
                 already_enabled=enabled)
        return _enable_result(source, provisioned, checks, had, already_enabled=enabled,
                              daemon_running=not leased)


def _refuse_immutable_changes(source: SourceConfig, rec: SourceRecord) -> None:
    """Slot name, publication name and mode are fixed while enabled (`immutable_setting`)."""
    for key in IMMUTABLE_KEYS:
        was, now = getattr(rec, key), str(getattr(source, key))
        if was != now:
            raise CDCError(
                f"source {source.name!r}: {key} is {now!r} in the config but CDC was "
                f"enabled with {was!r}; it cannot change while enabled.",
                reason=Reason.IMMUTABLE_SETTING)


def _refuse_lost_slot(adapter: SourceAdapter, source: SourceConfig) -> None:
    """An enabled source whose slot is gone needs `repair` (a re-snapshot), not a new slot."""
    if not adapter.slot_status(source).exists:
        raise ReplicationResourceError(
            f"source {source.name!r} is enabled but its replication slot "
            f"{source.slot_name!r} is gone; changes made since were not captured.",
            reason=Reason.SLOT_MISSING)


def _register_tables(store: StateStore, source: SourceConfig, provisioned: ProvisionResult,
                     had: Mapping[str, str], *, first_enable: bool) -> None:
    """Record the source enabled (first enable) or drop the tables that left the config, then
    record every configured table with its mode and options."""
    tables = {tc.name: str(tc.mode) for tc in source.table_configs}
    if first_enable:
        lsn = provisioned.consistent_point
        store.record_enabled(
            source.name, management_mode=str(source.management_mode),
            slot_name=source.slot_name, publication_name=source.publication_name,
            consistent_point=parse_lsn(lsn) if lsn else None,
            system_identifier=provisioned.identity.system_identifier,
            timeline=provisioned.identity.timeline, tables=tables)
    else:
        # a daemon streaming this source picks these changes up (a table added, removed or
        # switched to another mode) at its next check, see `cdcengine.pipeline.tablesets`
        for name in set(had) - set(tables):  # left the config: no longer captured
            store.remove_table(source.name, name)
    for tc in source.table_configs:
        store.upsert_table(source.name, tc.name, str(tc.mode), options=TableOptions(
            columns=tc.columns, primary_key=tc.primary_key))


def _enable_result(source: SourceConfig, provisioned: ProvisionResult, checks: Sequence[Check],
                   had: Mapping[str, str], *, already_enabled: bool,
                   daemon_running: bool) -> EnableResult:
    tables = {tc.name: str(tc.mode) for tc in source.table_configs}
    return EnableResult(
        source=source.name, already_enabled=already_enabled,
        management_mode=str(source.management_mode), slot_name=source.slot_name,
        publication_name=source.publication_name, slot_created=provisioned.slot_created,
        slot_adopted=provisioned.slot_adopted,
        publication_created=provisioned.publication_created,
        publication_adopted=provisioned.publication_adopted,
        consistent_point=provisioned.consistent_point, tables=tuple(tables),
        checks=tuple(checks),
        added=tuple(n for n in tables if had and n not in had),
        removed=tuple(sorted(set(had) - set(tables))),
        changed=tuple(n for n, m in tables.items() if n in had and had[n] != m),
        daemon_running=daemon_running)


# ---- disable --------------------------------------------------------------------------------


def disable_cdc(source: SourceConfig, *, state: StateArg = None, wait_s: float = 10.0
                ) -> DisableResult:
    """Drop what the engine owns for this source and record it disabled. Idempotent.

    Managed: the slot and the marked publication; self_managed: the slot only (the user's
    publication is never touched). A slot still held by another backend is freed by terminating
    that walsender, waiting at most `wait_s`. A slot or publication this install cannot prove it
    created is left alone, and `notes` says so.
    """
    with open_store(state) as store, hold_lease(store, source.name, purpose="disable",
                                            ttl_s=COMMAND_LEASE_TTL_S + wait_s, wait_s=0):
        rec = store.get_source(source.name)
        target = as_enabled(rec, source)
        td = adapter_for(source).teardown(target, install_id=store.install_id(),
                                          known_slot=known_slot(rec, target), wait_s=wait_s)
        was_enabled = bool(rec and rec.enabled)
        if rec is not None:
            store.record_disabled(source.name)
        log.info("cdc_disabled", source=source.name, slot_dropped=td.slot_dropped,
                 publication_dropped=td.publication_dropped)
        return DisableResult(
            source=source.name,
            already_disabled=not (was_enabled or td.slot_dropped or td.publication_dropped),
            slot_dropped=td.slot_dropped, publication_dropped=td.publication_dropped,
            terminated_pids=td.terminated_pids, notes=td.notes)
